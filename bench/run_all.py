"""Run every kernel benchmark in one process (one set of ceilings, one torch.compile warm-up) and write
`kernels.json`, `kernels.md` and `kernels.png` (mode-suffixed for --tiny / --cpu-smoke).

    python -m bench.run_all --quick --out DIR [--budget-s 120] [--only rms_norm,decode_attention]

`--only` takes script names (rms_norm, sampling, rotary, silu_and_mul, kv_cache, prefill_attention,
decode_attention, linear) or kernel names (e.g. fused_add_rms_norm, linear[int4]). All flags of a kernel
script apply.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness as H

# Attention first: it matters most and costs most, so under a time budget (the GPU check) it is never the
# part that gets cut; the row-wise kernels after it take a fraction of a second per row.
SCRIPTS = ("decode_attention", "prefill_attention", "linear", "rms_norm", "silu_and_mul", "rotary",
           "kv_cache", "sampling")


def collect(only: set[str] | None = None) -> list[H.Benchmark]:
    benches = []
    for name in SCRIPTS:
        module = importlib.import_module(f"bench.bench_{name}")
        for b in module.benchmarks():
            if only is None or name in only or b.kernel in only:
                benches.append(b)
    return benches


def main(argv=None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--only", default=None)
    known, rest = pre.parse_known_args(argv)
    only = {s.strip() for s in known.only.split(",")} if known.only else None
    if only:
        valid = set(SCRIPTS) | {b.kernel for b in collect()}
        unknown = only - valid
        if unknown:
            raise SystemExit(f"--only: unknown names {sorted(unknown)}; expected some of {sorted(valid)}")
    return H.run_cli(collect(only), rest, stem="kernels", title="trinfer kernel benchmarks",
                     description=__doc__.splitlines()[0] + " (--only NAMES: a subset)")


if __name__ == "__main__":
    main()
