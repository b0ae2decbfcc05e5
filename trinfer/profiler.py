"""`trinfer profile`: where the time of a prefill and of a decode step goes.

    trinfer profile --shape Llama-3.2-1B --batch 1 --context 1024 --steps 32       # random weights, no files
    trinfer profile --model path/to/hf_dir_or.gguf --batch 8 --context 512

Runs the engine as it serves requests (a batch of `--batch` prompts of `--context` random tokens, then
`--steps` decode steps), after a warm-up that JIT-compiles the kernels, under `torch.profiler`, and reports:
- time to first token (the prefill step) and per-token latencies of the decode steps (median, p90), tokens/s;
- per kernel (on a GPU: device time of every kernel, grouped by name) per decode step and for the prefill,
  and its share of the device time;
- the host overhead: the share of each step's wall time the device sits idle (Python, launches, syncs);
- Chrome/Perfetto traces (`trace_prefill.json`, `trace_decode.json`; open them in ui.perfetto.dev) and a
  `profile.json` summary, in `--out` (default `profile_out/`).
With `--speculative ngram|draft` the decode steps include verify passes (each prompt is then a random block of
tokens repeated, so that n-gram lookups find something): the report says how many of the steps verified
proposals, their acceptance, and the tokens per step.
On a machine without CUDA it runs the torch backend on the CPU (operator times instead of kernel times) and
says that GPU figures need a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

CPU_NOTE = ("no CUDA GPU: this profile ran the torch backend on the CPU; its times are CPU operator times and "
            "say nothing about GPU kernels (GPU figures need a GPU)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="Hugging Face model directory or .gguf file")
    src.add_argument("--shape", default=None,
                     help="random weights of a named shape (SmolLM2-135M, Llama-3.2-1B, Llama-3-8B, Qwen3-0.6B, "
                          "Qwen3-8B, tiny, tiny-qwen3); "
                          "default: the default model (SmolLM2-135M-Instruct), or where it is not installed "
                          "random Llama-3.2-1B weights on a GPU and 'tiny' on a CPU")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (1)")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per sequence, prefilled first (512)")
    p.add_argument("--steps", type=int, default=16, help="decode steps profiled (16)")
    p.add_argument("--warmup-steps", type=int, default=3, help="decode steps of the warm-up run (3)")
    p.add_argument("--out", type=Path, default=Path("profile_out"), help="folder for traces and profile.json")
    p.add_argument("--backend", default=None, metavar="NAME",
                   help="kernels: triton, torch, cuda or cuda:FAMILY[+FAMILY] as for 'trinfer generate' "
                        "(default: triton on CUDA, torch on the CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--top", type=int, default=15, help="kernels listed per phase (15)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="decode steps replayed from CUDA graphs (default on; CUDA with triton/cuda backends)")


def _validate(args) -> None:
    for name in ("batch", "context", "steps"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name}: expected an int >= 1, got {v}")
    if args.warmup_steps < 1:
        raise ValueError(f"--warmup-steps: expected an int >= 1, got {args.warmup_steps}")


def _engine(args):
    from trinfer.runtime import Engine
    from trinfer.runtime.block_manager import blocks_needed
    from trinfer.runtime.engine import resolve_device, resolve_dtype
    from trinfer.runtime.random_model import hf_config_dict, random_model

    device = resolve_device(args.device)
    dtype = resolve_dtype(None if args.dtype == "auto" else args.dtype, device)
    max_len = args.context + max(args.steps, args.warmup_steps) + 2
    blocks = args.batch * (blocks_needed(max_len, 16) + 1) + 8
    budget = getattr(args, "max_num_batched_tokens", None) or args.batch * max_len
    from trinfer.cli import speculative_option

    spec = speculative_option(args) if hasattr(args, "speculative") else None
    if spec is not None:  # a verify pass may fill the sequence's blocks up to k tokens further
        blocks += args.batch * blocks_needed(17, 16)
    kw = dict(device=device, backend=args.backend, max_num_seqs=args.batch, num_kv_blocks=blocks,
              max_num_batched_tokens=budget, cuda_graphs=getattr(args, "cuda_graphs", True),
              enable_prefix_caching=getattr(args, "prefix_caching", True), speculative=spec)
    shape, note = args.shape, None
    if args.model is None and shape is None:
        from trinfer.runtime.default_model import default_model_path

        try:
            args.model = default_model_path()
        except FileNotFoundError as exc:
            shape = "Llama-3.2-1B" if device.type == "cuda" else "tiny"
            note = f"default model not available ({str(exc).splitlines()[0]}); profiling random weights of {shape}"
    if shape is not None:
        raw = hf_config_dict(shape)
        raw["max_position_embeddings"] = max(raw["max_position_embeddings"], max_len + 8)
        loaded = random_model(raw, device=device, dtype=dtype)
        source = f"random weights, shape {shape}"
        return Engine(loaded, max_model_len=max_len + 4, **kw), source, note
    from trinfer.runtime.loader import load_model_files

    path = args.model
    loaded = load_model_files(path, device=device, dtype=dtype)
    if max_len + 4 > loaded.config.max_position_embeddings:
        raise ValueError(f"--context {args.context} + steps exceed the model's context of "
                         f"{loaded.config.max_position_embeddings} tokens")
    return Engine(loaded, max_model_len=max_len + 4, **kw), f"{path}", note


def _prompts(engine, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """Random token ids; with speculative decoding, a random block of up to 64 tokens repeated at least 4 times
    (something for an n-gram lookup to find)."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    if engine.speculator is None:
        return torch.randint(min(3, vocab - 1), vocab, (batch, length), generator=g).tolist()
    block = torch.randint(min(3, vocab - 1), vocab, (batch, max(1, min(64, length // 4))), generator=g).tolist()
    return [(b * (length // len(b) + 1))[:length] for b in block]


def _add(engine, prompts, new_tokens: int) -> list:
    from trinfer.runtime import SamplingParams

    return [engine.add_request(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for p in prompts]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (device busy time; kernels may overlap)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def kernel_table(prof, on_gpu: bool, per: int) -> tuple[list[dict[str, Any]], float]:
    """Per-name rows {name, calls, us, pct} (per step when `per` > 1) and the busy time in us (per step).

    On a GPU: device kernels (and memcpy/memset) from the trace. On a CPU: top-level operators' CPU time.
    """
    from torch.autograd import DeviceType

    by_name: dict[str, list[float]] = {}
    intervals: list[tuple[float, float]] = []
    for e in prof.events():
        if on_gpu:
            if e.device_type != DeviceType.CUDA:
                continue
            start, end = e.time_range.start, e.time_range.end
        else:
            if e.device_type != DeviceType.CPU or e.cpu_parent is not None or e.name.startswith("ProfilerStep"):
                continue
            if not (e.name.startswith("aten::") or e.name.startswith("trinfer::")):
                continue
            start, end = e.time_range.start, e.time_range.end
        by_name.setdefault(e.name, []).append(end - start)
        intervals.append((start, end))
    busy = _union_us(intervals) / per
    total = sum(sum(v) for v in by_name.values()) / per or 1.0
    rows = [{"name": n, "calls": len(v) / per, "us": sum(v) / per, "pct": 100.0 * sum(v) / per / total}
            for n, v in by_name.items()]
    rows.sort(key=lambda r: -r["us"])
    return rows, busy


def run(args) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    _validate(args)
    engine, source, note = _engine(args)
    device = engine.device
    on_gpu = device.type == "cuda"
    notes = ([] if on_gpu else [CPU_NOTE]) + ([note] if note else [])
    prompts = _prompts(engine, args.batch, args.context)

    # Warm-up: the same shapes once (Triton JIT, cuBLAS handles, allocator), untimed; other tokens, so that the
    # profiled prefill computes its prompts rather than finding them in the prefix cache.
    _add(engine, _prompts(engine, args.batch, args.context, seed=1), args.warmup_steps + 1)
    for _ in engine.run_until_done():
        pass
    _sync(device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    args.out.mkdir(parents=True, exist_ok=True)
    ids = _add(engine, prompts, args.steps + 1)
    # Prefill: the steps until every sequence has its first token (one step unless --max-num-batched-tokens
    # chunks the batch's prompts).
    with profile(activities=activities) as prof_prefill:
        t0 = time.perf_counter()
        outs, n_prefill_steps = [], 0
        while len({o.request_id for o in outs}) < len(ids) and engine.has_unfinished():
            outs += engine.step()
            n_prefill_steps += 1
        _sync(device)
        t_prefill = time.perf_counter() - t0
    if n_prefill_steps > 1:
        notes.append(f"the prompts were prefilled in {n_prefill_steps} steps (max_num_batched_tokens "
                     f"{engine.scheduler.max_num_batched_tokens}); the prefill figures cover all of them")
    step_times: list[float] = []
    replays0 = engine.runner.num_graph_replays
    stats0 = dict(engine.decode_stats)
    spec0 = engine.spec_stats.copy() if engine.spec_stats is not None else None
    n_tokens = 0
    # Decode as the engine serves: no sync between steps (each step() launches the next step before it waits
    # for the previous one's tokens), one at the end; a step's wall time is then its time per token.
    with profile(activities=activities) as prof_decode:
        t_decode = time.perf_counter()
        for _ in range(args.steps):
            if not engine.has_unfinished():
                break
            t0 = time.perf_counter()
            n_tokens += sum(len(o.delta_token_ids) for o in engine.step())
            step_times.append(time.perf_counter() - t0)
        _sync(device)
        t_decode = time.perf_counter() - t_decode
    for _ in engine.run_until_done():  # anything left (should be nothing)
        pass
    n_steps = len(step_times)
    prefill_rows, prefill_busy = kernel_table(prof_prefill, on_gpu, 1)
    decode_rows, decode_busy = kernel_table(prof_decode, on_gpu, max(n_steps, 1))
    trace_prefill, trace_decode = args.out / "trace_prefill.json", args.out / "trace_decode.json"
    prof_prefill.export_chrome_trace(str(trace_prefill))
    prof_decode.export_chrome_trace(str(trace_decode))

    step_us = [t * 1e6 for t in step_times]
    med = _quantile(step_us, 0.5)
    mean_step = t_decode * 1e6 / n_steps if n_steps else None
    runner = engine.runner
    summary = {
        "schema": "trinfer-profile/1",
        "source": source,
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "backend": engine.backend_name,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "batch": args.batch, "context": args.context, "steps": n_steps,
        "ttft_ms": t_prefill * 1e3,
        "decode_step_ms": {"median": med / 1e3 if med is not None else None,
                           "p90": (_quantile(step_us, 0.9) or 0) / 1e3 if step_us else None,
                           "mean": mean_step / 1e3 if mean_step else None},
        # Tokens the profiled steps returned (several per step and sequence in verify passes), per second.
        "tokens_per_s": n_tokens / t_decode if step_times else None,
        "tokens_per_step": n_tokens / n_steps if n_steps else None,
        # Device busy (kernels' union) against wall time: the rest is host overhead (Python, launches, syncs).
        "prefill": {"wall_us": t_prefill * 1e6, "busy_us": prefill_busy,
                    "host_overhead_pct": 100.0 * max(0.0, 1 - prefill_busy / (t_prefill * 1e6)) if on_gpu else None,
                    "kernels": prefill_rows},
        "decode_per_step": {"wall_us": mean_step, "busy_us": decode_busy,
                            "host_overhead_pct": (100.0 * max(0.0, 1 - decode_busy / mean_step)
                                                  if on_gpu and mean_step else None),
                            "kernels": decode_rows},
        "cuda_graphs": runner.graph_summary() if on_gpu else None,
        "graph_capture_s": runner.graph_capture_s,
        "graph_memory_mib": runner.graph_memory_bytes / 2**20 if runner.graph_memory_bytes is not None else None,
        "decode_graph_replays": runner.num_graph_replays - replays0,
        "decode_stats": dict(engine.decode_stats),
        "verify_steps": engine.decode_stats["verify"] - stats0["verify"],
        "speculative": None if spec0 is None else {
            "config": engine.speculator.config.describe(),
            "profiled": _spec_delta(engine.spec_stats, spec0).as_dict()},
        "prefill_steps": n_prefill_steps,
        "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
        "prefix_caching": engine.scheduler.block_manager.enable_prefix_caching,
        "prefix_cache": engine.prefix_cache_stats.as_dict(),
        "prefix_cache_summary": engine.prefix_cache_summary(),
        "traces": [str(trace_prefill), str(trace_decode)],
        "notes": notes,
    }
    (args.out / "profile.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _spec_delta(now, before):
    """The speculative statistics gathered since `before` (SpecDecodeStats)."""
    from trinfer.runtime.spec import SpecDecodeStats

    return SpecDecodeStats(now.num_verify_steps - before.num_verify_steps, now.num_proposed - before.num_proposed,
                           now.num_accepted - before.num_accepted)


def report(summary: dict[str, Any], top: int = 15) -> str:
    s = summary
    unit = "device" if s["device"] != "cpu" else "CPU op"
    d = s["decode_per_step"]
    lines = [f"trinfer profile: {s['source']} on {s['device']} ({s['backend']} backend, {s['dtype']}), "
             f"batch {s['batch']}, context {s['context']}, {s['steps']} decode steps"]
    for note in s["notes"]:
        lines.append(f"NOTE: {note}")
    if s.get("cuda_graphs"):
        lines.append(f"{s['cuda_graphs']}; {s['decode_graph_replays']} of {s['steps']} decode steps replayed")
    if s.get("speculative"):
        sp = s["speculative"]["profiled"]
        lines.append(f"speculative {s['speculative']['config']}: {s['verify_steps']} of {s['steps']} decode steps were "
                     f"verify passes; {sp['accepted']}/{sp['proposed']} proposed tokens accepted "
                     f"({100 * sp['acceptance_rate']:.1f}%), {sp['mean_accepted_length']:.2f} per verify step; "
                     f"{s['tokens_per_step']:.2f} tokens per step")
    lines.append(f"{s['prefix_cache_summary']} in the warm-up and profiled requests; at most "
                 f"{s['max_num_batched_tokens']} tokens per step, prefill in {s['prefill_steps']} step(s)")
    med, p90 = s["decode_step_ms"]["median"], s["decode_step_ms"]["p90"]
    tps = s["tokens_per_s"]
    per = "per-step latency (a step may emit several tokens)" if s.get("speculative") else "per-token latency"
    lines.append(f"time to first token {s['ttft_ms']:.2f} ms; {per} median "
                 f"{med:.3f} ms, p90 {p90:.3f} ms; {tps:.1f} tokens/s" if med is not None else
                 f"time to first token {s['ttft_ms']:.2f} ms; no decode step ran")
    for title, phase in (("prefill", s["prefill"]), ("decode (per step)", d)):
        ho = phase["host_overhead_pct"]
        busy = f"{unit} busy {phase['busy_us']:.1f} us of {phase['wall_us']:.1f} us wall" if phase["wall_us"] else ""
        lines.append("")
        lines.append(f"{title}: {busy}" + (f"; host overhead {ho:.1f}% (device idle)" if ho is not None else ""))
        lines.append(f"  {'kernel' if unit == 'device' else 'operator':<60} {'calls':>7} {'us':>10} {'%':>6}")
        for r in phase["kernels"][:top]:
            name = r["name"] if len(r["name"]) <= 60 else r["name"][:57] + "..."
            lines.append(f"  {name:<60} {r['calls']:>7.1f} {r['us']:>10.1f} {r['pct']:>6.1f}")
        if len(phase["kernels"]) > top:
            lines.append(f"  ... {len(phase['kernels']) - top} more in profile.json")
    lines.append("")
    lines.append("traces (open in ui.perfetto.dev or chrome://tracing): " + ", ".join(s["traces"]))
    return "\n".join(lines)


PROFILE_BUDGET_HELP = "batch x (context + steps): the whole batch's prefill in one step"


def main(argv: list[str] | None = None) -> int:
    from trinfer.cli import add_scheduling_arguments, add_speculative_arguments

    p = argparse.ArgumentParser(prog="trinfer profile", description=__doc__.splitlines()[0])
    add_arguments(p)
    add_scheduling_arguments(p, default_budget=PROFILE_BUDGET_HELP)
    add_speculative_arguments(p)
    args = p.parse_args(argv)
    return run_cli(args)


def run_cli(args) -> int:
    summary = run(args)
    print(report(summary, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
