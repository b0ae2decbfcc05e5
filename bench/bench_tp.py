"""Tensor-parallel decode: ms per output token at N = 1, 2, 4, 8 ranks for the Llama-3-8B and Llama-3-70B shapes on
random weights, with the collectives' time per decode step from the profiler.

    python -m bench.bench_tp [--shapes Llama-3-8B,Llama-3-70B] [--tp 1,2,4,8] [--batch 1] [--prompt 128]
                             [--new 64] [--profile-steps 16] [--link-gbps 450] [--out DIR] [--cpu-smoke]

A (shape, N) runs where the machine has N GPUs and 1/N of the weights plus the largest whole tensor (each rank
draws every tensor whole, from one seed, and keeps its slice: all N hold the same model) fit 90% of one GPU;
otherwise its row says why it was skipped. Each runs `Engine(RandomCheckpoint(shape), tensor_parallel_size=N)`
(bf16, Triton backend, CUDA graphs), one warm-up generate, then one timed generate of --new tokens per sequence:

    tpot        median / p90 of the gaps between output tokens (host timestamps on rank 0), ms per token
    comm        --profile-steps decode steps under torch.profiler on rank 0: the device time of its NCCL kernels
                (names containing "nccl") per step, and their count; on the CPU the host time of the "gloo:"
                collectives. Expected per step: 2 * layers + 1 all-reduces, 1 all-gather, the step's broadcast
    predicted   `comm_bytes_per_step`: what each rank sends per decode step by the ring formulas, and that over
                --link-gbps (NVLink 4 on H100/H200 SXM: 450 GB/s per direction): a PREDICTION of the bandwidth
                term only (a small all-reduce is bound by latency, which the measured `comm` column shows)
    match       shortest common prefix of the greedy tokens with N = 1 (the same weights)

--cpu-smoke (automatic without CUDA): the "tiny" shape at N = 1 and 2 on the CPU (gloo, torch backend, fp32): it
proves the path runs (and that N = 2 decodes N = 1's tokens); its times say nothing about a GPU.
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
from bench.bench_e2e import common_prefix, tpot_stats

FULL = dict(shapes=("Llama-3-8B", "Llama-3-70B"), tp=(1, 2, 4, 8), batch=1, prompt=128, new=64, profile_steps=16)
SMOKE = dict(shapes=("tiny",), tp=(1, 2), batch=1, prompt=8, new=6, profile_steps=3)
NVLINK4_GBPS = 450.0  # H100/H200 SXM: 18 links x 25 GB/s per direction
SMOKE_BANNER = ("CPU SMOKE RUN: tiny shape, torch backend, 2 processes over gloo on the CPU, wall-clock timing. These "
                "are NOT GPU measurements and say nothing about speed; they only prove the code path runs.")

ROW_KEYS = ("shape", "tp", "batch", "prompt_len", "new_tokens", "status", "error", "ttft_ms", "tpot_median_ms",
            "tpot_p90_ms", "tokens_per_s", "comm_ms_per_step", "comm_calls_per_step", "comm_bytes_per_step",
            "predicted_comm_ms", "weight_bytes_per_rank", "match_vs", "match_tokens", "note", "dtype", "mode",
            "date", "gpu", "torch", "cuda", "triton", "git_commit")


def ring_all_reduce_bytes(nbytes: int, n: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `nbytes` over n ranks: reduce-scatter + all-gather,
    2 (n - 1) / n * nbytes."""
    return 2 * (n - 1) / n * nbytes


def comm_bytes_per_step(config, n: int, batch: int, elem: int) -> float:
    """Bytes each rank sends per decode step of `batch` sequences: (2 * layers + 1) all-reduces of the hidden
    states (after o_proj and down in every layer, and the embedding), plus the LM head's all-gather of 3 float64
    per sequence (a ring all-gather sends (n - 1) blocks). The step's broadcast from rank 0 (a few KB, once) is
    left out."""
    if n == 1:
        return 0.0
    hidden = batch * config.hidden_size * elem
    return (2 * config.num_layers + 1) * ring_all_reduce_bytes(hidden, n) + (n - 1) * batch * 3 * 8


def _row(env: dict, **kw) -> dict[str, Any]:
    row = {k: None for k in ROW_KEYS}
    row.update({k: env.get(k) for k in ("mode", "date", "gpu", "torch", "cuda", "triton", "git_commit")})
    row.update(kw)
    return row


def _generate(eng, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float, list[float]]:
    from trinfer.runtime import SamplingParams

    ids = [eng.add_request(p, SamplingParams(max_new_tokens=new, ignore_eos=True)) for p in prompts]
    start, final = time.perf_counter(), {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
    outs = [final[i] for i in ids]
    times = list(outs[0].timings.token_times)  # the batch shares every step
    return [list(o.token_ids) for o in outs], times[0] - start, times


def profile_comm(eng, prompts: list[list[int]], steps: int, cuda: bool) -> tuple[float, float]:
    """(ms, calls) per decode step spent in collectives on rank 0, over `steps` decode steps (see module doc)."""
    from torch.profiler import ProfilerActivity, profile

    from trinfer.runtime import SamplingParams

    ids = [eng.add_request(p, SamplingParams(max_new_tokens=steps + 3, ignore_eos=True)) for p in prompts]
    eng.step()  # the prefill, outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            eng.step()
        if cuda:
            torch.cuda.synchronize()
    for rid in ids:
        eng.abort(rid)
    us = calls = 0.0
    for e in prof.key_averages():
        name = e.key.lower()
        if cuda and "nccl" in name and not name.startswith("nccl:"):  # the kernels, not the host-side records
            us += getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
            calls += e.count
        elif not cuda and name.startswith("gloo:"):
            us += e.cpu_time_total
            calls += e.count
    return us / 1e3 / steps, calls / steps


def markdown(data: dict[str, Any]) -> str:
    env = data["env"]
    f = H._fmt
    lines = [f"# {data['title']}", ""]
    if data.get("banner"):
        lines += [f"> **{data['banner']}**", ""]
    lines += [f"{env.get('gpu') or 'CPU'} · torch {env.get('torch')} · CUDA {env.get('cuda')} · triton "
              f"{env.get('triton')} · {env.get('date')} · commit {env.get('git_commit')} · mode {data['mode']} · "
              f"link {data['plan']['link_gbps']:.0f} GB/s for the prediction", "",
              "| shape | N | batch | prompt | new | TPOT ms (p50) | p90 | tokens/s | comm ms/step (measured) | "
              "comm calls/step | comm MB/step/rank | predicted comm ms (bandwidth only) | match vs N=1 | note |",
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"]
    for r in data["rows"]:
        if r["status"] == "ok":
            match = f"{r['match_tokens']}/{r['new_tokens']}" if r["match_tokens"] is not None else ""
            cells = [f(r["tpot_median_ms"], ".2f"), f(r["tpot_p90_ms"], ".2f"), f(r["tokens_per_s"], ".1f"),
                     f(r["comm_ms_per_step"], ".3f"), f(r["comm_calls_per_step"], ".1f"),
                     f(r["comm_bytes_per_step"] / 1e6 if r["comm_bytes_per_step"] is not None else None, ".3f"),
                     f(r["predicted_comm_ms"], ".4f"), match, (r["note"] or "").replace("|", "/")]
        else:
            cells = [""] * 8 + [f"{r['status']}: {(r['error'] or '')}".replace("|", "/")]
        lines.append(f"| {r['shape']} | {r['tp']} | {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "TPOT: time per output token after the first (host timestamps on rank 0). comm: time in the "
              "collectives on rank 0 per decode step (profiler: NCCL kernels' device time on a GPU, gloo's host "
              "time on the CPU). predicted: comm MB per step and rank over the link bandwidth, by the ring "
              "formulas; a prediction of the bandwidth term only, never a measurement.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shape, N = 1 and 2 on the CPU (gloo): NOT a GPU "
                   "measurement (automatic without CUDA)")
    p.add_argument("--shapes", default=None, help="comma-separated shape names (trinfer.runtime.random_model)")
    p.add_argument("--tp", default=None, help="comma-separated tensor-parallel sizes")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens")
    p.add_argument("--new", type=int, default=None, help="output tokens per sequence (timed run)")
    p.add_argument("--profile-steps", type=int, default=None)
    p.add_argument("--link-gbps", type=float, default=NVLINK4_GBPS,
                   help="per-direction link bandwidth for the predicted column (GB/s)")
    p.add_argument("--budget-s", type=float, default=None, help="start nothing new after this many seconds")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget_s if args.budget_s is not None else None

    from trinfer.runtime import Engine
    from trinfer.runtime.block_manager import blocks_needed
    from trinfer.runtime.random_model import RandomCheckpoint, hf_config_dict, weight_bytes

    smoke = args.cpu_smoke or not H.HAS_CUDA
    plan = dict(SMOKE if smoke else FULL)
    for key, value in (("shapes", args.shapes), ("tp", args.tp)):
        if value:
            plan[key] = tuple(s.strip() for s in value.split(","))
    plan["tp"] = tuple(int(n) for n in plan["tp"])
    for key in ("batch", "prompt", "new", "profile_steps"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    plan["link_gbps"] = args.link_gbps
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    dtype = torch.float32 if smoke else torch.bfloat16
    backend = "torch" if smoke else "triton"
    mode = "cpu-smoke" if smoke else "gpu"
    env = H.environment(device, mode)
    out_dir = args.out or H.default_out_dir(mode)
    name = H.output_stem("tp", mode)
    rows: list[dict[str, Any]] = []
    data = {"schema": "trinfer-tp/1", "title": "Tensor-parallel decode", "mode": mode,
            "banner": SMOKE_BANNER if smoke else None, "env": env, "plan": plan, "rows": rows}
    elem = H.itemsize(dtype)
    gpus = torch.cuda.device_count() if not smoke else 0
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if not smoke else None
    max_len = plan["prompt"] + max(plan["new"], plan["profile_steps"] + 3) + 8
    tokens_of: dict[tuple[str, int], list[list[int]]] = {}
    print(f"[tp] {mode}: shapes {plan['shapes']}, N {plan['tp']}, batch {plan['batch']}, prompt {plan['prompt']}, "
          f"{plan['new']} new tokens; {gpus} GPUs", flush=True)

    def write():
        H.write_json(out_dir / f"{name}.json", data)
        (out_dir / f"{name}.md").write_text(markdown(data))

    for shape in plan["shapes"]:
        raw = hf_config_dict(shape)
        raw["max_position_embeddings"] = max(raw["max_position_embeddings"], max_len)
        ckpt = RandomCheckpoint(raw, seed=0)
        config = ckpt.config()
        wbytes = weight_bytes(config, dtype)
        for n in plan["tp"]:
            row = _row(env, shape=shape, tp=n, batch=plan["batch"], prompt_len=plan["prompt"],
                       new_tokens=plan["new"], dtype=H.DTYPE_NAMES[dtype], weight_bytes_per_rank=wbytes // n,
                       comm_bytes_per_step=comm_bytes_per_step(config, n, plan["batch"], elem))
            row["predicted_comm_ms"] = row["comm_bytes_per_step"] / (args.link_gbps * 1e9) * 1e3
            rows.append(row)
            biggest = config.vocab_size * config.hidden_size * elem
            if deadline is not None and time.monotonic() > deadline:
                row.update(status="skipped", error="time budget exhausted")
            elif not smoke and n > gpus:
                row.update(status="skipped", error=f"needs {n} GPUs, {gpus} visible")
            elif not smoke and wbytes / n + biggest > 0.9 * gpu_bytes:
                row.update(status="skipped", error=f"{wbytes / n / 2**30:.0f} GiB of weights per GPU do not fit "
                                                   f"{gpu_bytes / 2**30:.0f} GiB")
            else:
                try:
                    blocks = plan["batch"] * (blocks_needed(max_len, 16) + 1) + 8
                    t0 = time.perf_counter()
                    eng = Engine(ckpt, device=device, dtype=dtype, backend=backend, max_num_seqs=plan["batch"],
                                 num_kv_blocks=blocks, max_model_len=max_len, tensor_parallel_size=n)
                    try:
                        build_s = time.perf_counter() - t0
                        g = torch.Generator().manual_seed(7)  # the same prompts at every N
                        prompts = torch.randint(3, config.vocab_size, (plan["batch"], plan["prompt"]),
                                                generator=g).tolist()
                        _generate(eng, prompts, min(plan["new"], 4))  # warm-up
                        tokens, ttft, times = _generate(eng, prompts, plan["new"])
                        med, p90 = tpot_stats(times)
                        row.update(ttft_ms=ttft * 1e3, tpot_median_ms=med * 1e3 if med else None,
                                   tpot_p90_ms=p90 * 1e3 if p90 else None)
                        if len(times) > 1 and times[-1] > times[0]:
                            row["tokens_per_s"] = plan["batch"] * (len(times) - 1) / (times[-1] - times[0])
                        comm_ms, calls = profile_comm(eng, prompts, plan["profile_steps"], not smoke)
                        row.update(comm_ms_per_step=comm_ms, comm_calls_per_step=calls)
                        tokens_of[(shape, n)] = tokens
                        ref = tokens_of.get((shape, 1))
                        if ref is not None and n != 1:
                            row.update(match_vs="tp1", match_tokens=min(common_prefix(a, b)
                                                                          for a, b in zip(tokens, ref)))
                        r = eng.runner
                        row.update(status="ok", note=f"{backend} backend; built in {build_s:.1f} s; "
                                   + (f"{len(r.graphs)} CUDA graphs" if r.graphs else "no CUDA graphs"))
                    finally:
                        eng.close()
                    print(f"[tp] {shape} N={n}: TPOT {row['tpot_median_ms'] or float('nan'):.2f} ms, comm "
                          f"{row['comm_ms_per_step']:.3f} ms/step ({row['comm_calls_per_step']:.0f} calls)",
                          flush=True)
                except Exception as exc:  # noqa: BLE001 - one failing configuration must not stop the others
                    row.update(status="error", error=H._error_text(exc))
                    print(f"[tp] {shape} N={n}: {row['error']}", file=sys.stderr, flush=True)
            write()
    write()
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    print("[tp] wrote " + ", ".join(str(x) for x in paths), flush=True)
    print(markdown(data).split("\n\n", 2)[-1], flush=True)
    if smoke:
        print("[tp] " + SMOKE_BANNER, flush=True)
    data["paths"] = [str(x) for x in paths]
    return data


if __name__ == "__main__":
    main()
