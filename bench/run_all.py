"""Run every kernel benchmark in one process (one set of ceilings, one torch.compile warm-up) and write
`kernels.json`, `kernels.md` and `kernels.png` (mode-suffixed for --tiny / --cpu-smoke).

    python -m bench.run_all --quick --out DIR [--budget-s 120] [--only rms_norm,decode_attention]
    python -m bench.run_all --quick --only decode_attention,linear --cases 'linear=^Llama-3-8B .* M=(1|16)$'

`--only` takes script names (rms_norm, sampling, rotary, silu_and_mul, kv_cache, prefill_attention,
decode_attention, linear) or kernel names (e.g. fused_add_rms_norm, linear[int4]), run in the order given.
`--cases NAME=REGEX` (repeatable) keeps only the cases of script or kernel NAME whose label matches REGEX
(re.search; labels as in the tables, e.g. `Llama-3-8B down M=16`): a short row set of a long sweep, as the GPU
check runs `linear`. All flags of a kernel script apply.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness as H

# Attention first: it matters most and costs most, so under a time budget (the GPU check) it is never the
# part that gets cut; the row-wise kernels after it take a fraction of a second per row.
SCRIPTS = ("decode_attention", "prefill_attention", "linear", "rms_norm", "silu_and_mul", "rotary",
           "kv_cache", "sampling")


def _script_benchmarks() -> list[tuple[str, H.Benchmark]]:
    return [(name, b) for name in SCRIPTS for b in importlib.import_module(f"bench.bench_{name}").benchmarks()]


def _filtered(bench: H.Benchmark, pattern: re.Pattern) -> H.Benchmark:
    """`bench` with only the cases whose label matches `pattern`."""
    def cases(size, dtype, _all=bench.cases):
        return [c for c in _all(size, dtype) if pattern.search(c.label)]
    return dataclasses.replace(bench, cases=cases)


def collect(only: list[str] | None = None, cases: dict[str, str] | None = None) -> list[H.Benchmark]:
    """The benchmarks of `only` (script or kernel names, in that order; default every script in SCRIPTS order),
    each with its cases filtered by `cases` ({script or kernel name: label regex})."""
    every = _script_benchmarks()
    if only is None:
        chosen = [b for _, b in every]
    else:
        chosen, seen = [], set()
        for name in only:
            for script, b in every:
                if name in (script, b.kernel) and b.kernel not in seen:
                    chosen.append(b)
                    seen.add(b.kernel)
    patterns = {name: re.compile(rx) for name, rx in (cases or {}).items()}
    script_of = {b.kernel: script for script, b in every}
    out = []
    for b in chosen:
        rx = patterns.get(b.kernel) or patterns.get(script_of[b.kernel])
        out.append(_filtered(b, rx) if rx is not None else b)
    return out


def _parse_cases(values: list[str], valid: set[str]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, rx = v.partition("=")
        if not sep or not rx:
            raise SystemExit(f"--cases: expected NAME=REGEX, got {v!r}")
        if name not in valid:
            raise SystemExit(f"--cases: unknown name {name!r}; expected one of {sorted(valid)}")
        try:
            re.compile(rx)
        except re.error as exc:
            raise SystemExit(f"--cases: bad regular expression {rx!r} for {name}: {exc}") from exc
        out[name] = rx
    return out


def main(argv=None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--only", default=None)
    pre.add_argument("--cases", action="append", default=[])
    known, rest = pre.parse_known_args(argv)
    only = list(dict.fromkeys(s.strip() for s in known.only.split(",") if s.strip())) if known.only else None
    valid = set(SCRIPTS) | {b.kernel for _, b in _script_benchmarks()}
    if only:
        unknown = set(only) - valid
        if unknown:
            raise SystemExit(f"--only: unknown names {sorted(unknown)}; expected some of {sorted(valid)}")
    cases = _parse_cases(known.cases, valid)
    return H.run_cli(collect(only, cases), rest, stem="kernels", title="trinfer kernel benchmarks",
                     description=__doc__.splitlines()[0] + " (--only NAMES: a subset, in that order; "
                                 "--cases NAME=REGEX: a subset of a script's cases)")


if __name__ == "__main__":
    main()
