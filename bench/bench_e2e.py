"""End-to-end greedy decoding: trinfer against Hugging Face transformers, on identical random weights.

Models of real shapes (Llama-3.2-1B, Llama-3-8B, Qwen3-8B; bf16) are made on the GPU in a second from a seed
(`trinfer.runtime.random_model`): no checkpoint is written or read. transformers runs on the very same
tensors (views of trinfer's fused weights). For each shape, batch and prompt length, three systems:

    trinfer       LLM/Engine, Triton backend (the torch backend on a CPU), greedy, EOS ignored; on CUDA the
                  decode steps replay CUDA graphs captured when the engine is built (--no-cuda-graphs: eager),
                  the capture's time and memory go in the row's note
    hf_eager      transformers `generate` (greedy, dynamic cache, sdpa attention), eager
    hf_compile    transformers `generate` with a static cache, which compiles the decode step with
                  torch.compile(mode="reduce-overhead", fullgraph=True): the gpt-fast recipe

Each system runs once to warm up (JIT, compile, CUDA-graph capture) and once timed. Per-token times are
host timestamps taken when each token reaches the host (the engine's own, or a `streamer` for transformers):
TTFT is the prompt's prefill plus the first token; TPOT the gap between later tokens (median, p90); tokens/s
counts every sequence of the batch. Bytes per decode step = every weight read once (the LM head in full, one
embedding row per sequence) + the K/V of the batch at its mean context; `floor` = those bytes over the copy
bandwidth measured in the same run; `% floor` = floor / TPOT: the fraction of memory bandwidth achieved.
The greedy tokens of every system are compared with hf_eager's: `match` is the shortest identical prefix over
the batch (random weights give small logit margins; in bf16 two correct implementations can part at a
near-tie after some tokens, in fp32 they agree).

`--quantize int8|int4` runs trinfer on the same weights quantized at load (its decode products on the `linear`
kernel; its step bytes count the quantized matrices), the transformers systems on the dense ones;
`--batch-invariant` runs every trinfer decode product on `linear`.

    python -m bench.bench_e2e [--quick] [--out DIR] [--budget-s S] [--cpu-smoke] [--quantize int4] [--batch-invariant]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H

SYSTEMS = ("trinfer", "hf_eager", "hf_compile")
FULL = dict(shapes=("Llama-3.2-1B", "Llama-3-8B", "Qwen3-8B"), batches=(1, 8, 64), prompts=(128, 512, 2048, 8192),
            new=128)
QUICK = dict(shapes=("Llama-3.2-1B", "Llama-3-8B"), batches=(1,), prompts=(512,), new=32)
SMOKE = dict(shapes=("tiny",), batches=(1, 2), prompts=(8,), new=4)
# Rough torch.compile + CUDA-graph capture cost of hf_compile's warm-up (an H200-class machine), used only to
# decide whether it fits the remaining --budget-s.
COMPILE_ESTIMATE_S = {"Llama-3.2-1B": 60.0, "Llama-3-8B": 110.0, "Qwen3-8B": 120.0, "tiny": 30.0}

ROW_KEYS = ("shape", "batch", "prompt_len", "new_tokens", "system", "status", "error", "ttft_ms", "tpot_median_ms",
            "tpot_p90_ms", "tokens_per_s", "step_bytes", "floor_ms", "achieved_gbps", "pct_floor", "match_vs",
            "match_tokens", "note", "dtype", "timer", "mode", "date", "gpu", "torch", "cuda", "triton",
            "transformers", "git_commit")


def step_bytes(config, weight_bytes: int, batch: int, context: float, elem: int) -> int:
    """Bytes one decode step must read: all weights once (the input embedding only for the batch's rows when
    it is not tied to the LM head) plus every sequence's K and V."""
    w = weight_bytes
    if not config.tie_word_embeddings:
        w -= config.vocab_size * config.hidden_size * elem - batch * config.hidden_size * elem
    kv = 2 * config.num_layers * context * config.num_kv_heads * config.head_dim * elem * batch
    return int(w + kv)


def tpot_stats(token_times: list[float]) -> tuple[float | None, float | None]:
    """Median and p90 of the gaps between consecutive tokens (seconds), first token excluded."""
    gaps = sorted(b - a for a, b in zip(token_times, token_times[1:]))
    if not gaps:
        return None, None
    return H.quantile(gaps, 0.5), H.quantile(gaps, 0.9)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _clock(device: torch.device):
    """A transformers streamer that timestamps each generated token (its first `put` is the prompt)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self._seen_prompt = False

        def put(self, value):
            if not self._seen_prompt:
                self._seen_prompt = True
                return
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return Clock()


class _Shape:
    """One random model, its trinfer engine and its transformers twin, made once per shape."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, max_batch: int, max_len: int,
                 backend: str, cuda_graphs: bool = True, quantize: str | None = None, batch_invariant: bool = False):
        from trinfer.runtime import Engine
        from trinfer.runtime.block_manager import blocks_needed
        from trinfer.runtime.random_model import hf_config_dict, random_model, weight_bytes

        self.name = name
        raw = hf_config_dict(name)
        raw["max_position_embeddings"] = max(raw["max_position_embeddings"], max_len + 16)
        self.raw = raw
        t0 = time.perf_counter()
        self.loaded = random_model(raw, device=device, dtype=dtype, seed=0)
        self.config = self.loaded.config
        self.weight_bytes = weight_bytes(self.config, dtype)
        engine_model, self.trinfer_weight_bytes = self.loaded, self.weight_bytes
        if quantize is not None:  # trinfer's copy quantized; transformers keeps the dense weights
            from trinfer.runtime.quantization import quantize_weights

            weights = quantize_weights(dict(self.loaded.weights), quantize)
            engine_model = dataclasses.replace(self.loaded, weights=weights)
            self.trinfer_weight_bytes = sum(w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
                                            for w in weights.values())
        blocks = max_batch * (blocks_needed(max_len, 16) + 1) + 16
        # No prefix caching: the timed run repeats the warm-up's prompts, and TTFT here means a full prefill (as
        # transformers does it); one step prefills the whole batch.
        self.engine = Engine(engine_model, device=device, backend=backend, max_num_seqs=max_batch,
                             num_kv_blocks=blocks, max_model_len=max_len + 8,
                             max_num_batched_tokens=max_batch * max_len, cuda_graphs=cuda_graphs,
                             batch_invariant=batch_invariant, enable_prefix_caching=False)
        self.build_s = time.perf_counter() - t0  # CUDA-graph capture included (runner.graph_capture_s)
        self._hf = None

    def hf(self):
        if self._hf is None:
            from trinfer.runtime.random_model import hf_model

            self._hf = hf_model(self.loaded, self.raw)
        return self._hf


def _prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def run_trinfer(shape: _Shape, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float, list[float]]:
    from trinfer.runtime import SamplingParams

    eng = shape.engine
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=new, ignore_eos=True)) for p in prompts]
    start = time.perf_counter()
    final = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
    outs = [final[i] for i in ids]
    first = outs[0].timings
    # The batch shares every step: one request's token times are the step times.
    return [list(o.token_ids) for o in outs], first.token_times[0] - start, list(first.token_times)


def run_hf(shape: _Shape, prompts: list[list[int]], new: int, compiled: bool
           ) -> tuple[list[list[int]], float, list[float], str]:
    model = shape.hf()
    device = shape.loaded.weights["embed_tokens"].device
    input_ids = torch.tensor(prompts, dtype=torch.long, device=device)
    # No end-of-sequence id: generation neither stops at EOS nor masks it (min_new_tokens would), so every
    # step is a plain argmax over the whole vocabulary, as trinfer's ignore_eos decoding is.
    model.generation_config.eos_token_id = None
    kwargs: dict[str, Any] = dict(max_new_tokens=new, do_sample=False, num_beams=1,
                                  attention_mask=torch.ones_like(input_ids), pad_token_id=0)
    note = ""
    if compiled:
        kwargs["cache_implementation"] = "static"
        try:
            from transformers import CompileConfig

            kwargs["compile_config"] = CompileConfig(fullgraph=True, mode="reduce-overhead")
        except ImportError:
            note = "transformers without CompileConfig: its default auto-compile settings"
    clock = _clock(device)
    import torch._dynamo.utils as dyn_utils

    frames_before = sum(dyn_utils.counters["frames"].values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, streamer=clock, **kwargs)
    if compiled and sum(dyn_utils.counters["frames"].values()) == frames_before:
        note = (note + "; " if note else "") + "no torch.compile frame seen in this call (compiled in warm-up)"
    tokens = out[:, input_ids.shape[1]:].tolist()
    return tokens, clock.times[0] - start, clock.times, note


def _env_row(env: dict[str, Any]) -> dict[str, Any]:
    return {k: env.get(k) for k in ("mode", "date", "gpu", "torch", "cuda", "triton", "transformers", "git_commit")}


def _fill(row: dict[str, Any], ttft: float, times: list[float], batch: int, nbytes: int, copy_gbps: float) -> None:
    med, p90 = tpot_stats(times)
    row["ttft_ms"] = ttft * 1e3
    row["tpot_median_ms"] = med * 1e3 if med is not None else None
    row["tpot_p90_ms"] = p90 * 1e3 if p90 is not None else None
    if len(times) > 1 and times[-1] > times[0]:
        row["tokens_per_s"] = batch * (len(times) - 1) / (times[-1] - times[0])
    row["step_bytes"] = nbytes
    row["floor_ms"] = nbytes / (copy_gbps * 1e9) * 1e3
    if med:
        row["achieved_gbps"] = nbytes / med / 1e9
        row["pct_floor"] = 100.0 * row["floor_ms"] / row["tpot_median_ms"]


def markdown(data: dict[str, Any]) -> str:
    env, ceil = data["env"], data["ceilings"]
    lines = [f"# {data['title']}", ""]
    if data.get("banner"):
        lines += [f"> **{data['banner']}**", ""]
    lines.append(f"{env.get('gpu') or 'CPU'} · torch {env.get('torch')} · CUDA {env.get('cuda')} · triton "
                 f"{env.get('triton')} · transformers {env.get('transformers')} · {env.get('date')} · "
                 f"commit {env.get('git_commit')} · mode {data['mode']}")
    if ceil:
        lines.append(f"Copy bandwidth measured in this run: {ceil['copy_gbps']:.0f} GB/s (read + write).")
    lines += ["", "| shape | batch | prompt | new | system | TTFT ms | TPOT ms (p50) | p90 | tokens/s | floor ms "
              "| % floor | match vs hf_eager | note |", "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|---|---|"]
    for r in data["rows"]:
        f = H._fmt
        if r["status"] == "ok":
            match = f"{r['match_tokens']}/{r['new_tokens']}" if r["match_tokens"] is not None else ""
            cells = [f(r["ttft_ms"], ".1f"), f(r["tpot_median_ms"], ".2f"), f(r["tpot_p90_ms"], ".2f"),
                     f(r["tokens_per_s"], ".1f"), f(r["floor_ms"], ".3f"), f(r["pct_floor"], ".0f"), match,
                     (r["note"] or "").replace("|", "/")]
        else:
            cells = ["", "", "", "", "", "", r["status"], (r["error"] or "").replace("|", "/")]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | {r['system']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "TTFT: prompt prefill + first token. TPOT: time per output token after the first (host "
              "timestamps). floor: bytes a decode step must read / measured copy bandwidth; % floor = floor / "
              "TPOT. match: identical greedy tokens vs hf_eager (shortest prefix over the batch).", ""]
    return "\n".join(lines)


def write_plot(path: Path, data: dict[str, Any]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["status"] == "ok" and r["tpot_median_ms"]]
    if not rows:
        return None
    groups = list(dict.fromkeys((r["shape"], r["batch"]) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
    for ax, (shape, batch) in zip(axes[0], groups):
        for system in SYSTEMS:
            pts = sorted((r["prompt_len"], r["tpot_median_ms"]) for r in rows
                         if r["shape"] == shape and r["batch"] == batch and r["system"] == system)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=system)
        floor = sorted((r["prompt_len"], r["floor_ms"]) for r in rows
                       if r["shape"] == shape and r["batch"] == batch and r["system"] == "hf_eager")
        if floor:
            ax.plot(*zip(*floor), linestyle="--", color="grey", label="bandwidth floor")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} · batch {batch}", fontsize=9)
        ax.set_xlabel("prompt tokens", fontsize=8)
        ax.set_ylabel("ms per output token (p50)", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    env = data["env"]
    title = f"{data['title']} · {env.get('gpu') or 'CPU'} · {env.get('date')}"
    if data["mode"] == "cpu-smoke":
        title = "CPU SMOKE: NOT GPU MEASUREMENTS\n" + title
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="both shapes, batch 1, prompt 512, 32 new tokens")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, wall clock: NOT a GPU "
                   "measurement (automatic without CUDA)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--shapes", default=None, help="comma-separated shape names (trinfer.runtime.random_model)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--prompts", default=None, help="comma-separated prompt lengths")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    p.add_argument("--dtype", choices=sorted(H.DTYPES), default=None, help="default bf16 (fp32 on the CPU)")
    p.add_argument("--backend", choices=("triton", "torch"), default=None,
                   help="trinfer's kernels (default: triton on CUDA, torch on the CPU)")
    p.add_argument("--budget-s", type=float, default=None, help="start nothing new after this many seconds")
    p.add_argument("--no-cuda-graphs", action="store_true", help="trinfer decodes eagerly (no CUDA graphs)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="trinfer on the weights quantized at load (transformers on the dense ones)")
    p.add_argument("--batch-invariant", action="store_true", help="trinfer decodes every product on `linear`")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s if args.budget_s is not None else None

    smoke = args.cpu_smoke or not H.HAS_CUDA
    plan = dict(SMOKE if smoke else (QUICK if args.quick else FULL))
    if args.shapes:
        plan["shapes"] = tuple(s.strip() for s in args.shapes.split(","))
    if args.batches:
        plan["batches"] = tuple(int(s) for s in args.batches.split(","))
    if args.prompts:
        plan["prompts"] = tuple(int(s) for s in args.prompts.split(","))
    if args.new_tokens:
        plan["new"] = args.new_tokens
    plan.update(quantize=args.quantize, batch_invariant=args.batch_invariant)
    systems = [s.strip() for s in args.systems.split(",")]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; expected some of {', '.join(SYSTEMS)}")
    device = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    dtype = H.DTYPES[args.dtype] if args.dtype else (torch.float32 if smoke else torch.bfloat16)
    backend = args.backend or ("torch" if smoke else "triton")
    mode = "cpu-smoke" if smoke else ("gpu-quick" if args.quick else "gpu")
    timer = H.WallTimer(reps=1) if smoke else H.CudaTimer(device)
    env = H.environment(device, mode)
    ceilings = H.measure_ceilings(device, timer, matmul_n=256 if smoke else 4096)
    print(f"[e2e] {mode}: copy {ceilings.copy_gbps:.0f} GB/s; shapes {plan['shapes']}, batches {plan['batches']}, "
          f"prompts {plan['prompts']}, {plan['new']} new tokens; systems {systems}; trinfer backend {backend}",
          flush=True)
    out_dir = args.out or H.default_out_dir(mode)
    name = H.output_stem("e2e", mode)
    rows: list[dict[str, Any]] = []
    data = {"schema": "trinfer-e2e/1", "title": "End-to-end greedy decode", "mode": mode,
            "banner": H.CPU_SMOKE_BANNER if smoke else None, "env": env,
            "ceilings": {"copy_gbps": ceilings.copy_gbps, "timer": ceilings.timer}, "plan": plan, "rows": rows}
    elem = H.itemsize(dtype)
    max_len = max(plan["prompts"]) + plan["new"]
    shapes: dict[str, _Shape] = {}
    tokens_of: dict[tuple, list[list[int]]] = {}   # (system, shape, batch, prompt_len) -> greedy tokens

    def write():
        for r in rows:  # greedy tokens against hf_eager's, whichever ran first
            ref = tokens_of.get(("hf_eager", r["shape"], r["batch"], r["prompt_len"]))
            mine = tokens_of.get((r["system"], r["shape"], r["batch"], r["prompt_len"]))
            if r["system"] != "hf_eager" and ref is not None and mine is not None:
                r["match_vs"] = "hf_eager"
                r["match_tokens"] = min(common_prefix(a, b) for a, b in zip(mine, ref))
        H.write_json(out_dir / f"{name}.json", data)
        (out_dir / f"{name}.md").write_text(markdown(data))

    # Cheap systems over every shape first; the compiled baseline (minutes of compile) last, as time allows.
    order = [s for s in systems if s != "hf_compile"] + (["hf_compile"] if "hf_compile" in systems else [])
    for system in order:
        for shape_name in plan["shapes"]:
            for batch in plan["batches"]:
                for plen in plan["prompts"]:
                    row = {k: None for k in ROW_KEYS}
                    row.update(_env_row(env), shape=shape_name, batch=batch, prompt_len=plen,
                               new_tokens=plan["new"], system=system, dtype=H.DTYPE_NAMES[dtype],
                               timer="host perf_counter per token" + (" (cpu-smoke)" if smoke else ""))
                    rows.append(row)
                    now = time.monotonic()
                    if deadline is not None and now > deadline:
                        row.update(status="skipped", error="time budget exhausted")
                        continue
                    if system == "hf_compile":
                        if smoke:
                            row.update(status="skipped", error="transformers compiles generate() only on a GPU")
                            continue
                        est = COMPILE_ESTIMATE_S.get(shape_name, 120.0)
                        if deadline is not None and deadline - now < est:
                            row.update(status="skipped", error=f"time budget: compile needs ~{est:.0f} s, "
                                                               f"{deadline - now:.0f} s left")
                            continue
                    try:
                        if shape_name not in shapes:
                            shapes[shape_name] = _Shape(shape_name, device, dtype, max(plan["batches"]), max_len,
                                                        backend, cuda_graphs=not args.no_cuda_graphs,
                                                        quantize=args.quantize, batch_invariant=args.batch_invariant)
                            print(f"[e2e] {shape_name}: random model + engine in {shapes[shape_name].build_s:.1f} s "
                                  f"({shapes[shape_name].engine.runner.graph_summary()})", flush=True)
                        sh = shapes[shape_name]
                        prompts = _prompts(sh.config.vocab_size, batch, plen, seed=batch * 100003 + plen)
                        wbytes = sh.trinfer_weight_bytes if system == "trinfer" else sh.weight_bytes
                        nbytes = step_bytes(sh.config, wbytes, batch, plen + plan["new"] / 2, elem)
                        t0 = time.perf_counter()
                        if system == "trinfer":
                            run_trinfer(sh, prompts, min(plan["new"], 4))  # warm-up: JIT for these shapes
                            tokens, ttft, times = run_trinfer(sh, prompts, plan["new"])
                            r = sh.engine.runner
                            note = f"{sh.engine.backend_name} backend; " + (
                                f"{args.quantize} weights; " if args.quantize else "") + (
                                "batch-invariant; " if args.batch_invariant else "") + (
                                f"CUDA graphs ({len(r.graphs)} captured in {r.graph_capture_s:.1f} s, "
                                f"{r.graph_memory_bytes / 2**20:.0f} MiB)" if r.graphs else "no CUDA graphs")
                        else:
                            compiled = system == "hf_compile"
                            run_hf(sh, prompts, plan["new"] if compiled else min(plan["new"], 4), compiled)
                            tokens, ttft, times, note = run_hf(sh, prompts, plan["new"], compiled)
                        _fill(row, ttft, times, batch, nbytes, ceilings.copy_gbps)
                        tokens_of[(system, shape_name, batch, plen)] = tokens
                        row.update(status="ok", note=note or None)
                        print(f"[e2e] {shape_name} b={batch} P={plen} {system}: TTFT {row['ttft_ms']:.1f} ms, "
                              f"TPOT {row['tpot_median_ms'] or float('nan'):.2f} ms "
                              f"({time.perf_counter() - t0:.1f} s with warm-up)", flush=True)
                    except Exception as exc:  # noqa: BLE001 - one failing system must not stop the others
                        row.update(status="error", error=H._error_text(exc))
                        import traceback

                        print(f"[e2e] {shape_name} b={batch} P={plen} {system}: {row['error']}", file=sys.stderr)
                        print("\n".join(traceback.format_exc().splitlines()[-10:]), file=sys.stderr)
                    write()
    write()
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    if not args.no_plot:
        pth = write_plot(out_dir / f"{name}.png", data)
        if pth:
            paths.append(pth)
    print("[e2e] wrote " + ", ".join(str(x) for x in paths), flush=True)
    print(markdown(data).split("\n\n", 2)[-1] if rows else "(no rows)", flush=True)
    if smoke:
        print("[e2e] " + H.CPU_SMOKE_BANNER, flush=True)
    data["paths"] = [str(x) for x in paths]
    return data


if __name__ == "__main__":
    main()
