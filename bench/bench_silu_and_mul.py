"""Benchmark SiLU-and-mul, the activation of the gated MLP (memory-bound: GB/s against the copy ceiling).

`x [rows, 2*I]` holds gate then up; out `[rows, I]` = silu(gate) * up. Rows are tokens: decode batches 1/8/64
and prefill chunks, at each model's intermediate size I.
Bytes per call (e element size): read x rows*2I*e + write out rows*I*e.

    python -m bench.bench_silu_and_mul [--quick] [--out DIR] [--cpu-smoke]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench import harness as H


def silu_and_mul_bytes(rows: int, intermediate: int, elem: int) -> int:
    return 3 * rows * intermediate * elem


def cases(size: str, dtype: torch.dtype) -> list[H.Case]:
    out = []
    for m, rows in H.row_sweep(size):
        def make(device, rows=rows, inter=m.intermediate):
            return {"x": H.randn((rows, 2 * inter), dtype, device),
                    "out": torch.empty((rows, inter), dtype=dtype, device=device)}

        out.append(H.Case(label=f"{m.name} rows={rows}", group=m.name, x=rows, x_name="rows (tokens)",
                          params={"model": m.name, "rows": rows, "intermediate": m.intermediate},
                          make_inputs=make, bytes_moved=silu_and_mul_bytes(rows, m.intermediate, H.itemsize(dtype)),
                          dtype=dtype))
    return out


def _silu_mul_eager(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def benchmarks() -> list[H.Benchmark]:
    providers = H.standard_providers(
        ref="silu_and_mul_ref", op="silu_and_mul", args=lambda i: (i["x"],), kwargs=lambda i: {"out": i["out"]},
        libraries=[H.Provider("F.silu(gate)*up", H.bind(lambda: _silu_mul_eager, lambda i: (i["x"],)), "library",
                              note="Hugging Face LlamaMLP's eager activation, in the input dtype")],
    )
    return [H.Benchmark("silu_and_mul", "silu(gate) * up", cases, providers)]


def main(argv=None) -> dict:
    return H.run_cli(benchmarks(), argv, stem="silu_and_mul", title="SiLU-and-mul",
                     description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
