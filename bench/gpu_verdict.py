"""The GPU check's verdict per feature, from what its stages left on disk (bench/gpu_check.sh).

    python -m bench.gpu_verdict features WORK OUT [--status STAGE=STATUS ...]   # one line per feature
    python -m bench.gpu_verdict done-ids PYTEST_OUTPUT                        # ids a pytest -v run got through
    python -m bench.gpu_verdict selection COLLECTED                           # selected tests per feature

A feature's evidence comes from every stage that touches it: the smoke cases and end-to-end checks
(bench/gpu_cases.py: WORK/smoke-*.log, lines `ok   NAME` / `FAIL NAME` / `SKIP NAME`), the test stages
(WORK/tests_fast.out, WORK/tests.out: pytest -v, one process or pytest-xdist), compute-sanitizer
(WORK/sanitize.out, lines `sanitize RUN: STATUS`), the CUDA C++ build stage's status, and the benchmark results in
OUT (kernels.json: our rows that errored or disagree with the reference; e2e.json: trinfer rows that errored;
prefix_chunk.json: the same tokens with the prefix cache on and off; spec.json). Each line says `ok` (something
ran, nothing failed), `FAIL` (something failed), `skipped` (only skips) or `not run` (nothing of it ran, e.g. a
stage cut at its limit before reaching it), then the counts per source. No test is timed here; a verdict is only
as complete as the stages that ran (their statuses are in the summary's stage table).

Nothing here imports torch: the summary is rewritten after every stage.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
# pytest -v, one process: "tests/x.py::t[a b] PASSED  [ 10%]" (a skip or xfail with its reason in parentheses);
# pytest-xdist: "[gw3] [ 10%] PASSED tests/x.py::t"
_ONE = re.compile(r"^(tests/\S.*?::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?: \(.*\))?(?:\s+\[\s*\d+%\])?\s*$")
_XDIST = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S.*?::.+?)\s*$")
# -rfE short summary: "FAILED tests/x.py::t - AssertionError: ..." (an error in a fixture or at collection too)
_SHORT = re.compile(r"^(FAILED|ERROR) (tests/\S.*?)(?: - .*)?$")
_CASE = re.compile(r"^(ok  |FAIL|SKIP) (.+?)(?: \(\d+(?:\.\d+)?s\))?(?::.*)?$")
_SANITIZE = re.compile(r"^sanitize (memcheck-\d+|racecheck|synccheck): (\S+)")
# A test id with the CUDA C++ backend as a parameter (the `kernel_backend` / `cuda_backend` fixtures).
CUDA_PARAM = re.compile(r"[\[-]cuda[\]-]")


def test_outcomes(text: str) -> dict[str, str]:
    """{test id: outcome} from pytest -v output (one process or xdist); the last word on an id wins, and the
    -rfE summary's FAILED/ERROR count too (a fixture error reported only there)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.rstrip()
        m = _ONE.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _XDIST.match(line)
        if m:
            out[m.group(2)] = m.group(1)
            continue
        m = _SHORT.match(line)
        if m and "::" in m.group(2):
            out[m.group(2)] = m.group(1)
    return out


def case_outcomes(text: str) -> dict[str, str]:
    """{case name: ok | FAIL | SKIP} from bench/gpu_cases.py logs (kernel cases and end-to-end checks)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _CASE.match(line)
        if m:
            out[m.group(2)] = m.group(1).strip()
    return out


@dataclass(frozen=True)
class Feature:
    name: str
    tests: str                     # regex on test ids (re.search)
    cases: str = r"(?!)"           # regex on smoke case / end-to-end check names
    sanitize: tuple[str, ...] = ()  # sanitizer runs that speak for it
    cuda_params: bool | None = False  # tests with a CUDA C++ parameter: only those (True), also (None), none (False)
    stages: tuple[str, ...] = ()   # stages whose FAIL/TIMEOUT fails it outright (the CUDA C++ build)
    optional: bool = False         # may have no test yet (the dry run does not require one)


_KERNEL_FILES = r"^tests/test_(paged_attention|rotary|rms_norm|kv_cache|greedy_sample|lm_head|silu_and_mul|gpu_scale)\.py::"
FEATURES = (
    Feature("kernels", _KERNEL_FILES, r"^(rms_norm|silu_and_mul|greedy_sample|lm_head_greedy fp32|apply_rotary|"
            r"rotary_write_kv_cache|write_kv_cache|paged_)", ("memcheck-0", "memcheck-1")),
    Feature("engine", r"^tests/test_(engine|abort|backends|model_parity|torch_backend)\.py::|"
            r"^tests/test_gpu_engine\.py::test_engine_matches_transformers_on_the_gpu", r"^e2e$"),
    Feature("graphs", r"^tests/test_cuda_graphs\.py::|^tests/test_gpu_engine\.py::test_async_pipeline|"
            r"::test_decode_cuda_graph_replay|::test_kernels_replay_in_a_cuda_graph", r"^e2e(-prefix)?$",
            cuda_params=None),
    Feature("CUDA C++", r"^tests/test_cuda_(backend|jit)\.py::|^tests/test_(paged_attention|rms_norm|kv_cache|"
            r"greedy_sample|silu_and_mul|gpu_scale)\.py::", r"^cuda ", ("racecheck", "synccheck"),
            cuda_params=True, stages=("build",)),
    Feature("linear/quant", r"^tests/test_(linear|quantization)\.py::|^tests/test_lm_head\.py::test_quantized",
            r"^(linear\[|lm_head_greedy\[)"),
    Feature("prefix/chunked", r"^tests/test_prefix_cach(e|ing)\.py::|^tests/test_paged_attention\.py::\S*kv_split",
            r"KV split|^e2e-prefix$"),
    Feature("qwen3", r"^tests/test_qwen3\.py::|qwen3|^tests/test_rotary\.py::.*qk_norm",
            r"q/k norm|^e2e-prefix$"),
    Feature("TP-1GPU", r"^tests/test_tensor_parallel\.py::\S*one_gpu"),
    Feature("spec", r"^tests/test_spec", optional=True),
)


def _selects(f: Feature, test_id: str) -> bool:
    if not re.search(f.tests, test_id):
        return False
    if f.cuda_params is None:
        return True
    return bool(CUDA_PARAM.search(test_id)) == f.cuda_params or (
        f.cuda_params and re.match(r"^tests/test_cuda_(backend|jit)\.py::", test_id) is not None)


@dataclass
class Evidence:
    tests: dict[str, int] = field(default_factory=dict)
    cases: dict[str, int] = field(default_factory=dict)
    sanitize: list[str] = field(default_factory=list)
    bench: list[str] = field(default_factory=list)
    bench_failed: bool = False
    stage_failed: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        failed = (self.tests.get("FAILED", 0) + self.tests.get("ERROR", 0) + self.tests.get("XPASS", 0)
                  + self.cases.get("FAIL", 0) + sum(s.startswith("FAIL") for s in self.sanitize))
        if failed or self.bench_failed or self.stage_failed:
            return "FAIL"
        ran = (self.tests.get("PASSED", 0) + self.tests.get("XFAIL", 0) + self.cases.get("ok", 0)
               + sum(s.startswith("ok") for s in self.sanitize) + len(self.bench))
        if ran:
            return "ok"
        if self.tests.get("SKIPPED", 0) or self.cases.get("SKIP", 0):
            return "skipped"
        return "not run"

    def detail(self) -> str:
        parts = list(self.stage_failed)
        if self.cases:
            word = {"ok": "ok", "FAIL": "failed", "SKIP": "skipped"}
            parts.append("smoke " + ", ".join(f"{self.cases[k]} {word[k]}" for k in word if k in self.cases))
        if self.tests:
            order = {o: i for i, o in enumerate(OUTCOMES)}
            parts.append("tests " + ", ".join(f"{n} {k.lower()}" for k, n in
                                              sorted(self.tests.items(), key=lambda kv: order[kv[0]])))
        if self.sanitize:
            parts.append("sanitize " + ", ".join(self.sanitize))
        parts += self.bench
        return "; ".join(parts) or "nothing of it ran"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _bench_evidence(out: Path) -> dict[str, list[tuple[str, bool]]]:
    """{feature: [(what the benchmark showed, failed)]} from the result files in `out`."""
    found: dict[str, list[tuple[str, bool]]] = {}
    kernels = _json(out / "kernels.json")
    if kernels:
        for feature, pick in (("linear/quant", lambda k: k.startswith("linear[")),
                              ("kernels", lambda k: not k.startswith("linear["))):
            ours = [r for r in kernels.get("rows", []) if r.get("provider") == "triton" and pick(r.get("kernel", ""))]
            ok = sum(r.get("status") == "ok" for r in ours)
            bad = [r for r in ours if r.get("status") == "error" or r.get("check") == "MISMATCH"]
            if ok or bad:
                found.setdefault(feature, []).append(
                    (f"bench {ok} rows timed, {len(bad)} errors or mismatches", bool(bad)))
    e2e = _json(out / "e2e.json")
    if e2e:
        for feature, pick in (("engine", lambda r: r["system"] == "trinfer" and not r["shape"].startswith("Qwen3")),
                              ("qwen3", lambda r: r["system"] == "trinfer" and r["shape"].startswith("Qwen3")),
                              ("linear/quant", lambda r: r["system"].startswith("trinfer+"))):
            rows = [r for r in e2e.get("rows", []) if pick(r)]
            ok = sum(r.get("status") == "ok" for r in rows)
            bad = sum(r.get("status") == "error" for r in rows)
            if ok or bad:
                found.setdefault(feature, []).append((f"e2e {ok} trinfer rows ok, {bad} errors", bool(bad)))
    pc = _json(out / "prefix_chunk.json")
    if pc:
        prefix = pc.get("prefix") or {}
        if "tokens_equal" in prefix:
            same = bool(prefix["tokens_equal"])
            found.setdefault("prefix/chunked", []).append(
                (f"bench: tokens {'equal' if same else 'DIFFER'} with the prefix cache on and off", not same))
        if pc.get("itl"):
            found.setdefault("prefix/chunked", []).append((f"bench: {len(pc['itl'])} chunk budgets measured", False))
    spec = _json(out / "spec.json")
    if spec is not None:
        found.setdefault("spec", []).append(("bench spec.json written", False))
    return found


def features(work: Path, out: Path, status: dict[str, str]) -> list[str]:
    """One line per feature: name, verdict, evidence."""
    tests: dict[str, str] = {}
    for name in ("tests_fast.out", "tests.out"):  # the parallel pass reruns nothing of the fast pass but skips
        tests.update(test_outcomes(_read(work / name)))
    cases: dict[str, str] = {}
    for log in sorted(work.glob("smoke-*.log")):
        cases.update(case_outcomes(_read(log)))
    sanitize = {m.group(1): m.group(2) for m in map(_SANITIZE.match, _read(work / "sanitize.out").splitlines()) if m}
    bench = _bench_evidence(out)
    lines = []
    for f in FEATURES:
        ev = Evidence()
        for test_id, outcome in tests.items():
            if _selects(f, test_id):
                ev.tests[outcome] = ev.tests.get(outcome, 0) + 1
        for name, outcome in cases.items():
            if re.search(f.cases, name):
                ev.cases[outcome] = ev.cases.get(outcome, 0) + 1
        ev.sanitize = [f"{run} {sanitize[run]}" for run in f.sanitize if run in sanitize]
        for what, failed in bench.get(f.name, []):
            ev.bench.append(what)
            ev.bench_failed |= failed
        ev.stage_failed = [f"{s} {status[s]}" for s in f.stages if status.get(s, "").startswith(("FAIL", "TIMEOUT"))]
        lines.append(f"  {f.name:<15} {ev.verdict():<8} {ev.detail()}"[:220])
    return lines


def done_ids(text: str) -> list[str]:
    """Ids a pytest run got through (passed, failed, xfail/xpass), not those it skipped: a later run (with the
    CUDA C++ build finished) need not repeat the former, and should give the latter another chance."""
    return [i for i, o in test_outcomes(text).items() if o != "SKIPPED"]


def selection(collected: str) -> list[tuple[Feature, int]]:
    """Per feature, how many of the collected test ids (pytest --collect-only -q lines) it claims."""
    ids = [line.strip() for line in collected.splitlines() if "::" in line and line.startswith("tests/")]
    return [(f, sum(_selects(f, i) for i in ids)) for f in FEATURES]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("features")
    a.add_argument("work", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--status", action="append", default=[], help="STAGE=STATUS (the build's counts)")
    b = sub.add_parser("done-ids")
    b.add_argument("output", type=Path)
    c = sub.add_parser("selection")
    c.add_argument("collected", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "features":
        status = dict(s.split("=", 1) for s in args.status if "=" in s)
        print("\n".join(features(args.work, args.out, status)))
        return 0
    if args.cmd == "done-ids":
        print("\n".join(done_ids(_read(args.output))))
        return 0
    rc = 0
    for f, n in selection(_read(args.collected)):
        missing = n == 0 and not f.optional
        rc |= missing
        print(f"  {f.name:<15} {n:5d} selected tests" + ("  <- none: FAIL" if missing else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
