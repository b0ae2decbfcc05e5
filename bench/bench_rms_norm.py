"""Benchmark RMSNorm and fused residual-add + RMSNorm (memory-bound: GB/s against the copy ceiling).

Rows are tokens: decode batches 1/8/64 and prefill chunks, at each model's hidden size.
Bytes, per call (e = element size, R rows, H hidden):
    rms_norm            read x (R*H*e) + write out (R*H*e) + read weight (H*e)
    fused_add_rms_norm  read x, read residual, write residual, write out (4*R*H*e) + read weight (H*e)

    python -m bench.bench_rms_norm [--quick] [--out DIR] [--cpu-smoke]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench import harness as H


def rms_norm_bytes(rows: int, hidden: int, elem: int) -> int:
    return 2 * rows * hidden * elem + hidden * elem


def fused_add_rms_norm_bytes(rows: int, hidden: int, elem: int) -> int:
    return 4 * rows * hidden * elem + hidden * elem


def _cases(fused: bool):
    def cases(size: str, dtype: torch.dtype) -> list[H.Case]:
        out = []
        for m, rows in H.row_sweep(size):
            def make(device, rows=rows, h=m.hidden, eps=m.rms_eps):
                d = {"x": H.randn((rows, h), dtype, device), "weight": H.randn((h,), dtype, device, 0.1).add_(1.0),
                     "eps": eps, "out": torch.empty((rows, h), dtype=dtype, device=device)}
                if fused:
                    d["residual"] = H.randn((rows, h), dtype, device)
                return d

            nbytes = (fused_add_rms_norm_bytes if fused else rms_norm_bytes)(rows, m.hidden, H.itemsize(dtype))
            out.append(H.Case(label=f"{m.name} rows={rows}", group=m.name, x=rows, x_name="rows (tokens)",
                              params={"model": m.name, "rows": rows, "hidden": m.hidden}, make_inputs=make,
                              bytes_moved=nbytes, dtype=dtype))
        return out

    return cases


def _rms_norm_providers() -> list[H.Provider]:
    return H.standard_providers(
        ref="rms_norm_ref", op="rms_norm", args=lambda i: (i["x"], i["weight"], i["eps"]),
        kwargs=lambda i: {"out": i["out"]},
        libraries=[H.Provider("F.rms_norm", H.bind(lambda: _f_rms_norm, lambda i: (i["x"], i["weight"], i["eps"])),
                              "library", note="torch.nn.functional.rms_norm (its own casts)")],
    )


def _f_rms_norm(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _add_then_rms_norm(x, residual, weight, eps):
    residual.add_(x)
    return F.rms_norm(residual, (x.shape[-1],), weight, eps)


def _fused_providers() -> list[H.Provider]:
    def args(i):
        return i["x"], i["residual"], i["weight"], i["eps"]

    return H.standard_providers(
        ref="fused_add_rms_norm_ref", op="fused_add_rms_norm", args=args, kwargs=lambda i: {"out": i["out"]},
        libraries=[H.Provider("add_+F.rms_norm", H.bind(lambda: _add_then_rms_norm, args), "library",
                              note="residual.add_(x) then F.rms_norm")],
    )


def benchmarks() -> list[H.Benchmark]:
    return [
        H.Benchmark("rms_norm", "RMSNorm over the hidden dim", _cases(False), _rms_norm_providers()),
        H.Benchmark("fused_add_rms_norm", "residual += x, then RMSNorm", _cases(True), _fused_providers(),
                    # The check covers both outputs: the normalized sum and the updated residual.
                    output=lambda i, ret: (ret, i["residual"])),
    ]


def main(argv=None) -> dict:
    return H.run_cli(benchmarks(), argv, stem="rms_norm", title="RMSNorm and fused add + RMSNorm",
                     description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
