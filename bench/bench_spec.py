"""Speculative decoding: decode tokens/s with and without it, side by side in one run, on prompts whose answer is
grounded in the input and on open-ended chat; and whether the tokens are the same.

CPU (the default without CUDA): the default model (SmolLM2-135M-Instruct, the GGUF dequantized to fp32), the
torch backend, `--threads` torch threads, chat prompts of two kinds:
    grounded   repeat a piece of code; edit it (add type hints: the function written again); summarize a passage
               quoting it; copy a numbered list and add an item
    chat       open questions (a rainy weekend, learning the guitar, a story about a robot)
GPU (`--device cuda`): random bf16 weights of `--shapes` (default Llama-3.2-1B and Llama-3-8B), the Triton backend
with CUDA graphs; the prompts are blocks of random token ids repeated (something for the n-gram lookup to find;
whether random weights continue them decides acceptance) and one block not repeated.

Configurations (`--configs`, comma-separated; `plain` always runs): `ngram:K` (n-gram proposals, at most K tokens
per step, adaptive), `ngram-fixed:K` (K every step, no adaptation), `draft:K:PATH` (a draft model; none that ships
offline pairs with the default model's tokenizer: SmolLM2-360M/1.7B are not on PyPI), `oracle:K` (proposals are
the plain run's own next tokens, so every one is accepted: the verify machinery's ceiling at K, not a proposer).
One engine per configuration, each warmed up once; then `--reps` repetitions, in each of which every prompt runs on
every engine, in an order rotated per repetition. Decode tokens/s is (tokens - 1) / (last token time - first token
time), the engine's own timestamps; EOS ends a request as usual (`--new-tokens` at most). Reported per prompt and
configuration: the median tokens/s, the median of the per-repetition ratios to plain, the acceptance, whether every
run gave plain's tokens; per kind, the geometric mean and the minimum of the ratios. Results `spec.{json,md}` in
bench/results/cpu/ (CPU) or `--out`.

    python -m bench.bench_spec [--reps 3] [--threads 1] [--configs ngram:4,ngram:8,oracle:4] [--new-tokens 160]
    python -m bench.bench_spec --quick                  # 1 rep, 48 tokens, 2 prompts, ngram:4 -> bench/results/tmp/
    python -m bench.bench_spec --device cuda --quick --out DIR   # 1B and 8B shapes, 2 prompts: spec.{json,md} in DIR
    python -m bench.bench_spec --device cuda --batch-invariant --out DIR      # verify rows bitwise decode steps
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H
from bench.bench_cpu import _load, _median, _range, bench_model, cpu_info

CPU_OUT = H.REPO_ROOT / "bench" / "results" / "cpu"

CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''

PASSAGE = ('The old lighthouse keeper kept a log every night. "The sea was calm and the lamp burned bright," he wrote '
           'on the first of May. "A storm came from the west and three ships sought shelter in the bay," he wrote a '
           'week later. "The lamp must never go out," he told his daughter, "because someone is always at sea."')

STEPS = ("1. Open the box.\n2. Take out the parts.\n3. Read the manual.\n4. Attach the legs to the table top.\n"
         "5. Tighten the screws.\n6. Turn the table over.\n7. Check that it is stable.")

# (name, kind, chat message)
CPU_PROMPTS = [
    ("code-repeat", "grounded", "Repeat the following code exactly, then say DONE:\n\n```python\n" + CODE + "```"),
    ("code-edit", "grounded", "Add type hints to this Python function. Write the whole function again.\n\n"
                              "```python\n" + CODE + "```"),
    ("quote", "grounded", "Read this passage and summarize it. Quote the sentences you use exactly, in quotation "
                          "marks.\n\n" + PASSAGE),
    ("list", "grounded", "Here is a numbered list of steps. Copy it, and add one more step at the end.\n" + STEPS),
    ("chat-weekend", "chat", "What do you like to do on a rainy weekend?"),
    ("chat-guitar", "chat", "Give me some tips for learning to play the guitar."),
    ("chat-story", "chat", "Write a short story about a robot who learns to paint."),
]


@dataclass(frozen=True)
class Config:
    name: str
    method: str | None   # None: plain decoding
    k: int = 0
    model: str | None = None
    adaptive: bool = True

    def speculative(self) -> dict | None:
        if self.method is None:
            return None
        method = "ngram" if self.method == "oracle" else self.method
        spec: dict[str, Any] = {"method": method, "num_tokens": self.k,
                                "adaptive": self.adaptive and self.method != "oracle"}
        if self.model is not None:
            spec["model"] = self.model
        return spec


def parse_configs(text: str) -> list[Config]:
    out = [Config("plain", None)]
    for item in filter(None, (x.strip() for x in text.split(","))):
        parts = item.split(":")
        kind = parts[0]
        if kind in ("ngram", "ngram-fixed", "oracle") and len(parts) == 2:
            out.append(Config(item, "ngram" if kind != "oracle" else "oracle", int(parts[1]),
                              adaptive=kind == "ngram"))
        elif kind == "draft" and len(parts) >= 3:
            out.append(Config(item, "draft", int(parts[1]), model=":".join(parts[2:])))
        else:
            raise ValueError(f"--configs: expected ngram:K, ngram-fixed:K, oracle:K or draft:K:PATH, got {item!r}")
    return out


class OracleProposer:
    """Bench only: proposes the plain run's own next tokens (`reference`: prompt + plain output), so every proposal
    is accepted; what speculation would give with a perfect proposer at this k."""

    name, writes_cache = "oracle", False

    def __init__(self):
        self.reference: list[int] = []

    def propose(self, seqs, limits):
        out = []
        for seq, k in zip(seqs, limits):
            n = len(seq.token_ids)
            ok = self.reference[:n] == seq.token_ids
            out.append(self.reference[n: n + k] if ok else [])
        return out

    def prefill(self, seqs, num_tokens):
        pass

    def kv_limit(self, seq):
        return None


class Setup:
    def __init__(self, args, shape: str | None):
        from trinfer.runtime.engine import resolve_device

        self.device = resolve_device(args.device)
        self.on_gpu = self.device.type == "cuda"
        self.max_len = 1024 if args.quick else 2048
        self.loaded, self.model_name, self.backend = bench_model(self.device, shape, args.model, self.max_len)
        self.batch_invariant = args.batch_invariant
        self.tok = self.loaded.tokenizer

    def engines(self, configs: list[Config]) -> tuple[dict[str, Any], dict[str, Any]]:
        """An engine per configuration, and the speculator each runs with. An oracle shares the engine of an n-gram
        configuration with the same k when there is one (the same buffers and graphs; one capture less), its
        speculator swapped in for its runs."""
        from trinfer.runtime import Engine
        from trinfer.runtime.spec import SpeculativeConfig, Speculator

        engines: dict[str, Any] = {}
        for c in sorted(configs, key=lambda c: c.method == "oracle"):
            twin = next((d.name for d in configs if c.method == "oracle" and d.method == "ngram" and d.k == c.k
                         and d.name in engines), None)
            engines[c.name] = engines[twin] if twin is not None else Engine(
                self.loaded, device=self.device, backend=self.backend, max_num_seqs=1, max_model_len=self.max_len,
                enable_prefix_caching=False, speculative=c.speculative(), batch_invariant=self.batch_invariant)
        speculators = {c.name: (Speculator(SpeculativeConfig("ngram", num_tokens=c.k, adaptive=False),
                                           OracleProposer(), self.device.type)
                                if c.method == "oracle" else engines[c.name].speculator) for c in configs}
        return engines, speculators

    def prompts(self, quick: bool) -> list[tuple[str, str, list[int]]]:
        if self.tok is not None:
            chosen = CPU_PROMPTS if not quick else [CPU_PROMPTS[0], CPU_PROMPTS[4]]
            return [(name, kind, self.tok.encode(self.tok.apply_chat_template([{"role": "user", "content": text}],
                                                                              add_generation_prompt=True),
                                                 add_special_tokens=False))
                    for name, kind, text in chosen]
        vocab = self.loaded.config.vocab_size
        g = torch.Generator().manual_seed(0)
        blocks = [torch.randint(3, vocab, (64,), generator=g).tolist() for _ in range(2)]
        prompts = [("repeat-64x4", "grounded", blocks[0] * 4), ("repeat-64x4b", "grounded", blocks[1] * 4),
                   ("random-256", "chat", torch.randint(3, vocab, (256,), generator=g).tolist())]
        return prompts if not quick else [prompts[0], prompts[2]]


def run_once(eng, prompt: list[int], new: int) -> dict[str, Any]:
    before = eng.spec_stats.copy() if eng.spec_stats is not None else None
    launched = eng.decode_stats["launched"]
    eng.add_request(prompt, max_new_tokens=new)
    final = list(eng.run_until_done())[-1]
    row = {"tokens": list(final.token_ids), "tps": final.timings.decode_tokens_per_s,
           "steps": eng.decode_stats["launched"] - launched}
    if before is not None:
        st = eng.spec_stats
        row.update(proposed=st.num_proposed - before.num_proposed, accepted=st.num_accepted - before.num_accepted,
                   verify_steps=st.num_verify_steps - before.num_verify_steps)
    return row


def measure(setup: Setup, configs: list[Config], args) -> list[dict[str, Any]]:
    engines, speculators = setup.engines(configs)
    prompts = setup.prompts(args.quick)
    warm = prompts[0][2]
    for c in configs:  # JIT, allocator, first-call costs
        engines[c.name].speculator = speculators[c.name]
        run_once(engines[c.name], warm, 8)
    rows = []
    for name, kind, ids in prompts:
        runs: dict[str, list[dict]] = {c.name: [] for c in configs}
        for rep in range(args.reps):  # repetition 0 runs plain first: the oracle proposes its tokens
            order = configs[rep % len(configs):] + configs[: rep % len(configs)]
            for c in order:
                eng = engines[c.name]
                eng.speculator = speculators[c.name]
                if c.method == "oracle":
                    eng.speculator.proposer.reference = ids + runs["plain"][0]["tokens"]
                runs[c.name].append(run_once(eng, ids, args.new_tokens))
        plain = runs["plain"]
        ref_tokens = plain[0]["tokens"]
        for c in configs:
            rs = runs[c.name]
            tps = [r["tps"] for r in rs]
            row = {"prompt": name, "kind": kind, "prompt_tokens": len(ids), "config": c.name,
                   "tokens": len(rs[0]["tokens"]), "tps_median": _median(tps), "tps_range": _range(tps),
                   "tps_all": tps, "steps": _median([r["steps"] for r in rs]),
                   "match": all(r["tokens"] == ref_tokens for r in rs)}
            if c.method is not None:
                # Paired per repetition (i-th run of each), then the median.
                ratios = [r["tps"] / p["tps"] for r, p in zip(rs, plain) if r["tps"] and p["tps"]]
                prop, acc = sum(r["proposed"] for r in rs), sum(r["accepted"] for r in rs)
                ver = sum(r["verify_steps"] for r in rs)
                row.update(ratio_median=_median(ratios), ratio_all=ratios, proposed=prop, accepted=acc,
                           acceptance=acc / prop if prop else None, mean_accepted=acc / ver if ver else None,
                           verify_steps=ver / len(rs))
            rows.append(row)
            print(f"[bench_spec] {setup.model_name} | {name:13s} {c.name:14s} {row['tps_median']:7.1f} tok/s"
                  + (f"  x{row['ratio_median']:.2f}  accepted {row['acceptance'] or 0:.2f}" if c.method else "")
                  + f"  tokens {row['tokens']} match {row['match']}", flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, kind, configuration): geometric mean and minimum of the median ratios."""
    out = []
    keys = sorted({(r.get("model", ""), r["kind"], r["config"]) for r in rows if "ratio_median" in r})
    for model, kind, cfg in keys:
        ratios = [r["ratio_median"] for r in rows if (r.get("model", ""), r["kind"], r["config"]) == (model, kind, cfg)
                  and r.get("ratio_median")]
        if ratios:
            out.append({"model": model, "kind": kind, "config": cfg, "prompts": len(ratios),
                        "geomean": math.exp(sum(math.log(x) for x in ratios) / len(ratios)), "min": min(ratios),
                        "all_match": all(r["match"] for r in rows
                                         if (r.get("model", ""), r["kind"], r["config"]) == (model, kind, cfg))})
    return out


def markdown(data: dict[str, Any]) -> str:
    env = data["env"]
    where = env.get("gpu") or env.get("cpu_model") or env.get("cpu")
    lines = [f"# {data['title']}", "",
             f"> **{data['mode'].upper()} measurement** on {where}; torch {env['torch']}, {env.get('date')}, commit "
             f"{env.get('git_commit')}; backend {data['backend']}"
             + (" with batch_invariant=True" if data.get("batch_invariant") else "")
             + (f", {data['threads']} torch thread(s)" if data.get("threads") else "")
             + f"; load average before/after {data['load_before']} / {data.get('load_after')}.", "",
             f"{data['reps']} interleaved repetition(s) per prompt and configuration, at most {data['new_tokens']} "
             "new tokens (EOS ends a request); decode tokens/s medians (min-max); `x plain`: the median of the "
             "per-repetition ratios to plain decoding; `match`: every run gave plain decoding's tokens.", "",
             "## Summary", "", "| model | kind | configuration | prompts | x plain (geomean) | x plain (min) | "
             "all tokens match |", "|---|---|---|--:|--:|--:|---|"]
    for s in data["summary"]:
        lines.append(f"| {s['model']} | {s['kind']} | {s['config']} | {s['prompts']} | **{s['geomean']:.2f}** | "
                     f"{s['min']:.2f} | {s['all_match']} |")
    lines += ["", "## Per prompt", "", "| model | prompt | kind | configuration | tokens | decode tok/s | range | "
              "x plain | accepted / proposed | accepted per verify step | verify steps | steps | match |",
              "|---|---|---|---|--:|--:|---|--:|---|--:|--:|--:|---|"]
    for r in data["rows"]:
        rng = f"{r['tps_range'][0]:.1f}-{r['tps_range'][1]:.1f}" if r.get("tps_range") else ""
        ratio = acc = per_step = verify = ""
        if "ratio_median" in r:
            ratio = f"{r['ratio_median']:.2f}"
            acc = f"{r['accepted']}/{r['proposed']} ({100 * r['acceptance']:.0f}%)" if r["proposed"] else "0/0"
            per_step = f"{r['mean_accepted']:.2f}" if r["mean_accepted"] is not None else ""
            verify = f"{r['verify_steps']:.0f}"
        lines.append(f"| {r.get('model', '')} | {r['prompt']} | {r['kind']} | {r['config']} | {r['tokens']} | "
                     f"{r['tps_median']:.1f} | {rng} | {ratio} | {acc} | {per_step} | {verify} | {r['steps']:.0f} | "
                     f"{r['match']} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--model", default=None, help="CPU: checkpoint (default: the default model)")
    p.add_argument("--shapes", default=None,
                   help="random weights of these shapes, comma-separated (GPU default: Llama-3.2-1B,Llama-3-8B)")
    p.add_argument("--configs", default=None,
                   help="ngram:K, ngram-fixed:K, oracle:K, draft:K:PATH (default ngram:4,ngram:8,oracle:4; quick: "
                        "ngram:4 on the CPU, ngram:4,oracle:4 on a GPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads (default 1)")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--quick", action="store_true", help="1 repetition, 48 new tokens, fewer prompts and configs")
    p.add_argument("--batch-invariant", action="store_true",
                   help="GPU: every engine decodes with batch_invariant=True (verify rows then bitwise a decode "
                        "step's; without it, bf16 cuBLAS products may part from plain decoding at near-ties)")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/cpu on the CPU, else required")
    args = p.parse_args(argv)
    from trinfer.runtime.engine import resolve_device

    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    if args.quick:
        args.reps, args.new_tokens = 1, min(args.new_tokens, 48)
    if args.configs is None:
        args.configs = ("ngram:4,oracle:4" if on_gpu else "ngram:4") if args.quick else "ngram:4,ngram:8,oracle:4"
    configs = parse_configs(args.configs)
    if args.reps < 1 or args.threads < 1 or args.new_tokens < 2:
        p.error("--reps and --threads must be >= 1, --new-tokens >= 2")
    if args.out is None:
        if on_gpu:
            p.error("--out is required on a GPU")
        args.out = CPU_OUT if not args.quick else H.REPO_ROOT / "bench" / "results" / "tmp"  # (git-ignored)
    shapes = ([s.strip() for s in args.shapes.split(",")] if args.shapes else
              ["Llama-3.2-1B", "Llama-3-8B"] if on_gpu else [None])
    mode = "gpu" if on_gpu else "cpu"
    default_threads = torch.get_num_threads()
    if not on_gpu:
        torch.set_num_threads(args.threads)
    env = {**H.environment(device, mode), **({} if on_gpu else cpu_info())}
    data: dict[str, Any] = {"schema": "trinfer-bench-spec/1", "title": f"Speculative decoding ({mode.upper()})",
                            "mode": mode, "env": env, "backend": "triton" if on_gpu else "torch",
                            "threads": None if on_gpu else args.threads, "reps": args.reps,
                            "batch_invariant": args.batch_invariant,
                            "new_tokens": args.new_tokens, "configs": [c.name for c in configs],
                            "load_before": _load(), "rows": [], "summary": []}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "spec"
    try:
        for shape in shapes:
            t0 = time.perf_counter()
            setup = Setup(args, shape)
            print(f"[bench_spec] {setup.model_name} on {env.get('gpu') or env.get('cpu_model')}; load {_load()}",
                  flush=True)
            rows = measure(setup, configs, args)
            for r in rows:
                r["model"] = setup.model_name
            data["rows"] += rows
            data["summary"] = summary(data["rows"])
            data["load_after"] = _load()
            H.write_json(args.out / f"{stem}.json", data)  # on disk after each model
            (args.out / f"{stem}.md").write_text(markdown(data))
            print(f"[bench_spec] {setup.model_name}: {time.perf_counter() - t0:.1f} s", flush=True)
            del setup
            if on_gpu:
                torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(default_threads)
    print(markdown(data))
    print(f"[bench_spec] wrote {args.out / (stem + '.json')}, {args.out / (stem + '.md')}", flush=True)
    return data


if __name__ == "__main__":
    main()
