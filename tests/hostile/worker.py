"""Runs one group of the hostile-input cases (the `hostile` package) in this process and writes a JSON
verdict per case.

    python tests/hostile/worker.py BASE_DIR GROUP OUT.json

For each case: the wall and CPU time, the peak resident memory above what the process held just before it (the
kernel's peak counter is reset before each case: /proc/self/clear_refs), the exception (type and
message) or the result, the problems found against the case's expectation, and whether the engine built
at start-up still serves the good request exactly as before (same tokens) after it. A limit on the
address space guards the machine should a case run away.
"""
from __future__ import annotations

import gc
import json
import os
import re
import resource
import sys
import tempfile
import time
import traceback

_STATUS = "/proc/self/status"


def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
        return True
    except OSError:
        return False


def _libc():
    """glibc, to make freed memory leave the process (so that each case's peak shows up as new resident
    memory, not as reuse of what an earlier case freed); None elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD fixed at 128 KiB: large blocks are unmapped when freed
        return libc
    except (OSError, AttributeError):
        return None


def _mro_names(exc: BaseException) -> list[str]:
    return [c.__name__ for c in type(exc).__mro__]


def _verdict(c, outcome: dict, path: str | None) -> list[str]:
    problems = []
    allowed = (c.error or "").split("|") if c.error else []
    exc = outcome.get("exception")
    if exc is None:
        if c.error is not None and "ok" not in allowed:
            problems.append(f"expected {c.error}, but it succeeded: {outcome.get('result', '')[:200]}")
        if c.check is not None and outcome.get("check_problem"):
            problems.append(outcome["check_problem"])
        return problems
    if c.error is None:
        problems.append(f"expected success, got {exc['type']}: {exc['message'][:300]}")
        return problems
    kinds = [k for k in allowed if k != "ok"]
    if not any(k in exc["mro"] for k in kinds):
        problems.append(f"expected {c.error}, got {exc['type']}: {exc['message'][:300]}")
    for name in c.names:
        want = name.replace("{path}", path or "<no file written>")
        if want not in exc["message"]:
            problems.append(f"message does not name {want!r}: {exc['message'][:400]}")
    if "\n" in exc["message"].strip():
        problems.append(f"message is not one line: {exc['message'][:200]!r}")
    return problems


def main(base: str, group: str, out: str) -> None:
    import hostile as H

    t0 = time.perf_counter()
    libc = _libc()
    with open(os.path.join(base, "vocab.json"), encoding="utf-8") as f:
        parts = json.load(f)
    tmp = tempfile.mkdtemp(prefix=f"hostile-{group}-")
    ctx = H.Ctx(base=base, tmp=tmp, parts=parts, spec0=H.base_spec(parts))
    ctx.loaded = ctx.load(os.path.join(base, "base.gguf"))
    ctx.engine = ctx.new_engine()

    from trinfer.runtime import LLM

    ctx.extra["llm"] = LLM(ctx.loaded, backend="torch", device="cpu", num_kv_blocks=64, max_num_seqs=4)

    def serve() -> list[int]:
        rid = ctx.engine.add_request(H.GOOD_PROMPT, max_new_tokens=H.GOOD_NEW_TOKENS, ignore_eos=True)
        outs = [o for o in ctx.engine.run_until_done() if o.request_id == rid and o.finished]
        return outs[-1].token_ids

    reference = serve()
    # A case that ran away would take the machine with it: cap the address space well above the bound checked.
    vm = _status_kb("VmSize")
    if vm is not None:
        limit = vm * 1024 + (4 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    results = {"_setup_s": time.perf_counter() - t0, "_peak_tracking": _reset_peak(), "cases": {}}
    for c in (c for c in H.CASES if c.group == group):
        ctx.path = None
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)
        before = _status_kb("VmRSS") or 0
        _reset_peak()
        outcome: dict = {}
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            result = c.run(ctx)
            outcome["result"] = repr(result)[:300]
            if c.check is not None:
                outcome["check_problem"] = c.check(result)
            del result
        except BaseException as exc:  # noqa: BLE001 (a panic from a Rust library is a BaseException)
            if isinstance(exc, KeyboardInterrupt):
                raise
            outcome["exception"] = {"type": type(exc).__name__, "mro": _mro_names(exc), "message": str(exc)[:4000],
                                    "traceback": traceback.format_exc()[-3000:]}
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak = _status_kb("VmHWM")
        problems = _verdict(c, outcome, ctx.path)
        try:
            served = serve()
            if served != reference:
                problems.append(f"the engine served {served} after this case, {reference} before")
        except BaseException as exc:  # noqa: BLE001
            problems.append(f"the engine failed the good request after this case: {type(exc).__name__}: {exc}")
        results["cases"][c.name] = {
            "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": None if peak is None else max(0, peak - before) / 1024,
            "problems": problems, "exception": outcome.get("exception", {}).get("type"),
            "message": outcome.get("exception", {}).get("message", "")[:600],
            "traceback": outcome.get("exception", {}).get("traceback", "") if problems else "",
        }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: hostile, checkpoints
    main(*sys.argv[1:4])
