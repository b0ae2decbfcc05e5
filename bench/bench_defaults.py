"""What the features that are on by default cost a lone request: batch-1 decode and time to first token with prefix
caching and chunked prefill on (the engine's defaults) and off, in the same run.

The rule (DEVELOPERS.md): a feature on by default must not slow batch-1 decode. Prefix caching hashes each block as
it fills and keeps freed blocks in an LRU; chunked prefill cuts a prompt longer than the step budget into several
steps. Four engines share one set of weights:

    defaults        the engine's defaults (prefix caching on, `max_num_batched_tokens` per device: 128 CPU, 512 CUDA)
    no-cache        enable_prefix_caching=False
    no-chunk        max_num_batched_tokens = max_model_len (a prompt is one step)
    off             both off (the baseline)

Every request is cold: its second token id is replaced by one of its own (a request number), so no request's
prefix is in any cache, and each engine computes every prompt in full. Per prompt (a chat question, ~300 tokens of
text, and that text repeated to `--long` tokens; random token ids on a GPU without a tokenizer) and repetition,
the four engines run in a rotated order, each decoding `--new-tokens` tokens greedily with EOS ignored. Reported:
medians (min-max) of decode tokens/s ((tokens - 1) / (last - first token), host times) and TTFT (call -> first
token), and the median of the per-repetition ratios to `off` (paired, so a load change hits both sides); whether
every engine gave the same tokens.

    python -m bench.bench_defaults [--reps 5] [--new-tokens 64] [--long 2000] [--threads 1] [--out DIR]
    python -m bench.bench_defaults --quick                              # 2 reps, 16 tokens, chat and 300 only
    python -m bench.bench_defaults --device cuda --shape Llama-3.2-1B --out bench/results/<date>
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H
from bench.bench_cpu import CHAT_QUESTION, TEXT_300, _load, _median, _range, bench_model, cpu_info, run_trinfer, timing

CPU_OUT = H.REPO_ROOT / "bench" / "results" / "cpu"
STEM = "defaults"
CONFIGS = ("defaults", "no-cache", "no-chunk", "off")


def engine_options(name: str, max_model_len: int) -> dict[str, Any]:
    """The keyword arguments that make configuration `name` (the defaults are the engine's own)."""
    return {"defaults": {}, "no-cache": {"enable_prefix_caching": False},
            "no-chunk": {"max_num_batched_tokens": max_model_len},
            "off": {"enable_prefix_caching": False, "max_num_batched_tokens": max_model_len}}[name]


def make_prompts(tokenizer, vocab_size: int, long: int, names: list[str]) -> dict[str, list[int]]:
    """Token ids of each named prompt: `chat` (the chat question through the template), `300` (TEXT_300's first
    300 tokens) and `long` (TEXT_300 repeated, cut to `long` tokens); random ids of those lengths without a
    tokenizer."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        lengths = {"chat": 24, "300": 300, "long": long}
        return {n: torch.randint(1, vocab_size, (lengths[n],), generator=g).tolist() for n in names}
    text = tokenizer.encode(TEXT_300, add_special_tokens=True)
    chat = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}],
                                                          add_generation_prompt=True), add_special_tokens=False)
    out = {"chat": chat, "300": text[:300], "long": (text + text[1:] * (long // len(text) + 1))[:long]}
    return {n: out[n] for n in names}


def cold(prompt: list[int], n: int, vocab_size: int) -> list[int]:
    """`prompt` with its second token replaced by one that depends on `n` (request n): its first block is unlike
    any other request's, so no prefix cache holds any of it."""
    ids = list(prompt)
    ids[1] = 1 + (n * 7919) % (vocab_size - 1)
    return ids


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--shape", default=None, help="random weights of this shape (default on a GPU: Llama-3.2-1B)")
    p.add_argument("--model", default=None, help="checkpoint on the CPU (default: the default model)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--long", type=int, default=2000, help="tokens of the long prompt (default 2000)")
    p.add_argument("--prompts", default="chat,300,long", help="subset of chat, 300, long")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    p.add_argument("--quick", action="store_true", help="2 repetitions, 16 new tokens, chat and 300")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.new_tokens, args.prompts = 2, 16, "chat,300"
    names = [s.strip() for s in args.prompts.split(",") if s.strip()]
    if args.reps < 1 or args.new_tokens < 2 or args.long < 32 or not set(names) <= {"chat", "300", "long"} or not names:
        p.error("--reps >= 1, --new-tokens >= 2, --long >= 32, --prompts from chat, 300, long")

    from trinfer.runtime import LLM
    from trinfer.runtime.engine import resolve_device

    device = resolve_device(args.device)
    out_dir = args.out or (CPU_OUT if device.type == "cpu" else None)
    if out_dir is None:
        p.error("--out DIR is needed on a GPU (bench/results/cpu holds CPU results only)")
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    max_model_len = max(args.long, 300) + args.new_tokens + 16
    loaded, model_name, backend = bench_model(device, args.shape, args.model, max_model_len)
    llms = {c: LLM(loaded, backend=backend, device=str(device), max_num_seqs=1, max_model_len=max_model_len,
                   **engine_options(c, max_model_len)) for c in CONFIGS}
    budgets = {c: llms[c].engine.scheduler.max_num_batched_tokens for c in CONFIGS}
    vocab = loaded.config.vocab_size
    prompts = make_prompts(llms["off"].tokenizer, vocab, args.long, names)
    env = {**H.environment(device, device.type), **(cpu_info() if device.type == "cpu" else {})}
    print(f"[bench_defaults] {model_name}, {backend} backend on {device}; budgets {budgets}; prompts "
          f"{ {n: len(v) for n, v in prompts.items()} }; load {_load()}", flush=True)
    load_before = _load()
    request = 0
    for c in CONFIGS:  # warm-up, untimed (a request of its own number)
        run_trinfer(llms[c], cold(prompts[names[0]], request, vocab), args.new_tokens)
    rows = []
    for name, prompt in prompts.items():
        samples: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        tokens: dict[str, list[list[int]]] = {c: [] for c in CONFIGS}
        for rep in range(args.reps):
            request += 1
            ids = cold(prompt, request, vocab)
            order = CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]
            for c in order:
                toks, start, times = run_trinfer(llms[c], ids, args.new_tokens)
                samples[c].append(timing(start, times))
                tokens[c].append(toks)
        same = all(tokens[c] == tokens["off"] for c in CONFIGS)
        for c in CONFIGS:
            s, base = samples[c], samples["off"]
            row = {"prompt": name, "prompt_tokens": len(prompt), "config": c, "budget": budgets[c],
                   "prefix_caching": llms[c].engine.scheduler.block_manager.enable_prefix_caching,
                   "decode_tok_s": _median([x["decode_tok_s"] for x in s]),
                   "decode_tok_s_range": _range([x["decode_tok_s"] for x in s]),
                   "ttft_ms": _median([x["ttft_ms"] for x in s]), "ttft_ms_range": _range([x["ttft_ms"] for x in s]),
                   "decode_tok_s_all": [x["decode_tok_s"] for x in s], "ttft_ms_all": [x["ttft_ms"] for x in s],
                   "tok_s_vs_off": _median([a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(s, base)
                                            if a["decode_tok_s"] and b["decode_tok_s"]]),
                   "ttft_vs_off": _median([a["ttft_ms"] / b["ttft_ms"] for a, b in zip(s, base)]),
                   "tokens_equal": same}
            rows.append(row)
            print(f"[bench_defaults] {name} ({len(prompt)} tok) {c:9s} decode {H._fmt(row['decode_tok_s'], '.2f')} "
                  f"tok/s ({H._fmt(row['tok_s_vs_off'], '.3f')}x off)  TTFT {H._fmt(row['ttft_ms'], '.1f')} ms "
                  f"({H._fmt(row['ttft_vs_off'], '.3f')}x off)  same tokens {same}", flush=True)
    hits = {c: llms[c].engine.prefix_cache_stats.hit_tokens for c in CONFIGS}
    torch.set_num_threads(threads_before)
    data = {"schema": "trinfer-bench-defaults/1",
            "title": "Default features (prefix caching, chunked prefill) on and off: a lone request",
            "mode": device.type, "env": env, "model": model_name, "backend": backend,
            "threads": args.threads if device.type == "cpu" else None, "reps": args.reps,
            "new_tokens": args.new_tokens, "budgets": budgets, "cache_hit_tokens": hits,
            "load_before": load_before, "load_after": _load(), "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    H.write_json(out_dir / f"{STEM}.json", data)
    (out_dir / f"{STEM}.md").write_text(markdown(data))
    print(f"[bench_defaults] wrote {out_dir / (STEM + '.json')}, {out_dir / (STEM + '.md')}", flush=True)
    return data


def markdown(data: dict[str, Any]) -> str:
    env, f = data["env"], H._fmt
    where = (f"**CPU measurement** (no GPU): {env.get('cpu_model')}, {env.get('cpu_cores')} cores, "
             f"{data['threads']} torch thread(s)" if data["mode"] == "cpu"
             else f"**GPU measurement**: {env.get('gpu')}")
    rng = (lambda v, s: f"{v[0]:{s}}-{v[1]:{s}}" if v else "")
    lines = [f"# {data['title']}", "",
             f"> {where}; torch {env.get('torch')}, {env.get('date')}, commit {env.get('git_commit')}. Load average "
             f"before/after: {data['load_before']} / {data['load_after']}.", "",
             f"Model: {data['model']}, {data['backend']} backend, batch 1, {data['new_tokens']} new tokens, greedy, "
             f"EOS ignored; {data['reps']} repetitions, the four engines in rotated order; every request cold (no "
             f"prefix hit: cache hits {data['cache_hit_tokens']}). Medians (min-max); `x off`: median of the "
             f"per-repetition ratios to the engine with both features off.", "",
             "| prompt | tokens | configuration | step budget | prefix cache | decode tok/s | range | x off | "
             "TTFT ms | range | x off | same tokens |",
             "|---|--:|---|--:|---|--:|---|--:|--:|---|--:|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['prompt']} | {r['prompt_tokens']} | {r['config']} | {r['budget']} | "
                     f"{'on' if r['prefix_caching'] else 'off'} | {f(r['decode_tok_s'], '.2f')} | "
                     f"{rng(r['decode_tok_s_range'], '.2f')} | {f(r['tok_s_vs_off'], '.3f')} | "
                     f"{f(r['ttft_ms'], '.1f')} | {rng(r['ttft_ms_range'], '.1f')} | {f(r['ttft_vs_off'], '.3f')} | "
                     f"{r['tokens_equal']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
