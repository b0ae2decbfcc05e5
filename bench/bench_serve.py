"""Serving benchmark: `trinfer serve` under concurrent streaming clients, and the HTTP path's cost per token.

The server runs in its own process (`python -m trinfer serve`, same options as below), the clients in this one
(asyncio + httpx, streaming /v1/completions with stream_options.include_usage, parsing the server-sent events
themselves). Times are taken by the client as each text chunk arrives.

1. Concurrency sweep (HTTP): for each level c in --concurrency (default 1, 4, 16, 64), c clients each send
   --requests-per-client requests one after the other (a closed loop), prompts drawn in turn from a fixed pool
   of prose continuations (20-120 words), `max_tokens` = --max-tokens. Reported per level, as the median over
   --reps sweeps: output tokens/s (all completion tokens / wall time of the level), TTFT p50/p90/p99 (request
   sent -> first text chunk), inter-token latency p50/p90/p99 (gaps between text chunks) and TPOT (per request:
   (last chunk - first chunk) / (completion tokens - 1), median).
2. HTTP overhead at concurrency 1: the same prompt and max_tokens, once through the server and once through an
   `Engine` in this process (add_request, then step() until done, timing each output with text), interleaved
   (the order alternates each repetition) while the other side is idle. Reported: TTFT and TPOT of both
   sides (medians) and the median over repetitions of HTTP / direct, paired within a repetition. The texts of
   both sides are compared (greedy: they must be equal).

Both engines: torch backend, fp32, on the CPU, --threads torch threads, max_num_seqs = the largest level, the
engine's other defaults (prefix caching on, chunked prefill at the CPU budget); every request's prompt starts
with its own number (`unique`), so no cache hit shortens a prefill. A
CPU measurement, on a machine that may be shared: the load average is recorded before and after each part.

    python -m bench.bench_serve [--concurrency 1,4,16,64] [--requests-per-client 2] [--max-tokens 32]
                                [--reps 3] [--overhead-reps 7] [--threads 1] [--model PATH] [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H
from bench.bench_cpu import TEXT_300, _load, cpu_info

DEFAULT_OUT = H.REPO_ROOT / "bench" / "results" / "cpu"
STEM = "serve"
MODEL_NAME = "bench"


def prompt_pool() -> list[str]:
    """Prose continuations of 20-120 words (slices of one passage), so completions rarely stop early."""
    words = TEXT_300.split()
    return [" ".join(words[start:start + n]) for start, n in
            ((0, 20), (13, 45), (29, 80), (5, 120), (41, 30), (60, 60), (2, 100), (77, 25))]


def unique(prompt: str, n: int) -> str:
    """`prompt` behind a tag of its own (request number `n`): no two requests of a run share a prefix, so the
    server's prefix cache (on by default) never shortens a prefill and the figures are those of cold prompts."""
    return f"[{n}] {prompt}"


# ------------------------------------------------------------------------------------------------ the server
def start_server(args, max_num_seqs: int, log_dir: str) -> tuple[subprocess.Popen, str, Path]:
    log = Path(log_dir) / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "trinfer", "serve", "--port", "0", "--device", "cpu", "--backend", "torch",
           "--dtype", "float32", "--threads", str(args.threads), "--max-num-seqs", str(max_num_seqs),
           "--max-model-len", str(args.max_model_len), "--served-model-name", MODEL_NAME, "--log-level", "warning",
           "--shutdown-grace", "0"]
    if args.model is not None:
        cmd += ["--model", args.model]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=H.REPO_ROOT, env=env)
    deadline = time.monotonic() + 300
    while True:
        m = re.search(r"trinfer serve: (http://[^/\s]+)/v1", log.read_text())
        if m:
            return proc, m.group(1), log
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"the server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# ------------------------------------------------------------------------------------------------ one request
async def http_request(client, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, text, usage = [], [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            usage = obj.get("usage") or usage
            for choice in obj["choices"]:
                if choice["text"]:
                    times.append(time.perf_counter())
                    text.append(choice["text"])
    return {"start": start, "times": times, "tokens": usage["completion_tokens"], "text": "".join(text)}


def direct_request(engine, prompt: str, max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    engine.add_request(prompt, max_new_tokens=max_tokens)
    times, text, tokens = [], [], 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.delta_text:
                times.append(time.perf_counter())
                text.append(out.delta_text)
            if out.finished:
                tokens = len(out.token_ids)
    return {"start": start, "times": times, "tokens": tokens, "text": "".join(text)}


def ttft(r: dict) -> float | None:
    return r["times"][0] - r["start"] if r["times"] else None


def tpot(r: dict) -> float | None:
    if r["tokens"] < 2 or len(r["times"]) < 2:
        return None
    return (r["times"][-1] - r["times"][0]) / (r["tokens"] - 1)


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _pcts(xs: list[float]) -> dict[str, float | None]:
    s = sorted(xs)
    return {f"p{int(q * 100)}": (H.quantile(s, q) if s else None) for q in (0.5, 0.9, 0.99)}


# ------------------------------------------------------------------------------------------------ the parts
async def sweep_level(url: str, c: int, per_client: int, max_tokens: int, pool: list[str],
                      first: int) -> dict[str, Any]:
    """One level: c clients, per_client requests each; request k of the level is numbered first + k (`unique`)."""
    import httpx

    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker(w: int) -> list[dict]:
            return [await http_request(client, unique(pool[(k := w * per_client + i) % len(pool)], first + k),
                                       max_tokens)
                    for i in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(c))) for r in rs]
        wall = time.perf_counter() - start
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft": _pcts([t for r in results if (t := ttft(r)) is not None]), "itl": _pcts(itl),
            "tpot": _median(tpot(r) for r in results)}


def overhead(url: str, engine, prompt: str, max_tokens: int, reps: int, first: int) -> dict[str, Any]:
    """Repetition r sends `unique(prompt, first + r)` to both sides (each side computes it cold)."""
    import httpx

    async def one_http(prompt):
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            return await http_request(client, prompt, max_tokens)

    samples = {"http": [], "direct": []}
    for rep in range(reps + 1):  # rep 0 warms both up, untimed
        order = ("direct", "http") if rep % 2 == 0 else ("http", "direct")
        tagged = unique(prompt, first + rep)
        for side in order:
            r = asyncio.run(one_http(tagged)) if side == "http" else direct_request(engine, tagged, max_tokens)
            if rep:
                samples[side].append(r)
    texts_equal = all(h["text"] == d["text"] for h, d in zip(samples["http"], samples["direct"]))
    out: dict[str, Any] = {"reps": reps, "tokens": samples["direct"][0]["tokens"], "texts_equal": texts_equal,
                           "direct_cache_hit_tokens": engine.prefix_cache_stats.hit_tokens}
    for side, rs in samples.items():
        out[side] = {"ttft_ms": _median(ttft(r) * 1e3 for r in rs), "tpot_ms": _median(tpot(r) * 1e3 for r in rs
                                                                                       if tpot(r) is not None),
                     "ttft_ms_all": [ttft(r) * 1e3 for r in rs], "tpot_ms_all": [tpot(r) and tpot(r) * 1e3 for r in rs]}
    pairs = list(zip(samples["http"], samples["direct"]))
    out["ttft_ratio_median"] = _median(ttft(h) / ttft(d) for h, d in pairs)
    out["tpot_ratio_median"] = _median(tpot(h) / tpot(d) for h, d in pairs if tpot(h) and tpot(d))
    return out


def markdown(data: dict[str, Any]) -> str:
    env, f = data["env"], H._fmt
    ms = (lambda v: f(v * 1e3 if v is not None else None, ".0f"))
    lines = [f"# {data['title']}", "",
             f"> **CPU measurement** (no GPU): {env['cpu_model']}, {env['cpu_cores']} cores, torch {env['torch']}, "
             f"Python {env['python']}, {env['date']}, commit {env['git_commit']}. The machine is shared: load average "
             f"before / after the sweep {data['load_before_sweep']} / {data['load_after_sweep']}, before / after the "
             f"overhead part {data['load_before_overhead']} / {data['load_after_overhead']}.", "",
             f"Model: {data['model']} (fp32, torch backend, {data['threads']} torch thread(s) in the server and in the "
             f"direct engine; the engine's defaults otherwise, prefix caching on), `max_tokens` {data['max_tokens']}, "
             f"streamed /v1/completions, greedy; every prompt starts with its own request number, so none shares a "
             f"cached prefix. Server and clients in separate processes on the same machine.", "",
             f"## Concurrency sweep (median of {data['reps']} sweeps; {data['requests_per_client']} requests per "
             f"client, one after the other)", "",
             "| clients | requests | output tok/s | TTFT p50 ms | p90 | p99 | ITL p50 ms | p90 | p99 | TPOT ms |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in data["sweep"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {f(r['tok_s'], '.1f')} | {ms(r['ttft']['p50'])} | "
                     f"{ms(r['ttft']['p90'])} | {ms(r['ttft']['p99'])} | {ms(r['itl']['p50'])} | {ms(r['itl']['p90'])} | "
                     f"{ms(r['itl']['p99'])} | {ms(r['tpot'])} |")
    o = data["overhead"]
    lines += ["", f"## HTTP path vs the engine called directly (concurrency 1, {o['reps']} interleaved repetitions, "
              f"{o['tokens']} tokens)", "",
              "| path | TTFT ms | TPOT ms |", "|---|--:|--:|",
              f"| engine (direct) | {f(o['direct']['ttft_ms'], '.1f')} | {f(o['direct']['tpot_ms'], '.2f')} |",
              f"| HTTP (trinfer serve) | {f(o['http']['ttft_ms'], '.1f')} | {f(o['http']['tpot_ms'], '.2f')} |",
              f"| HTTP / direct (median of paired ratios) | {f(o['ttft_ratio_median'], '.3f')} | "
              f"{f(o['tpot_ratio_median'], '.3f')} |", "",
              f"Texts equal on both paths: {o['texts_equal']}. Per-token overhead of the HTTP path: "
              f"{f((o['tpot_ratio_median'] - 1) * 100 if o['tpot_ratio_median'] else None, '+.1f')}% (goal: under 5%).",
              "", "TTFT: request sent -> first text chunk at the client (direct: add_request -> first output with "
              "text). ITL: gaps between text chunks. TPOT: (last chunk - first chunk) / (completion tokens - 1). "
              "Output tok/s: completion tokens of the level / its wall time.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the default model, SmolLM2-135M-Instruct)")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts (1,4,16,64)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="sweeps; each level's figures are medians over them (3)")
    p.add_argument("--overhead-reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and the direct engine (1)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="levels 1 and 4, 1 sweep, 3 overhead reps, 8 tokens")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.reps, args.overhead_reps, args.max_tokens = "1,4", 1, 3, 8
    levels = [int(c) for c in args.concurrency.split(",")]
    if min(levels) < 1 or args.reps < 1 or args.overhead_reps < 1 or args.max_tokens < 2:
        p.error("--concurrency levels, --reps and --overhead-reps must be >= 1, --max-tokens >= 2")

    from trinfer.runtime import Engine

    env = {**H.environment(torch.device("cpu"), "cpu"), **cpu_info()}
    model = args.model
    if model is None:
        from trinfer.runtime.default_model import default_model_path

        model = default_model_path()
    pool = prompt_pool()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    engine = Engine(model, backend="torch", dtype="float32", device="cpu", max_num_seqs=max(levels),
                    max_model_len=args.max_model_len)
    sweep: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, log = start_server(args, max(levels), tmp)
        try:
            print(f"[bench_serve] {env['cpu_model']} ({env['cpu_cores']} cores); server {url}; load {_load()}",
                  flush=True)
            numbered = 0  # requests sent so far: each gets its own number (`unique`)
            asyncio.run(sweep_level(url, 1, 1, args.max_tokens, pool, numbered))  # warm-up
            numbered += 1
            load_before_sweep = _load()
            runs: dict[int, list[dict]] = {c: [] for c in levels}
            for rep in range(args.reps):
                for c in levels:
                    r = asyncio.run(sweep_level(url, c, args.requests_per_client, args.max_tokens, pool, numbered))
                    numbered += r["requests"]
                    runs[c].append(r)
                    print(f"[bench_serve] sweep {rep + 1}/{args.reps} c={c}: {r['tok_s']:.1f} tok/s, TTFT p50 "
                          f"{r['ttft']['p50'] * 1e3:.0f} ms, ITL p50 {r['itl']['p50'] * 1e3:.1f} ms", flush=True)
            load_after_sweep = _load()
            for c in levels:
                rs = runs[c]
                sweep.append({"concurrency": c, "requests": rs[0]["requests"],
                              "tok_s": _median(r["tok_s"] for r in rs),
                              "tok_s_all": [r["tok_s"] for r in rs], "tokens_all": [r["tokens"] for r in rs],
                              "ttft": {k: _median(r["ttft"][k] for r in rs) for k in rs[0]["ttft"]},
                              "itl": {k: _median(r["itl"][k] for r in rs) for k in rs[0]["itl"]},
                              "tpot": _median(r["tpot"] for r in rs)})
            load_before_overhead = _load()
            over = overhead(url, engine, pool[2], args.max_tokens, args.overhead_reps, numbered)
            load_after_overhead = _load()
        finally:
            rc = stop_server(proc)
        if rc != 0:
            print(f"[bench_serve] WARNING: the server exited with status {rc}:\n{log.read_text()[-2000:]}", flush=True)
    torch.set_num_threads(threads_before)
    data = {"schema": "trinfer-bench-serve/1", "title": "Serving on the CPU: trinfer serve under concurrent clients",
            "mode": "cpu", "env": env, "model": os.path.basename(str(model)), "threads": args.threads,
            "max_tokens": args.max_tokens, "reps": args.reps, "requests_per_client": args.requests_per_client,
            "max_model_len": args.max_model_len, "server_exit_status": rc,
            "load_before_sweep": load_before_sweep, "load_after_sweep": load_after_sweep,
            "load_before_overhead": load_before_overhead, "load_after_overhead": load_after_overhead,
            "sweep": sweep, "overhead": over}
    md = markdown(data)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [H.write_json(args.out / f"{STEM}.json", data)]
    (args.out / f"{STEM}.md").write_text(md)
    paths.append(args.out / f"{STEM}.md")
    print(md)
    print("[bench_serve] wrote " + ", ".join(str(x) for x in paths), flush=True)
    if not over["texts_equal"]:
        print("[bench_serve] WARNING: the HTTP and direct texts differ", flush=True)
    return data


if __name__ == "__main__":
    main()
