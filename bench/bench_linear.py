"""Benchmark the decode matrix products `y = x @ W^T` (trinfer's batch-invariant `linear`) for every weight format.

Memory-bound at decode batch sizes: each call streams the weight once. Bytes per call (M rows, W [N, K], e the
activation element size, |W| the weight's bytes in its format: bf16 2NK; int8 NK + 4N; int4 NK/2 + NK/G * 3
(fp16 scale + uint8 zero per group of G = 128); GGUF Q8_0 34NK/32, Q4_0 18NK/32, Q4_1 20NK/32):
    |W| + M*K*e (read x) + M*N*e (write y)                     (2*M*N*K flops)
so GB/s is, within the small x/y terms, the weight's bytes over time, and % copy compares it with the copy
bandwidth measured in the same run. Shapes: the q/k/v, o, gate/up and down products of Llama-3.2-1B and
Llama-3-8B (`--quick`: gate/up and down, the widest N and the longest K) at M = 1, 4, 16, 64 rows.

Providers, per format (`linear[<format>]`):
    triton          trinfer.triton_kernels.linear on the weight in its format
    dequant+matmul  trinfer.triton_kernels.dequantize to bf16, then torch.matmul (cuBLAS): the check's reference
    torch.matmul    torch.matmul on the same values as a dense bf16 matrix (cuBLAS reading 2 bytes per weight;
                    its GB/s column still counts the format's bytes: compare times)
For the dense bf16 weight: triton and torch.matmul (the reference).

    python -m bench.bench_linear [--quick] [--out DIR] [--cpu-smoke]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H
from bench import shapes as S

# (kernel name suffix, format, int4 group size); "dense" is the activation dtype
FORMATS = (("dense", "dense", 0), ("int8", "int8", 0), ("int4", "int4", 128), ("q8_0", "q8_0", 32),
           ("q4_0", "q4_0", 32), ("q4_1", "q4_1", 32))
ROWS = (1, 4, 16, 64)
TINY_ROWS = (1, 3)


def layer_shapes(m: S.ModelShape) -> dict[str, tuple[int, int]]:
    """(N, K) of a decoder layer's four products."""
    return {"qkv": (m.q_size + 2 * m.kv_size, m.hidden), "o": (m.hidden, m.q_size),
            "gate_up": (2 * m.intermediate, m.hidden), "down": (m.hidden, m.intermediate)}


def weight_bytes(fmt: str, n: int, k: int, elem: int, group: int = 128) -> int:
    """Bytes of an [n, k] weight in `fmt` (dense: `elem` bytes per weight), as `QuantizedWeight.nbytes` counts."""
    groups = -(-k // group)
    return {"dense": n * k * elem, "int8": n * k + 4 * n, "int4": n * (-(-k // 8)) * 4 + n * groups * 3,
            "q8_0": n * k // 32 * 34, "q4_0": n * k // 32 * 18, "q4_1": n * k // 32 * 20}[fmt]


def linear_bytes(fmt: str, m: int, n: int, k: int, elem: int, group: int = 128) -> int:
    return weight_bytes(fmt, n, k, elem, group) + m * k * elem + m * n * elem


def _weight(fmt: str, group: int, n: int, k: int, dtype: torch.dtype, device):
    from trinfer.runtime.quantization import random_weight

    if fmt == "dense":
        return H.randn((n, k), dtype, device, k ** -0.5)
    return random_weight(fmt, (n, k), device=device, scale=k ** -0.5, group_size=group or 128)


def _cases(fmt: str, group: int):
    def cases(size: str, dtype: torch.dtype) -> list[H.Case]:
        models = H.size_set(size, (S.LLAMA_3_2_1B, S.LLAMA_3_8B), (S.LLAMA_3_2_1B, S.LLAMA_3_8B), (S.TINY,))
        layers = H.size_set(size, ("qkv", "o", "gate_up", "down"), ("gate_up", "down"), ("down",))
        rows = H.size_set(size, ROWS, ROWS, TINY_ROWS)
        out = []
        for model in models:
            for layer in layers:
                n, k = layer_shapes(model)[layer]
                for m in rows:
                    def make(device, m=m, n=n, k=k):
                        from trinfer.triton_kernels import dequantize

                        w = _weight(fmt, group, n, k, dtype, device)
                        dense = w if fmt == "dense" else dequantize(w, dtype)  # same values, bf16 matrix
                        return {"x": H.randn((m, k), dtype, device), "w": w, "dense": dense,
                                "y": torch.empty(m, n, dtype=dtype, device=device)}

                    out.append(H.Case(
                        label=f"{model.name} {layer} M={m}", group=f"{model.name} {layer} {n}x{k}", x=m,
                        x_name="rows (decode batch)", dtype=dtype, make_inputs=make,
                        params={"model": model.name, "layer": layer, "rows": m, "n": n, "k": k, "format": fmt,
                                "group_size": group},
                        bytes_moved=linear_bytes(fmt, m, n, k, H.itemsize(dtype), group or 128),
                        flops=2 * m * n * k))
        return out

    return cases


def _triton(inputs):
    return H.bind(lambda: H.triton_op("linear"), lambda i: (i["x"], i["w"]), lambda i: {"out": i["y"]})(inputs)


def _matmul(inputs):
    x, w, y = inputs["x"], inputs["dense"], inputs["y"]
    return lambda: torch.matmul(x, w.t(), out=y)


def _dequant_matmul(inputs):
    dequantize = H.triton_op("dequantize")
    x, w, y = inputs["x"], inputs["w"], inputs["y"]
    return lambda: torch.matmul(x, dequantize(w, x.dtype).t(), out=y)


def benchmarks() -> list[H.Benchmark]:
    out = []
    for name, fmt, group in FORMATS:
        provs = [H.Provider("triton", _triton, "ours", note="batch-invariant, streams W once per 64 rows")]
        if fmt == "dense":
            provs.append(H.Provider("torch.matmul", _matmul, "library", note="cuBLAS"))
            ref = "torch.matmul"
        else:
            provs += [H.Provider("dequant+matmul", _dequant_matmul, "reference",
                                 note="Triton dequantize to the activation dtype, then cuBLAS"),
                      H.Provider("torch.matmul", _matmul, "library",
                                 note="cuBLAS on the same values as a dense matrix (2 bytes per weight in bf16)")]
            ref = "dequant+matmul"
        out.append(H.Benchmark(f"linear[{name}]", f"y = x @ W^T, W in {name}", _cases(fmt, group), provs,
                               output=lambda inputs, ret: inputs["y"], reference=ref))
    return out


def main(argv=None) -> dict:
    return H.run_cli(benchmarks(), argv, stem="linear", title="Decode matrix products (linear) per weight format",
                     description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
