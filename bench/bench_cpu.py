"""CPU decode speed: trinfer's torch backend against Hugging Face transformers, same prompts, same weights, same run.

A CPU measurement (not a GPU one): the default model (SmolLM2-135M-Instruct, the GGUF dequantized to fp32) is
loaded once; trinfer runs it with `LLM(backend="torch", dtype="float32", device="cpu")` (no prefix caching, no
chunking: each run is a full one-pass prefill, as transformers does), and transformers'
`LlamaForCausalLM` (sdpa attention, its default on the CPU) runs on the very same tensors
(`trinfer.runtime.random_model.hf_model`: q/k/v and gate/up are row views of trinfer's fused matrices, no copy).
trinfer keeps its own copies of the fp32 matrices whose output dim is at least their input dim, stored
column-major (`runtime/torch_backend.py`: its layout for MKL); transformers runs its standard layout.

For each torch thread setting (default: torch's default and 1) and each prompt (a short chat question, ~40 and
~300 tokens of text; token ids given to both, so tokenization is not timed), both systems decode greedily
`--new-tokens` tokens without stopping at EOS, `--reps` times, interleaved (the order alternates each repetition)
after one untimed warm-up each whose time to first token is reported as `cold TTFT`. Times are host
timestamps taken as each token reaches the caller (the engine's own, a `streamer` for transformers):
TTFT = call start -> first token (prefill + first token); decode tokens/s = (new tokens - 1) / (last token -
first token). Reported: medians over the repetitions, the min-max range, and the median of the per-repetition
ratios trinfer / transformers (paired, so a load change hits both sides of a pair alike). Every repetition's
greedy tokens are compared: `match` is the shortest identical prefix over the repetitions.

    python -m bench.bench_cpu [--reps 5] [--new-tokens 64] [--threads default,1] [--out bench/results/cpu]
                              [--model PATH] [--prompts chat,40,300] [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H
from bench.bench_e2e import common_prefix

SYSTEMS = ("trinfer", "transformers")
DEFAULT_OUT = H.REPO_ROOT / "bench" / "results" / "cpu"
STEM = "cpu_decode"

CHAT_QUESTION = "What is the capital of France?"
TEXT_40 = ("The history of the bicycle begins in the early nineteenth century, when inventors in Europe tried to "
           "build a machine that a person could ride without a horse. The first designs had no pedals at all, and "
           "riders")
TEXT_300 = (
    "A small language model running on a laptop has to make every operation count. Each new token needs the "
    "whole network: the embedding of the previous token, then for every layer a normalization, the projections "
    "to queries, keys and values, a rotation that encodes the position, attention over all the keys stored so "
    "far, an output projection, a second normalization and a feed-forward block with a gated activation. At the "
    "end a last normalization and a projection onto the vocabulary give one score per token, and greedy "
    "decoding simply takes the highest. On a processor without a graphics card the matrix products dominate "
    "when the model is large, because every weight has to be read from memory once per token. For a model of "
    "one hundred and thirty-five million parameters the picture changes: the weights are only about half a "
    "gigabyte in single precision, so reading them takes a few tens of milliseconds, and the many small "
    "operations between the products start to matter. Each of them costs a few microseconds of bookkeeping in "
    "the framework before any arithmetic happens, and thirty layers with a dozen such operations each add up "
    "to several milliseconds per token. Careful implementations therefore fuse what they can, avoid copies, "
    "keep the key and value cache in place instead of growing it, and choose the memory layout that the "
    "linear algebra library handles best. The question this benchmark answers is simple: on the same machine, "
    "with the same weights and the same prompt, how many tokens per second does each implementation produce, "
    "and how long does the user wait for the first one? Write a short summary of these ideas in three sentences."
)


def hf_config_dict(config) -> dict[str, Any]:
    """A transformers config.json dict of a trinfer ModelConfig (what `random_model.hf_model` needs)."""
    d = {"architectures": [config.architecture], "model_type": config.model_type,
         "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
         "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
         "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
         "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
         "max_position_embeddings": config.max_position_embeddings,
         "tie_word_embeddings": config.tie_word_embeddings, "hidden_act": "silu", "torch_dtype": "float32"}
    if config.rope_scaling is not None:
        d["rope_scaling"] = dict(config.rope_scaling)
    if config.model_type == "llama":
        d["attention_bias"], d["mlp_bias"] = config.qkv_bias, False
        if config.qkv_bias:
            raise ValueError("bench_cpu: a llama config with q/k/v biases has no transformers twin here")
    if config.model_type == "mistral":
        d["sliding_window"] = None
    if config.model_type == "qwen2":
        d["use_sliding_window"] = False
    return d


def make_prompts(tokenizer, names: list[str]) -> dict[str, list[int]]:
    out = {}
    for name in names:
        if name == "chat":
            text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}],
                                                 add_generation_prompt=True)
            out[name] = tokenizer.encode(text, add_special_tokens=False)
        elif name == "40":
            out[name] = tokenizer.encode(TEXT_40, add_special_tokens=True)
        elif name == "300":
            out[name] = tokenizer.encode(TEXT_300, add_special_tokens=True)
        else:
            raise ValueError(f"--prompts: expected names from chat, 40, 300, got {name!r}")
    return out


def run_trinfer(llm, prompt: list[int], new: int) -> tuple[list[int], float, list[float]]:
    """Greedy decode through the public API; (tokens, call start, per-token host times)."""
    start = time.perf_counter()
    out = llm.generate([prompt], max_new_tokens=new, ignore_eos=True)[0]
    return list(out.token_ids), start, list(out.timings.token_times)


def run_hf(model, prompt: list[int], new: int) -> tuple[list[int], float, list[float]]:
    """transformers `generate`, greedy, no EOS id (every step a plain argmax, as ignore_eos); a streamer
    timestamps each token as it is produced."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.seen_prompt = False

        def put(self, value):
            if self.seen_prompt:
                self.times.append(time.perf_counter())
            self.seen_prompt = True

        def end(self):
            pass

    ids = torch.tensor([prompt], dtype=torch.long)
    clock = Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0, streamer=clock)
    return out[0, len(prompt):].tolist(), start, clock.times


def timing(start: float, times: list[float]) -> dict[str, float | None]:
    ttft = times[0] - start if times else None
    tps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return {"ttft_ms": ttft * 1e3 if ttft is not None else None, "decode_tok_s": tps}


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _range(xs: list[float | None]) -> list[float] | None:
    xs = [x for x in xs if x is not None]
    return [min(xs), max(xs)] if xs else None


def cpu_info() -> dict[str, Any]:
    name = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu_model": name or platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
            "torch_default_threads": torch.get_num_threads(), "mkl": torch.backends.mkl.is_available(),
            "platform": platform.platform()}
    try:
        info["sched_affinity_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return info


def bench_model(device: torch.device, shape: str | None, model: str | None, max_len: int):
    """The model an engine benchmark runs: on a GPU, or when `shape` is given, random weights of `shape` (bf16 on a
    GPU, fp32 on the CPU; context at least `max_len`) with the Triton backend on a GPU and the torch backend on the
    CPU; otherwise the checkpoint `model` (default: the default model) in fp32 on the CPU with the torch backend.
    Returns (LoadedModel, a name for reports, backend)."""
    if device.type == "cuda" or shape is not None:
        from trinfer.runtime.random_model import hf_config_dict, random_model

        shape = shape or "Llama-3.2-1B"
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        raw = hf_config_dict(shape)
        raw["max_position_embeddings"] = max(raw["max_position_embeddings"], max_len)
        loaded = random_model(raw, device=device, dtype=dtype, seed=0)
        return (loaded, f"random weights, shape {shape} ({str(dtype).removeprefix('torch.')})",
                "triton" if device.type == "cuda" else "torch")
    from trinfer.runtime.loader import load_model_files

    if model is None:
        from trinfer.runtime.default_model import default_model_path

        model = default_model_path()
    loaded = load_model_files(model, device="cpu", dtype=torch.float32, progress=False)
    return loaded, f"{os.path.basename(str(model))} (fp32)", "torch"


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def markdown(data: dict[str, Any]) -> str:
    env, f = data["env"], H._fmt
    lines = [f"# {data['title']}", "",
             f"> **CPU measurement** (no GPU): {env['cpu_model']}, {env['cpu_cores']} cores, torch {env['torch']} "
             f"(MKL {env['mkl']}, default threads {env['torch_default_threads']}), transformers "
             f"{env['transformers']}, Python {env['python']}, {env['date']}, commit {env['git_commit']}.", "",
             f"Model: {data['model']} (fp32), {data['new_tokens']} new tokens per run, greedy, EOS ignored; "
             f"{data['reps']} interleaved repetitions per row after one warm-up each; medians (min-max). "
             f"Load average before/after: {data['load_before']} / {data['load_after']}.", "",
             "| threads | prompt | tokens | system | decode tok/s | range | TTFT ms | range | cold TTFT ms | "
             "x transformers (tok/s) | x transformers (TTFT) | match |",
             "|--:|---|--:|---|--:|---|--:|---|--:|--:|--:|---|"]
    for r in data["rows"]:
        rng = (lambda v, s: f"{v[0]:{s}}-{v[1]:{s}}" if v else "")
        ratio_tps = f(r.get("tok_s_ratio_median"), ".2f") if r["system"] == "trinfer" else ""
        ratio_ttft = f(r.get("ttft_ratio_median"), ".2f") if r["system"] == "trinfer" else ""
        lines.append(f"| {r['threads']} | {r['prompt']} | {r['prompt_tokens']} | {r['system']} | "
                     f"{f(r['decode_tok_s'], '.2f')} | {rng(r['decode_tok_s_range'], '.2f')} | "
                     f"{f(r['ttft_ms'], '.0f')} | {rng(r['ttft_ms_range'], '.0f')} | {f(r['cold_ttft_ms'], '.0f')} | "
                     f"{ratio_tps} | {ratio_ttft} | {r['match_tokens']}/{data['new_tokens']} |")
    lines += ["", "x transformers: median over repetitions of trinfer / transformers in the same repetition "
              "(tok/s: above 1 is faster; TTFT: below 1 is faster). match: identical greedy tokens (shortest over "
              "the repetitions). cold TTFT: the first (warm-up) call of each thread setting.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the default model, SmolLM2-135M-Instruct)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per row (default 5)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", default="default,1",
                   help="comma-separated torch intra-op thread counts; 'default' = torch's default here")
    p.add_argument("--prompts", default="chat,40,300", help="subset of chat, 40, 300")
    p.add_argument("--quick", action="store_true", help="2 repetitions, 16 new tokens, chat prompt, 1 thread")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.new_tokens, args.prompts, args.threads = 2, 16, "chat", "1"
    if args.reps < 1 or args.new_tokens < 2:
        p.error("--reps must be >= 1 and --new-tokens >= 2")

    from trinfer.runtime import LLM
    from trinfer.runtime.loader import load_model_files
    from trinfer.runtime.random_model import hf_model

    default_threads = torch.get_num_threads()
    threads = [default_threads if t.strip() == "default" else int(t) for t in args.threads.split(",")]
    threads = list(dict.fromkeys(threads))
    env = {**H.environment(torch.device("cpu"), "cpu"), **cpu_info()}
    if args.model is None:
        from trinfer.runtime.default_model import default_model_path

        args.model = default_model_path()
    t0 = time.perf_counter()
    loaded = load_model_files(args.model, device="cpu", dtype=torch.float32, progress=False)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # No prefix caching and no chunking: every repetition sends the same prompt, and TTFT here means a full
    # prefill in one pass, as transformers does it (bench_prefix_chunk measures what the cache and chunks change).
    llm = LLM(loaded, backend="torch", dtype="float32", device="cpu", max_num_seqs=1, enable_prefix_caching=False,
              max_num_batched_tokens=8192)
    engine_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = hf_model(loaded, hf_config_dict(loaded.config))
    hf.generation_config.eos_token_id = None
    hf_s = time.perf_counter() - t0
    prompts = make_prompts(llm.tokenizer, [s.strip() for s in args.prompts.split(",")])
    print(f"[bench_cpu] {env['cpu_model']} ({env['cpu_cores']} cores), torch {env['torch']}, transformers "
          f"{env['transformers']}; load {load_s:.1f} s, trinfer engine {engine_s:.1f} s, transformers model "
          f"{hf_s:.1f} s; prompts {', '.join(f'{k}: {len(v)} tokens' for k, v in prompts.items())}", flush=True)
    runners = {"trinfer": lambda pr: run_trinfer(llm, pr, args.new_tokens),
               "transformers": lambda pr: run_hf(hf, pr, args.new_tokens)}
    load_before = _load()
    rows: list[dict[str, Any]] = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        cold: dict[str, float | None] = {}
        for name, prompt in prompts.items():
            samples: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
            outputs: dict[str, list[list[int]]] = {s: [] for s in SYSTEMS}
            for rep in range(args.reps + 1):  # rep 0: warm-up, untimed
                order = SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]
                for system in order:
                    tokens, start, times = runners[system](prompt)
                    t = timing(start, times)
                    if rep == 0:
                        cold.setdefault(system, t["ttft_ms"])  # the thread setting's first call
                        continue
                    samples[system].append(t)
                    outputs[system].append(tokens)
            match = min(common_prefix(a, b) for a, b in zip(outputs["trinfer"], outputs["transformers"]))
            ratios_tps = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in
                          zip(samples["trinfer"], samples["transformers"]) if a["decode_tok_s"] and b["decode_tok_s"]]
            ratios_ttft = [a["ttft_ms"] / b["ttft_ms"] for a, b in zip(samples["trinfer"], samples["transformers"])]
            for system in SYSTEMS:
                s = samples[system]
                row = {"threads": n_threads, "prompt": name, "prompt_tokens": len(prompt), "system": system,
                       "new_tokens": args.new_tokens, "reps": args.reps,
                       "decode_tok_s": _median([x["decode_tok_s"] for x in s]),
                       "decode_tok_s_range": _range([x["decode_tok_s"] for x in s]),
                       "ttft_ms": _median([x["ttft_ms"] for x in s]), "ttft_ms_range": _range([x["ttft_ms"] for x in s]),
                       "decode_tok_s_all": [x["decode_tok_s"] for x in s], "ttft_ms_all": [x["ttft_ms"] for x in s],
                       "cold_ttft_ms": cold.get(system) if name == next(iter(prompts)) else None,
                       "match_tokens": match, "tokens_equal": match == args.new_tokens}
                if system == "trinfer":
                    row["tok_s_ratio_median"] = _median(ratios_tps)
                    row["ttft_ratio_median"] = _median(ratios_ttft)
                rows.append(row)
                print(f"[bench_cpu] threads {n_threads} prompt {name} ({len(prompt)} tok) {system:12s} "
                      f"decode {H._fmt(row['decode_tok_s'], '.2f')} tok/s  TTFT {H._fmt(row['ttft_ms'], '.0f')} ms"
                      + (f"  x transformers {H._fmt(row['tok_s_ratio_median'], '.2f')} (tok/s), "
                         f"{H._fmt(row['ttft_ratio_median'], '.2f')} (TTFT)  match {match}/{args.new_tokens}"
                         if system == "trinfer" else ""), flush=True)
    torch.set_num_threads(default_threads)
    data = {"schema": "trinfer-bench-cpu/1", "title": "CPU decode: trinfer (torch backend) vs transformers",
            "mode": "cpu", "env": env, "model": os.path.basename(str(args.model)), "new_tokens": args.new_tokens,
            "reps": args.reps, "threads": threads, "load_before": load_before, "load_after": _load(),
            "setup_s": {"load": load_s, "trinfer_engine": engine_s, "transformers_model": hf_s}, "rows": rows}
    md = markdown(data)
    paths = [H.write_json(args.out / f"{STEM}.json", data)]
    (args.out / f"{STEM}.md").write_text(md)
    paths.append(args.out / f"{STEM}.md")
    print(md)
    print("[bench_cpu] wrote " + ", ".join(str(x) for x in paths), flush=True)
    if not all(r["tokens_equal"] for r in rows):
        print("[bench_cpu] WARNING: greedy tokens differ between trinfer and transformers in some row", flush=True)
    return data


if __name__ == "__main__":
    main()
