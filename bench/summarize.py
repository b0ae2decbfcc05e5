"""A short summary of benchmark results: one line per case, ours against the best other provider.

    python -m bench.summarize bench/results/<date>/kernels.json [e2e.json ...]

End-to-end files (bench/bench_e2e.py) get one line per shape, batch, prompt length and system.

For each case: our Triton kernel's median, its GB/s (memory-bound kernels) or TFLOP/s (prefill attention)
and the fraction of the ceiling measured in the same run; the fastest other provider that ran (reference,
torch.compile, library, CUDA C++) and how many times faster ours is (x > 1: ours faster); the output check.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OURS = "triton"


def _speed(r: dict[str, Any]) -> str:
    if r["metric"] == "TFLOP/s" and r.get("tflops"):
        pct = f" {r['pct_matmul']:.0f}%" if r.get("pct_matmul") is not None else ""
        return f"{r['tflops']:.1f} TF/s{pct}"
    if r.get("gbps"):
        pct = f" {r['pct_copy']:.0f}%" if r.get("pct_copy") is not None else ""
        return f"{r['gbps']:.0f} GB/s{pct}"
    return ""


def summary_lines(data: dict[str, Any]) -> list[str]:
    env, ceil = data["env"], data.get("ceilings")
    lines = []
    if data.get("banner"):
        lines.append("!! " + data["banner"])
    lines.append(f"{env.get('gpu') or 'CPU'} | torch {env.get('torch')} | CUDA {env.get('cuda')} | triton "
                 f"{env.get('triton')} | {env.get('date')} | mode {data.get('mode')}")
    if ceil:
        lines.append(f"ceilings: copy {ceil['copy_gbps']:.0f} GB/s, matmul {ceil['matmul_tflops']:.3g} TFLOP/s "
                     f"({ceil['matmul_dtype']})")
    cases: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in data["rows"]:
        cases.setdefault((r["kernel"], r["shape"]), []).append(r)
    head = f"{'kernel':<24} {'shape':<30} {'ours us':>9} {'ours speed':>17}  {'best other':<24} {'us':>9} {'x':>6}  check"
    lines += [head, "-" * len(head)]
    counts = {"ok": 0, "error": 0, "skipped": 0, "mismatch": 0}
    for (kernel, shape), rows in cases.items():
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
            counts["mismatch"] += r.get("check") == "MISMATCH"
        ours = next((r for r in rows if r["provider"] == OURS), None)
        others = [r for r in rows if r["provider"] != OURS and r["status"] == "ok"]
        best = min(others, key=lambda r: r["median_ms"]) if others else None
        if ours is None:
            continue
        if ours["status"] == "ok":
            o_us, o_speed = f"{ours['median_ms'] * 1e3:.1f}", _speed(ours)
            check = ours.get("check") or ""
        else:
            o_us, o_speed, check = ours["status"], "", (ours.get("error") or "")[:40]
        if best is not None:
            b_name, b_us = best["provider"], f"{best['median_ms'] * 1e3:.1f}"
            ratio = f"{best['median_ms'] / ours['median_ms']:.2f}" if ours["status"] == "ok" else ""
        else:
            b_name, b_us, ratio = "-", "", ""
        lines.append(f"{kernel:<24} {shape:<30} {o_us:>9} {o_speed:>17}  {b_name:<24} {b_us:>9} {ratio:>6}  {check}")
    lines.append(f"rows: {counts['ok']} ok, {counts['error']} error, {counts['skipped']} skipped; "
                 f"{counts['mismatch']} output mismatches")
    return lines


def e2e_lines(data: dict[str, Any]) -> list[str]:
    """One line per (shape, batch, prompt, system) of an end-to-end run (bench/bench_e2e.py)."""
    env = data["env"]
    lines = ["!! " + data["banner"]] if data.get("banner") else []
    lines.append(f"end-to-end greedy decode | {env.get('gpu') or 'CPU'} | transformers {env.get('transformers')} | "
                 f"copy {data['ceilings']['copy_gbps']:.0f} GB/s")
    head = (f"{'shape':<14} {'batch':>5} {'prompt':>6} {'system':<11} {'TTFT ms':>9} {'TPOT ms':>8} {'p90':>7} "
            f"{'tok/s':>8} {'%floor':>6}  match")
    lines += [head, "-" * len(head)]
    for r in data["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['shape']:<14} {r['batch']:>5} {r['prompt_len']:>6} {r['system']:<11} "
                         f"{r['status']}: {(r['error'] or '')[:60]}")
            continue

        def f(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) else "-"

        match = f"{r['match_tokens']}/{r['new_tokens']}" if r.get("match_tokens") is not None else ""
        lines.append(f"{r['shape']:<14} {r['batch']:>5} {r['prompt_len']:>6} {r['system']:<11} "
                     f"{f(r['ttft_ms'], '9.1f')} {f(r['tpot_median_ms'], '8.2f')} {f(r['tpot_p90_ms'], '7.2f')} "
                     f"{f(r['tokens_per_s'], '8.1f')} {f(r['pct_floor'], '6.0f')}  {match}")
    return lines


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print(__doc__)
        return 2
    status = 0
    for p in paths:
        if not p.exists():
            print(f"{p}: missing")
            status = 1
            continue
        data = json.loads(p.read_text())
        print(f"== {p}")
        lines = e2e_lines(data) if str(data.get("schema", "")).startswith("trinfer-e2e") else summary_lines(data)
        print("\n".join(lines))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
