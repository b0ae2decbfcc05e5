"""Serving on the CPU: what prefix caching saves in time to first token, and what chunked prefill saves the
streams that are running when a long prompt arrives.

A CPU measurement (not a GPU one): the default model (SmolLM2-135M-Instruct, the GGUF dequantized to fp32), the
torch backend, one process. Two parts (`--parts`):

prefix  A request whose first `--prefix-tokens` (2048) tokens an earlier request computed, followed by a question
        of its own (~20 tokens), on two engines sharing the same weights: prefix cache on and off (both without
        chunking, so that they differ in the cache only). The cache is
        filled by one untimed request per engine (which also warms both up); then every repetition asks a new
        question after the same prefix, the two engines alternating which goes first. TTFT = add_request -> first
        token on the host (the engine's own timestamps). Reported: medians (min-max), the median of the paired
        per-repetition ratios off / on, the prompt tokens each cached request reused, whether both engines gave
        the same tokens.
itl     4 streams (short chat questions) decode; after `--lead` (8) tokens each, a `--long-tokens` (8000) prompt
        arrives; the streams go on until `--tail` (8) tokens after the long prompt's first token, then stop. One
        run per `max_num_batched_tokens` in `--budgets` ("none": one step takes the whole prompt, i.e. no
        chunking), the budgets in alternating order per repetition, a fresh engine each run. The streams'
        inter-token latencies (gaps between consecutive tokens reaching the host, engine timestamps) are
        classed by when they happen: `before` (ended before the long prompt arrived: the undisturbed decode
        step), `during` (overlapping its prefill), `after`; `all` is each stream's whole life in the window.
        Reported per budget: median and max of each class, max/median over `all` (the issue's figure) and the
        stall factor max(during) / median(before), the long prompt's TTFT, and its TTFT alone (no streams, a
        fresh engine: what chunking costs a prompt that has the machine to itself).

    python -m bench.bench_serving_cpu [--reps 3] [--threads 1] [--parts prefix,itl] [--budgets none,512,128,32]
                                      [--prefix-tokens 2048] [--long-tokens 8000] [--out bench/results/cpu]
    python -m bench.bench_serving_cpu --quick      # 1 rep, 512-token prefix, 1500-token long prompt
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H
from bench.bench_cpu import TEXT_300, _load, _median, _range, cpu_info

DEFAULT_OUT = H.REPO_ROOT / "bench" / "results" / "cpu"
STEM = "cpu_serving"
STREAM_QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "How many days are in a week?",
                    "Write one sentence about the sea."]


def text_tokens(tokenizer, n: int) -> list[int]:
    """Exactly n token ids of English text (BOS first), from a passage repeated as needed."""
    ids = tokenizer.encode(TEXT_300, add_special_tokens=True)
    body = tokenizer.encode(" " + TEXT_300, add_special_tokens=False)
    while len(ids) < n:
        ids += body
    return ids[:n]


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"median": _median(xs), "max": max(xs) if xs else None, "n": len(xs)}


# ---------------------------------------------------------------------------------------------------------
# 1. TTFT with a cached prefix


def run_prefix(loaded, args) -> dict[str, Any]:
    from trinfer.runtime import Engine
    from trinfer.runtime.block_manager import blocks_needed

    tok = loaded.tokenizer
    prefix = text_tokens(tok, args.prefix_tokens)
    suffixes = [tok.encode(f"\n\nQuestion {i + 1}: in {i + 3} words, what is the passage above about?",
                           add_special_tokens=False) for i in range(args.reps + 1)]
    per_request = blocks_needed(len(prefix) + max(map(len, suffixes)) + args.new_tokens, 16)
    # One step per prefill (no chunking), so that the two engines differ in the prefix cache only.
    engines = {on: Engine(loaded, backend="torch", max_num_seqs=1, num_kv_blocks=2 * per_request + 8,
                          max_num_batched_tokens=per_request * 16, enable_prefix_caching=on) for on in (True, False)}

    def ask(eng, suffix):
        eng.add_request(prefix + suffix, max_new_tokens=args.new_tokens, ignore_eos=True)
        final = list(eng.run_until_done())[-1]
        return final.timings.ttft, final.num_cached_tokens, list(final.token_ids)

    cold = {on: ask(engines[on], suffixes[0])[0] for on in (True, False)}  # fills the cache; warms both up
    samples: dict[bool, list] = {True: [], False: []}
    for rep in range(args.reps):
        for on in ((True, False) if rep % 2 == 0 else (False, True)):
            samples[on].append(ask(engines[on], suffixes[rep + 1]))
        print(f"[bench_serving_cpu] prefix rep {rep}: TTFT cache on {samples[True][-1][0] * 1e3:.0f} ms "
              f"({samples[True][-1][1]} tokens reused), off {samples[False][-1][0] * 1e3:.0f} ms", flush=True)
    ttft = {on: [s[0] * 1e3 for s in samples[on]] for on in (True, False)}
    ratios = [off / on for on, off in zip(ttft[True], ttft[False])]
    return {"prefix_tokens": len(prefix), "suffix_tokens": [len(s) for s in suffixes[1:]],
            "new_tokens": args.new_tokens, "reps": args.reps,
            "ttft_ms_cached": _median(ttft[True]), "ttft_ms_cached_range": _range(ttft[True]),
            "ttft_ms_uncached": _median(ttft[False]), "ttft_ms_uncached_range": _range(ttft[False]),
            "ttft_ms_cached_all": ttft[True], "ttft_ms_uncached_all": ttft[False],
            "cold_ttft_ms": {"cached_engine": cold[True] * 1e3, "uncached_engine": cold[False] * 1e3},
            "speedup_median": _median(ratios), "speedup_all": ratios,
            "reused_tokens": [s[1] for s in samples[True]],
            "tokens_equal": all(a[2] == b[2] for a, b in zip(samples[True], samples[False]))}


# ---------------------------------------------------------------------------------------------------------
# 2. Inter-token latency of running streams while a long prompt is prefilled


def _itl_engine(loaded, budget: int | None, args):
    from trinfer.runtime import Engine

    return Engine(loaded, backend="torch", max_num_seqs=8, num_kv_blocks=args.long_tokens // 16 + 200,
                  max_model_len=args.long_tokens + 64,
                  max_num_batched_tokens=budget if budget is not None else args.long_tokens + 64)


def run_alone(loaded, budget: int | None, args) -> float:
    """TTFT (ms) of the long prompt alone on a fresh engine."""
    eng = _itl_engine(loaded, budget, args)
    eng.add_request(text_tokens(loaded.tokenizer, args.long_tokens), max_new_tokens=1, ignore_eos=True)
    return list(eng.run_until_done())[-1].timings.ttft * 1e3


def run_itl_once(loaded, budget: int | None, args) -> dict[str, Any]:
    tok = loaded.tokenizer
    long = text_tokens(tok, args.long_tokens)
    streams = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
                          add_special_tokens=False) for q in STREAM_QUESTIONS]
    eng = _itl_engine(loaded, budget, args)
    ids = [eng.add_request(p, max_new_tokens=args.long_tokens, ignore_eos=True) for p in streams]
    seen = {rid: 0 for rid in ids}
    while min(seen.values()) < args.lead:
        for out in eng.step():
            seen[out.request_id] = len(out.token_ids)
    arrival = time.perf_counter()
    long_id = eng.add_request(long, max_new_tokens=2, ignore_eos=True)
    long_first, tail_from, steps_to_first = None, None, 0
    while True:
        outs = eng.step()
        if long_first is None:
            steps_to_first += 1
        for out in outs:
            if out.request_id == long_id and long_first is None and out.token_ids:
                long_first = out.timings.token_times[0]
            elif out.request_id in seen:
                seen[out.request_id] = len(out.token_ids)
        if long_first is not None and tail_from is None:
            tail_from = dict(seen)
        if tail_from is not None and all(seen[r] >= tail_from[r] + args.tail for r in ids):
            break
    finals = [eng.abort(r) for r in ids]
    if long_id in eng._requests:
        eng.abort(long_id)
    gaps: dict[str, list[float]] = {"before": [], "during": [], "after": [], "all": []}
    for out in finals:
        times = out.timings.token_times
        for prev, t in zip(times, times[1:]):
            gap = (t - prev) * 1e3
            gaps["all"].append(gap)
            gaps["before" if t <= arrival else "after" if prev >= long_first else "during"].append(gap)
    row = {"budget": budget, "long_prompt_tokens": len(long), "long_ttft_ms": (long_first - arrival) * 1e3,
           "steps_to_long_first_token": steps_to_first,
           **{f"itl_{k}_ms": _stats(v) for k, v in gaps.items()}}
    b, d, a = row["itl_before_ms"], row["itl_during_ms"], row["itl_all_ms"]
    row["max_over_median_all"] = a["max"] / a["median"] if a["median"] else None
    row["stall_factor"] = d["max"] / b["median"] if d["max"] and b["median"] else None
    return row


def run_itl(loaded, args) -> list[dict[str, Any]]:
    budgets = [None if b.strip() == "none" else int(b) for b in args.budgets.split(",")]
    runs: dict[Any, list[dict]] = {b: [] for b in budgets}
    for rep in range(args.reps):
        for budget in (budgets if rep % 2 == 0 else budgets[::-1]):
            r = run_itl_once(loaded, budget, args)
            r["long_alone_ttft_ms"] = run_alone(loaded, budget, args)
            runs[budget].append(r)
            print(f"[bench_serving_cpu] itl rep {rep} budget {budget or 'none'}: stream ITL median "
                  f"{r['itl_all_ms']['median']:.0f} ms, max {r['itl_all_ms']['max']:.0f} ms (max/median "
                  f"{r['max_over_median_all']:.1f}); before {r['itl_before_ms']['median']:.0f} ms, during median "
                  f"{H._fmt(r['itl_during_ms']['median'], '.0f')} max {H._fmt(r['itl_during_ms']['max'], '.0f')} ms; "
                  f"long TTFT {r['long_ttft_ms'] / 1e3:.1f} s in {r['steps_to_long_first_token']} steps, alone "
                  f"{r['long_alone_ttft_ms'] / 1e3:.1f} s; "
                  f"load {_load()}", flush=True)
    rows = []
    for budget, rs in runs.items():
        row = {"budget": budget, "reps": len(rs), "runs": rs}
        for key in ("long_ttft_ms", "long_alone_ttft_ms", "max_over_median_all", "stall_factor",
                    "steps_to_long_first_token"):
            row[key] = _median([r[key] for r in rs])
            row[key + "_range"] = _range([r[key] for r in rs])
        for cls in ("before", "during", "after", "all"):
            row[f"itl_{cls}_median_ms"] = _median([r[f"itl_{cls}_ms"]["median"] for r in rs])
            row[f"itl_{cls}_max_ms"] = _median([r[f"itl_{cls}_ms"]["max"] for r in rs])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Report


def markdown(data: dict[str, Any]) -> str:
    env, f = data["env"], H._fmt
    lines = [f"# {data['title']}", "",
             f"> **CPU measurement** (no GPU): {env['cpu_model']}, {env['cpu_cores']} cores, torch {env['torch']} "
             f"(MKL {env['mkl']}), {data['threads']} torch thread(s), Python {env['python']}, {env['date']}, commit "
             f"{env['git_commit']}. Load average before/after: {data['load_before']} / {data['load_after']} (a "
             f"shared machine: figures move with other jobs; repetitions are interleaved).", "",
             f"Model: {data['model']} (fp32, torch backend), block size 16, greedy.", ""]
    p = data.get("prefix")
    if p:
        lines += ["## Time to first token with a cached prefix", "",
                  f"A {p['prefix_tokens']}-token prefix, then a new question of {min(p['suffix_tokens'])}-"
                  f"{max(p['suffix_tokens'])} tokens each repetition; {p['new_tokens']} tokens generated; "
                  f"{p['reps']} repetitions, the two engines alternating first; medians (min-max).", "",
                  "| prefix cache | TTFT ms | range | prompt tokens reused |", "|---|--:|---|--:|",
                  f"| on | {f(p['ttft_ms_cached'], '.0f')} | {p['ttft_ms_cached_range'][0]:.0f}-"
                  f"{p['ttft_ms_cached_range'][1]:.0f} | {min(p['reused_tokens'])}-{max(p['reused_tokens'])} |",
                  f"| off | {f(p['ttft_ms_uncached'], '.0f')} | {p['ttft_ms_uncached_range'][0]:.0f}-"
                  f"{p['ttft_ms_uncached_range'][1]:.0f} | 0 |", "",
                  f"TTFT off / on: **{f(p['speedup_median'], '.1f')}x** (median of the per-repetition ratios; range "
                  f"{min(p['speedup_all']):.1f}-{max(p['speedup_all']):.1f}). Same tokens with and without the "
                  f"cache: {p['tokens_equal']}.", ""]
    rows = data.get("itl")
    if rows:
        r0 = rows[0]["runs"][0]
        lines += ["## Running streams while a long prompt is prefilled", "",
                  f"4 streams decode; a {r0['long_prompt_tokens']}-token prompt arrives after {data['lead']} tokens "
                  f"each; the streams stop {data['tail']} tokens after its first token. Inter-token latency (ITL) of "
                  f"the streams in ms: `before` its arrival, `during` its prefill, over the streams' `all` window; "
                  f"medians over {rows[0]['reps']} repetition(s) of each run's median / max.", "",
                  "| max_num_batched_tokens | ITL before (median) | ITL during: median | during: max | ITL all: "
                  "median | all: max | max / median (all) | stall: max during / median before | long prompt TTFT s "
                  "| steps | long prompt alone: TTFT s |", "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in rows:
            lines.append(f"| {r['budget'] or 'none (no chunking)'} | {f(r['itl_before_median_ms'], '.0f')} | "
                         f"{f(r['itl_during_median_ms'], '.0f')} | {f(r['itl_during_max_ms'], '.0f')} | "
                         f"{f(r['itl_all_median_ms'], '.0f')} | {f(r['itl_all_max_ms'], '.0f')} | "
                         f"{f(r['max_over_median_all'], '.1f')} | {f(r['stall_factor'], '.1f')} | "
                         f"{r['long_ttft_ms'] / 1e3:.1f} | {f(r['steps_to_long_first_token'], '.0f')} | "
                         f"{r['long_alone_ttft_ms'] / 1e3:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the default model, SmolLM2-135M-Instruct)")
    p.add_argument("--parts", default="prefix,itl", help="prefix and/or itl")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier on a "
                                                          "shared machine)")
    p.add_argument("--prefix-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per prefix-part request")
    p.add_argument("--long-tokens", type=int, default=8000)
    p.add_argument("--budgets", default="none,512,128,32", help="max_num_batched_tokens values; none = no chunking")
    p.add_argument("--lead", type=int, default=8)
    p.add_argument("--tail", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="1 repetition, 512-token prefix, 1500-token long prompt, "
                                                        "budgets none,64")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.prefix_tokens, args.long_tokens, args.budgets = 1, 512, 1500, "none,64"
        args.lead = args.tail = 3
    parts = {x.strip() for x in args.parts.split(",")}
    if not parts <= {"prefix", "itl"} or args.reps < 1 or args.threads < 1:
        p.error("--parts takes prefix and/or itl; --reps and --threads must be >= 1")

    from trinfer.runtime.loader import load_model_files

    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    env = {**H.environment(torch.device("cpu"), "cpu"), **cpu_info()}
    if args.model is None:
        from trinfer.runtime.default_model import default_model_path

        args.model = default_model_path()
    loaded = load_model_files(args.model, device="cpu", dtype=torch.float32, progress=False)
    print(f"[bench_serving_cpu] {env['cpu_model']} ({env['cpu_cores']} cores), torch {env['torch']}, "
          f"{args.threads} thread(s); load {_load()}", flush=True)
    load_before = _load()
    data: dict[str, Any] = {"schema": "trinfer-bench-serving-cpu/1",
                            "title": "CPU serving: prefix caching and chunked prefill", "mode": "cpu", "env": env,
                            "model": os.path.basename(str(args.model)), "threads": args.threads,
                            "lead": args.lead, "tail": args.tail}
    try:
        if "prefix" in parts:
            data["prefix"] = run_prefix(loaded, args)
        if "itl" in parts:
            data["itl"] = run_itl(loaded, args)
    finally:
        torch.set_num_threads(default_threads)
    data["load_before"], data["load_after"] = load_before, _load()
    md = markdown(data)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [H.write_json(args.out / f"{STEM}.json", data)]
    (args.out / f"{STEM}.md").write_text(md)
    paths.append(args.out / f"{STEM}.md")
    print(md)
    print("[bench_serving_cpu] wrote " + ", ".join(str(x) for x in paths), flush=True)
    return data


if __name__ == "__main__":
    main()
