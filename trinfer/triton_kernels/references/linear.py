"""References for `linear` and `dequantize`: decode the weight format in float64, then an ordinary matmul.

The formats are defined in `trinfer.triton_kernels.weight_formats`. Every decoded value here is exact in
float64 (a scale times a small integer, plus an fp16 minimum), so these are the ground truth that the
kernels' fp32 arithmetic and the gguf package's numpy dequantization are compared with.
"""
from __future__ import annotations

import torch

from ..weight_formats import GGUF_BLOCK, GGUF_BLOCK_BYTES, QuantizedWeight


def _gguf_halfs(blocks: torch.Tensor, byte: int) -> torch.Tensor:
    """The fp16 stored at byte offset `byte` of every block `[..., bytes]` (uint8), as float64 `[..., 1]`."""
    return blocks[..., byte:byte + 2].contiguous().view(torch.float16).double()


def _unpack_int4(data: torch.Tensor, k: int) -> torch.Tensor:
    """int32 words `[N, ceil(K/8)]` -> the 4-bit fields `[N, K]` (int64), field j of a word at bits 4j..4j+3."""
    shifts = torch.arange(0, 32, 4, device=data.device, dtype=torch.int64)
    fields = (data.to(torch.int64)[:, :, None] >> shifts) & 0xF
    return fields.reshape(data.shape[0], -1)[:, :k]


def dequantize_ref(weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """The `[N, K]` float64 matrix a weight stands for (a dense tensor is just upcast)."""
    if isinstance(weight, torch.Tensor):
        return weight.double()
    n, k = weight.shape
    fmt = weight.format
    if fmt == "int8":
        return weight.data.double() * weight.scales.double()[:, None]
    if fmt == "int4":
        g = weight.group_size
        q = _unpack_int4(weight.data, k).double()
        scales = weight.scales.double().repeat_interleave(g, dim=1)[:, :k]
        zeros = weight.zeros.double().repeat_interleave(g, dim=1)[:, :k]
        return (q - zeros) * scales
    blocks = weight.data.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK_BYTES[fmt])
    d = _gguf_halfs(blocks, 0)
    if fmt == "q8_0":
        return (blocks[..., 2:].contiguous().view(torch.int8).double() * d).reshape(n, k)
    qs = blocks[..., -16:].to(torch.int64)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).double()  # weights 0..15 low nibbles, 16..31 high nibbles
    if fmt == "q4_0":
        return ((q - 8.0) * d).reshape(n, k)
    return (q * d + _gguf_halfs(blocks, 2)).reshape(n, k)  # q4_1


def linear_ref(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ dequantize(weight)^T + bias` in float64: x `[..., K]`, weight `[N, K]`, bias `[N]` -> `[..., N]`."""
    y = x.double() @ dequantize_ref(weight).to(x.device).T
    if bias is not None:
        y = y + bias.double()
    return y
