"""Prefix caching and chunked prefill: what the cache saves in time to first token, and what chunks save the streams
that are running when a long prompt arrives.

On the CPU (the default without CUDA, or `--device cpu`): the default model (SmolLM2-135M-Instruct, the GGUF
dequantized to fp32; or `--shape` random weights), the torch backend, `--threads` torch threads; results
`prefix_chunk.{json,md}` in bench/results/cpu/. On a GPU (`--device cuda`): random bf16 weights of `--shape`
(default Llama-3.2-1B; without a tokenizer the prompts are random token ids), the Triton backend, CUDA graphs;
results `prefix_chunk.{json,md}` in `--out`. One process; every engine shares the same weights. Two parts
(`--parts`), each written to disk as soon as it is done:

prefix  A request whose first `--prefix-tokens` (2048) tokens an earlier request computed, followed by a question
        of its own (~20 tokens), on two engines: prefix cache on and off (both without chunking, so that they
        differ in the cache only). The cache is filled by one untimed request per engine (which also warms both
        up); then every repetition asks a new question after the same prefix, the two engines alternating which
        goes first. TTFT = add_request -> first token on the host (the engine's own timestamps). Reported:
        medians (min-max), the median of the paired per-repetition ratios off / on, the prompt tokens each
        cached request reused, whether both engines gave the same tokens.
itl     4 streams (short chat questions) decode; after `--lead` (8) tokens each, a `--long-tokens` (8000) prompt
        arrives; the streams go on until `--tail` (8) tokens after the long prompt's first token, then stop. One
        engine per `max_num_batched_tokens` in `--budgets` ("none": one step takes the whole prompt, i.e. no
        chunking), prefix caching off (the part measures chunking; repetitions reuse the engine); the budgets run
        in alternating order per repetition. The streams' inter-token latencies (gaps between consecutive tokens
        reaching the host, engine timestamps) are classed by when they happen: `before` (ended before the long
        prompt arrived: the undisturbed decode step), `during` (overlapping its prefill), `after`; `all` is each
        stream's whole life in the window. Reported per budget: median and max of each class, max/median over
        `all` (the issue's figure) and the stall factor max(during) / median(before), the long prompt's TTFT, and
        its TTFT alone (no streams: what chunking costs a prompt that has the machine to itself).

    python -m bench.bench_prefix_chunk [--reps 3] [--threads 1] [--parts prefix,itl] [--budgets none,2048,512,128,64]
                                  [--prefix-tokens 2048] [--long-tokens 8000] [--out DIR]
    python -m bench.bench_prefix_chunk --quick                         # 1 rep, 512-token prefix, 1500-token prompt
    python -m bench.bench_prefix_chunk --device cuda --shape Llama-3.2-1B --out bench/results/<date>
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H
from bench.bench_cpu import TEXT_300, _load, _median, _range, bench_model, cpu_info

CPU_OUT = H.REPO_ROOT / "bench" / "results" / "cpu"
STREAM_QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "How many days are in a week?",
                    "Write one sentence about the sea."]
BLOCK_SIZE = 16


class Setup:
    """The model and how every engine of the run is made (device, backend, dtype)."""

    def __init__(self, args):
        from trinfer.runtime.engine import resolve_device

        self.device = resolve_device(args.device)
        self.on_gpu = self.device.type == "cuda"
        self.max_len = max(args.prefix_tokens + 128, args.long_tokens + 128)
        self.loaded, self.model_name, self.backend = bench_model(self.device, args.shape, args.model, self.max_len)
        self.tok = self.loaded.tokenizer
        self.vocab = self.loaded.config.vocab_size

    def engine(self, *, num_kv_blocks: int, max_num_batched_tokens: int, enable_prefix_caching: bool, **kw):
        from trinfer.runtime import Engine

        return Engine(self.loaded, device=self.device, backend=self.backend, block_size=BLOCK_SIZE,
                      max_model_len=self.max_len, num_kv_blocks=num_kv_blocks,
                      max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
                      **kw)

    def text(self, n: int, seed: int = 0) -> list[int]:
        """n token ids: English text (BOS first, a passage repeated) with a tokenizer, else random ids."""
        if self.tok is None:
            g = torch.Generator().manual_seed(1000 + seed)
            return torch.randint(3, self.vocab, (n,), generator=g).tolist()
        ids = self.tok.encode(TEXT_300, add_special_tokens=True)
        body = self.tok.encode(" " + TEXT_300, add_special_tokens=False)
        while len(ids) < n:
            ids += body
        return ids[:n]

    def question(self, i: int) -> list[int]:
        if self.tok is None:
            return self.text(18, seed=i + 1)
        return self.tok.encode(f"\n\nQuestion {i + 1}: in {i + 3} words, what is the passage above about?",
                               add_special_tokens=False)

    def chat(self, i: int) -> list[int]:
        if self.tok is None:
            return self.text(40, seed=100 + i)
        text = self.tok.apply_chat_template([{"role": "user", "content": STREAM_QUESTIONS[i]}],
                                            add_generation_prompt=True)
        return self.tok.encode(text, add_special_tokens=False)


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"median": _median(xs), "max": max(xs) if xs else None, "n": len(xs)}


# ---------------------------------------------------------------------------------------------------------
# 1. TTFT with a cached prefix


def run_prefix(setup: Setup, args) -> dict[str, Any]:
    from trinfer.runtime.block_manager import blocks_needed

    prefix = setup.text(args.prefix_tokens)
    suffixes = [setup.question(i) for i in range(args.reps + 1)]
    per_request = blocks_needed(len(prefix) + max(map(len, suffixes)) + args.new_tokens, BLOCK_SIZE)
    engines = {on: setup.engine(max_num_seqs=1, num_kv_blocks=2 * per_request + 8,
                                max_num_batched_tokens=per_request * BLOCK_SIZE, enable_prefix_caching=on)
               for on in (True, False)}

    def ask(eng, suffix):
        eng.add_request(prefix + suffix, max_new_tokens=args.new_tokens, ignore_eos=True)
        final = list(eng.run_until_done())[-1]
        return final.timings.ttft, final.num_cached_tokens, list(final.token_ids)

    cold = {on: ask(engines[on], suffixes[0])[0] for on in (True, False)}  # fills the cache; warms both up
    samples: dict[bool, list] = {True: [], False: []}
    for rep in range(args.reps):
        for on in ((True, False) if rep % 2 == 0 else (False, True)):
            samples[on].append(ask(engines[on], suffixes[rep + 1]))
        print(f"[bench_prefix_chunk] prefix rep {rep}: TTFT cache on {samples[True][-1][0] * 1e3:.1f} ms "
              f"({samples[True][-1][1]} tokens reused), off {samples[False][-1][0] * 1e3:.1f} ms", flush=True)
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


def _stream_tokens(budget: int | None, chat: int, args) -> int:
    """Tokens a stream may decode in one run: one per step of the streams' own prefill and of the long one
    (at least budget - 4 prompt tokens a step), the lead, the tail, a margin."""
    steps = 2 if budget is None else -(-(4 * chat + args.long_tokens) // (budget - 4))
    return args.lead + steps + args.tail + 16


def run_itl_once(eng, setup: Setup, budget: int | None, args) -> dict[str, Any]:
    long = setup.text(args.long_tokens)
    chat = [setup.chat(i) for i in range(4)]
    allowed = _stream_tokens(budget, max(map(len, chat)), args)
    ids = [eng.add_request(c, max_new_tokens=allowed, ignore_eos=True) for c in chat]
    seen = {rid: 0 for rid in ids}
    while min(seen.values()) < args.lead:
        for out in eng.step():
            seen[out.request_id] = len(out.token_ids)
    arrival = time.perf_counter()
    long_id = eng.add_request(long, max_new_tokens=2, ignore_eos=True)
    long_first, tail_from, steps_to_first = None, None, 0
    while True:
        if any(r not in eng._requests for r in ids):
            raise RuntimeError("bench_prefix_chunk: a stream finished before the run's end (too few tokens allowed)")
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
    row = {"long_prompt_tokens": len(long), "long_ttft_ms": (long_first - arrival) * 1e3,
           "steps_to_long_first_token": steps_to_first, **{f"itl_{k}_ms": _stats(v) for k, v in gaps.items()}}
    b, d, a = row["itl_before_ms"], row["itl_during_ms"], row["itl_all_ms"]
    row["max_over_median_all"] = a["max"] / a["median"] if a["median"] else None
    row["stall_factor"] = d["max"] / b["median"] if d["max"] and b["median"] else None
    eng.add_request(long, max_new_tokens=1, ignore_eos=True)  # the same prompt alone
    row["long_alone_ttft_ms"] = list(eng.run_until_done())[-1].timings.ttft * 1e3
    return row


def run_itl(setup: Setup, args) -> list[dict[str, Any]]:
    from trinfer.runtime.block_manager import blocks_needed

    budgets = [None if b.strip() == "none" else int(b) for b in args.budgets.split(",")]
    chat = max(len(setup.chat(i)) for i in range(4))

    def make(b):  # room for the long prompt and the four streams, never a preemption
        blocks = (blocks_needed(args.long_tokens + 2, BLOCK_SIZE)
                  + 4 * blocks_needed(chat + _stream_tokens(b, chat, args), BLOCK_SIZE))
        return setup.engine(max_num_seqs=8, num_kv_blocks=blocks, enable_prefix_caching=False,
                            max_num_batched_tokens=b if b is not None else args.long_tokens + 64)

    engines = {b: make(b) for b in budgets}
    runs: dict[Any, list[dict]] = {b: [] for b in budgets}
    for rep in range(args.reps):
        for budget in (budgets if rep % 2 == 0 else budgets[::-1]):
            r = run_itl_once(engines[budget], setup, budget, args)
            assert engines[budget].num_preemptions == 0
            runs[budget].append(r)
            print(f"[bench_prefix_chunk] itl rep {rep} budget {budget or 'none'}: stream ITL median "
                  f"{r['itl_all_ms']['median']:.1f} ms, max {r['itl_all_ms']['max']:.1f} ms (max/median "
                  f"{r['max_over_median_all']:.1f}); before {r['itl_before_ms']['median']:.1f} ms, during median "
                  f"{H._fmt(r['itl_during_ms']['median'], '.1f')} max {H._fmt(r['itl_during_ms']['max'], '.1f')} "
                  f"ms; long TTFT {r['long_ttft_ms'] / 1e3:.2f} s in {r['steps_to_long_first_token']} steps, alone "
                  f"{r['long_alone_ttft_ms'] / 1e3:.2f} s; load {_load()}", flush=True)
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
    del engines
    return rows


# ---------------------------------------------------------------------------------------------------------
# Report


def markdown(data: dict[str, Any]) -> str:
    env, f = data["env"], H._fmt
    where = (f"**GPU measurement**: {env.get('gpu')}, torch {env['torch']}, CUDA {env.get('cuda')}, triton "
             f"{env.get('triton')}" if data["mode"] == "gpu" else
             f"**CPU measurement** (no GPU): {env['cpu_model']}, {env['cpu_cores']} cores, torch {env['torch']} "
             f"(MKL {env['mkl']}), {data['threads']} torch thread(s)")
    lines = [f"# {data['title']}", "",
             f"> {where}, Python {env['python']}, {env['date']}, commit {env['git_commit']}. Load average "
             f"before/after: {data['load_before']} / {data.get('load_after')} (a shared machine: figures move with "
             f"other jobs; repetitions are interleaved).", "",
             f"Model: {data['model']}, {data['backend']} backend, block size {BLOCK_SIZE}, greedy.", ""]
    p = data.get("prefix")
    if p:
        lines += ["## Time to first token with a cached prefix", "",
                  f"A {p['prefix_tokens']}-token prefix, then a new question of {min(p['suffix_tokens'])}-"
                  f"{max(p['suffix_tokens'])} tokens each repetition; {p['new_tokens']} tokens generated; "
                  f"{p['reps']} repetitions, the two engines alternating first; medians (min-max).", "",
                  "| prefix cache | TTFT ms | range | prompt tokens reused |", "|---|--:|---|--:|",
                  f"| on | {f(p['ttft_ms_cached'], '.1f')} | {p['ttft_ms_cached_range'][0]:.1f}-"
                  f"{p['ttft_ms_cached_range'][1]:.1f} | {min(p['reused_tokens'])}-{max(p['reused_tokens'])} |",
                  f"| off | {f(p['ttft_ms_uncached'], '.1f')} | {p['ttft_ms_uncached_range'][0]:.1f}-"
                  f"{p['ttft_ms_uncached_range'][1]:.1f} | 0 |", "",
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
                  f"medians over {rows[0]['reps']} repetition(s) of each run's median / max. Stall: max ITL during "
                  f"the prefill over the median ITL before it.", "",
                  "| max_num_batched_tokens | ITL before: median | during: median | during: max | all: median | "
                  "all: max | max / median (all) | stall | long prompt TTFT s | steps | long prompt alone: TTFT s |",
                  "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in rows:
            lines.append(f"| {r['budget'] or 'none (no chunking)'} | {f(r['itl_before_median_ms'], '.1f')} | "
                         f"{f(r['itl_during_median_ms'], '.1f')} | {f(r['itl_during_max_ms'], '.1f')} | "
                         f"{f(r['itl_all_median_ms'], '.1f')} | {f(r['itl_all_max_ms'], '.1f')} | "
                         f"{f(r['max_over_median_all'], '.1f')} | {f(r['stall_factor'], '.1f')} | "
                         f"{r['long_ttft_ms'] / 1e3:.2f} | {f(r['steps_to_long_first_token'], '.0f')} | "
                         f"{r['long_alone_ttft_ms'] / 1e3:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _write(data: dict[str, Any], out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data["load_after"] = _load()
    (out / f"{stem}.md").write_text(markdown(data))
    return [H.write_json(out / f"{stem}.json", data), out / f"{stem}.md"]


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--model", default=None, help="CPU: checkpoint (default: the default model)")
    p.add_argument("--shape", default=None,
                   help="random weights of this shape (default on a GPU: Llama-3.2-1B; on the CPU: the default "
                        "model's real weights)")
    p.add_argument("--parts", default="prefix,itl", help="prefix and/or itl")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch intra-op threads (default 1: steadier on a shared machine)")
    p.add_argument("--prefix-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per prefix-part request")
    p.add_argument("--long-tokens", type=int, default=8000)
    p.add_argument("--budgets", default="none,2048,512,128,64",
                   help="max_num_batched_tokens values; none = no chunking")
    p.add_argument("--lead", type=int, default=8)
    p.add_argument("--tail", type=int, default=8)
    p.add_argument("--quick", action="store_true",
                   help="1 repetition, 512-token prefix, 1500-token long prompt, budgets none,64")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/cpu on the CPU, else required")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.prefix_tokens, args.long_tokens, args.budgets = 1, 512, 1500, "none,64"
        args.lead = args.tail = 3
    parts = [x.strip() for x in args.parts.split(",")]
    if not set(parts) <= {"prefix", "itl"} or args.reps < 1 or args.threads < 1:
        p.error("--parts takes prefix and/or itl; --reps and --threads must be >= 1")
    if any(b.strip() != "none" and int(b) <= 4 for b in args.budgets.split(",")):
        p.error("--budgets: each must be > 4 (the four streams' decode tokens come first) or 'none'")

    default_threads = torch.get_num_threads()
    setup = Setup(args)
    if args.out is None:
        if setup.on_gpu:
            p.error("--out is required on a GPU")
        args.out = CPU_OUT
    mode = "gpu" if setup.on_gpu else "cpu"
    stem = "prefix_chunk"
    if not setup.on_gpu:
        torch.set_num_threads(args.threads)
    env = {**H.environment(setup.device, mode), **({} if setup.on_gpu else cpu_info())}
    print(f"[bench_prefix_chunk] {setup.model_name} on {env.get('gpu') or env.get('cpu_model')}, torch {env['torch']}; "
          f"load {_load()}", flush=True)
    data: dict[str, Any] = {"schema": "trinfer-bench-prefix-chunk/1", "title": "Prefix caching and chunked "
                            f"prefill ({mode.upper()})", "mode": mode, "env": env, "model": setup.model_name,
                            "backend": setup.backend, "threads": None if setup.on_gpu else args.threads,
                            "lead": args.lead, "tail": args.tail, "load_before": _load()}
    paths: list[Path] = []
    try:
        for part in parts:  # each part's results are on disk as soon as it is done
            data[part] = run_prefix(setup, args) if part == "prefix" else run_itl(setup, args)
            paths = _write(data, args.out, stem)
    finally:
        torch.set_num_threads(default_threads)
    print(markdown(data))
    print("[bench_prefix_chunk] wrote " + ", ".join(str(x) for x in paths), flush=True)
    return data


if __name__ == "__main__":
    main()
