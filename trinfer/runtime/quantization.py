"""Quantized weights in the runtime: making them, fusing them, and running the model's products on them.

The formats (`QuantizedWeight`: int8, int4, GGUF Q8_0/Q4_0/Q4_1) are defined in
`trinfer.triton_kernels.weight_formats`; Hugging Face AWQ/GPTQ checkpoints are converted in
`quantization_hf.py`. Here:

- `quantize_weight(w, "int8" | "int4")`: quantize a dense `[N, K]` weight (`--quantize` / `quantize=` at load):
    int8  per output row, symmetric: s = max|w_row| / 127, q = round(w / s) in [-127, 127]          (fp32 scales)
    int4  groups of `group_size` (128) along K, asymmetric: lo = min(min w, 0), hi = max(max w, 0),
          s = (hi - lo) / 15, z = round(-lo / s) in [0, 15], q = clamp(round(w / s) + z, 0, 15)    (fp16 scales)
  Only the decoder's matrix products (q/k/v, o, gate/up, down) are quantized; embeddings and the LM head stay
  as they are.
- `gguf_weight`: a GGUF tensor's Q8_0/Q4_0/Q4_1 bytes as a `QuantizedWeight`, without decoding them.
- `assemble_fused`: q/k/v (or gate/up) parts into one fused weight; quantized parts of one format are stacked
  as they are, anything mixed is decoded into one dense matrix.
- `make_linear` / `make_embedding`: the model's matrix products and embedding rows on a backend's kernels.
  Decode steps run on the batch-invariant `linear` kernel when the weight is quantized or when
  `batch_invariant` is asked for; prefill runs the kernel for quantized weights up to `MAX_ROWS` rows, and
  beyond that dequantizes the weight and calls torch's matmul (dense weights: torch's matmul).
- `dequantize_weights`: every quantized weight of a model decoded to dense (the `torch` backend's oracle path).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from trinfer.triton_kernels.linear import MAX_ROWS
from trinfer.triton_kernels.references.linear import dequantize_ref
from trinfer.triton_kernels.weight_formats import (
    GGUF_BLOCK,
    GGUF_BLOCK_BYTES,
    GGUF_FORMATS,
    INT4_GROUP_SIZES,
    QuantizedWeight,
)

__all__ = ["QUANTIZE_CHOICES", "LINEAR_WEIGHTS", "quantize_weight", "quantize_weights", "gguf_weight",
           "assemble_fused", "pack_int4", "dequantize_weights", "to_dense", "random_weight", "make_linear",
           "make_embedding", "check_quantize"]

QUANTIZE_CHOICES = ("int8", "int4")
DEFAULT_INT4_GROUP = 128
# The canonical weights (loader.py) that `quantize=` turns into QuantizedWeights.
LINEAR_WEIGHTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def check_quantize(quantize: str | None) -> str | None:
    """`quantize=` validated: None, "int8" or "int4" (ValueError naming the argument otherwise)."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize: expected None or one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    return quantize


# ---------------------------------------------------------------------- quantizing dense weights

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """`[N, K]` integers 0..15 -> int32 words `[N, ceil(K/8)]`, element k at bits 4*(k % 8) of word k // 8."""
    n, k = q.shape
    padded = torch.zeros(n, -(-k // 8) * 8, dtype=torch.int64, device=q.device)
    padded[:, :k] = q
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (padded.view(n, -1, 8) << shifts).sum(-1)  # disjoint bit fields: the sum is an OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def quantize_weight(w: torch.Tensor, fmt: str, *, group_size: int = DEFAULT_INT4_GROUP) -> QuantizedWeight:
    """Quantize a dense `[N, K]` weight to "int8" (per-row symmetric) or "int4" (groups along K, asymmetric);
    the formulas are in the module docstring. The math runs in fp32 on w's device."""
    check_quantize(fmt)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w: expected a 2-D floating-point tensor, got {getattr(w, 'shape', type(w).__name__)}")
    n, k = w.shape
    wf = w.float()
    if fmt == "int8":
        s = (wf.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(wf / s[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", (n, k), q.contiguous(), s.contiguous())
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {INT4_GROUP_SIZES}, got {group_size!r}")
    groups = -(-k // group_size)
    padded = torch.empty(n, groups * group_size, device=w.device)
    padded[:, :k] = wf
    padded[:, k:] = wf[:, -1:]  # a partial last group: pad with a value already in it (min/max unchanged)
    g = padded.view(n, groups, group_size)
    lo, hi = g.amin(dim=2).clamp_max(0.0), g.amax(dim=2).clamp_min(0.0)  # 0 in range: z in [0, 15]
    s = ((hi - lo) / 15.0).clamp_min(1e-6).half()  # fp16 like AWQ/GPTQ; q below uses the rounded scale
    s32 = s.float()
    z = torch.round(-lo / s32).clamp_(0, 15)
    q = torch.round(g / s32[:, :, None] + z[:, :, None]).clamp_(0, 15).view(n, -1)[:, :k]
    return QuantizedWeight("int4", (n, k), pack_int4(q.to(torch.int64)), s.contiguous(),
                           z.to(torch.uint8).contiguous(), group_size)


def quantize_weights(weights: dict, fmt: str | None, *, group_size: int = DEFAULT_INT4_GROUP) -> dict:
    """The canonical weights with every dense LINEAR_WEIGHTS matrix quantized to `fmt` (in place in the dict,
    one matrix at a time, so the dense copy of only one is alive beside the quantized model). None: unchanged.
    Weights that are already quantized (a GGUF's Q4_1) stay as they are."""
    if check_quantize(fmt) is None:
        return weights
    for name in list(weights):
        if name.rsplit(".", 1)[-1] in LINEAR_WEIGHTS and isinstance(weights[name], torch.Tensor):
            weights[name] = quantize_weight(weights[name], fmt, group_size=group_size)
    return weights


# ---------------------------------------------------------------------- GGUF blocks

GGUF_TYPE_FORMATS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}


def gguf_weight(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> QuantizedWeight:
    """A GGUF tensor's bytes (uint8, 1-D, any device) in ggml type `type_name` (Q8_0/Q4_0/Q4_1) as a `[N, K]`
    QuantizedWeight: the same blocks, one row of K/32 blocks after another, nothing decoded."""
    if type_name not in GGUF_TYPE_FORMATS:
        raise ValueError(f"type_name: expected one of {', '.join(GGUF_TYPE_FORMATS)}, got {type_name!r}")
    if len(shape) != 2:
        raise ValueError(f"shape: expected a matrix [rows, cols], got {list(shape)}")
    fmt = GGUF_TYPE_FORMATS[type_name]
    n, k = shape
    return QuantizedWeight(fmt, (n, k), raw.reshape(n, -1), group_size=GGUF_BLOCK)


# ---------------------------------------------------------------------- fusing and decoding

def to_dense(w: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a dense tensor in `dtype` (quantized: decoded exactly in float64, then rounded once)."""
    if isinstance(w, QuantizedWeight):
        return dequantize_ref(w).to(dtype)
    return w.to(dtype)


def assemble_fused(parts: list[tuple[int, int, QuantizedWeight]], dense: torch.Tensor | None,
                   shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor | QuantizedWeight:
    """One fused `[N, K]` weight from quantized parts `(row_lo, row_hi, weight)` and, where some parts came dense,
    the preallocated dense matrix `dense` holding them. Quantized parts that cover every row with one format,
    group size and scale dtype are stacked (still quantized); otherwise each quantized part is decoded into the
    dense matrix's rows."""
    parts = sorted(parts, key=lambda p: p[0])
    covers = [p[0] for p in parts] == [0] + [p[1] for p in parts[:-1]] and parts[-1][1] == shape[0]
    if dense is None and covers:
        try:
            return QuantizedWeight.concat([p[2] for p in parts])
        except ValueError:
            pass  # e.g. a GGUF with q in Q4_1 and v in Q8_0: decode below
    if dense is None:
        dense = torch.empty(shape, dtype=dtype, device=device)
    for lo, hi, w in parts:
        dense[lo:hi] = to_dense(w, dtype)
    return dense


def dequantize_weights(weights: dict, dtype: torch.dtype) -> dict:
    """Every QuantizedWeight in the dict replaced by its dense matrix in `dtype` (in place, one at a time)."""
    for name in list(weights):
        if isinstance(weights[name], QuantizedWeight):
            weights[name] = to_dense(weights[name], dtype)
    return weights


def random_weight(fmt: str, shape: tuple[int, int], *, device: torch.device | str, scale: float = 1.0,
                  generator: torch.Generator | None = None, group_size: int = DEFAULT_INT4_GROUP) -> QuantizedWeight:
    """A random `[N, K]` weight in any format whose values have a standard deviation of about `scale` (for
    benchmarks and tests of real shapes; no quantizer needed, so it also makes GGUF blocks without `gguf`)."""
    n, k = shape
    if fmt in QUANTIZE_CHOICES:
        w = torch.randn(n, k, device=device, generator=generator) * scale
        return quantize_weight(w, fmt, group_size=group_size)
    if fmt not in GGUF_FORMATS:
        raise ValueError(f"fmt: expected one of {', '.join(QUANTIZE_CHOICES + GGUF_FORMATS)}, got {fmt!r}")
    blocks = n * k // GGUF_BLOCK
    rand = torch.randint(0, 256, (blocks, GGUF_BLOCK_BYTES[fmt]), dtype=torch.uint8, device=device,
                         generator=generator)
    step = scale / (74.0 if fmt == "q8_0" else 4.6)  # std of uniform int8 ~74, of uniform 4-bit minus 8 ~4.6
    d = (torch.rand((blocks, 1), device=device, generator=generator) + 0.5).mul_(step).half()  # 0.5..1.5 steps
    rand[:, 0:2] = d.view(torch.uint8)
    if fmt == "q4_1":
        rand[:, 2:4] = (d * -8.0).view(torch.uint8)  # m = -8 d: centred like q4_0
    return QuantizedWeight(fmt, (n, k), rand.view(n, -1), group_size=GGUF_BLOCK)


# ---------------------------------------------------------------------- the model's products

def make_linear(kernel_linear: Callable, kernel_dequantize: Callable, *, batch_invariant: bool) -> Callable:
    """`linear(x, weight, bias=None, *, decode=False)` for a Triton backend: the batch-invariant kernel for
    quantized weights (decode steps and products of up to MAX_ROWS rows; more rows: dequantize, then torch's
    matmul) and, when `batch_invariant`, for dense weights in decode steps; torch's matmul otherwise."""
    def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *, decode: bool = False) -> torch.Tensor:
        if isinstance(weight, QuantizedWeight):
            if decode or x.shape[0] <= MAX_ROWS:
                return kernel_linear(x, weight, bias)
            return F.linear(x, kernel_dequantize(weight, x.dtype), bias)
        if decode and batch_invariant:
            return kernel_linear(x, weight, bias)
        return F.linear(x, weight, bias)

    return linear


def torch_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *, decode: bool = False) -> torch.Tensor:
    """The `torch` backend's `linear`: torch's matmul (a quantized weight decoded first, as the oracle)."""
    return F.linear(x, to_dense(weight, x.dtype) if isinstance(weight, QuantizedWeight) else weight, bias)


def make_embedding(dequantize: Callable[[QuantizedWeight, torch.dtype], torch.Tensor]) -> Callable:
    """`embedding(ids, table, dtype)`: rows of the embedding table; a quantized table decodes only those rows."""
    def embedding(ids: torch.Tensor, table, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(table, QuantizedWeight):
            return dequantize(table.rows(ids.reshape(-1)), dtype).view(*ids.shape, table.shape[1])
        return F.embedding(ids, table)

    return embedding


torch_embedding = make_embedding(to_dense)
