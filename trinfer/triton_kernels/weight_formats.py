"""Quantized weight formats read by `linear` and `dequantize`. This module is the one place they are defined.

A weight matrix is `W [N, K]` (out_features x in_features, the `nn.Linear` / `F.linear` orientation): the
kernels compute `y = x @ W^T`. A dense weight is a plain tensor in the activation dtype; a quantized one is
a `QuantizedWeight`, one of these formats (all rows contiguous, addresses computed in int64):

    format  data                               scales                     zeros                  W[n, k]
    ------  ---------------------------------  -------------------------  ---------------------  -----------------------
    int8    int8  [N, K]                       float [N] (per row)        -                      q * s[n]
    int4    int32 [N, ceil(K/8)] (8 per word)  float [N, ceil(K/G)]       uint8 [N, ceil(K/G)]   (q - z[n, g]) * s[n, g]
    q8_0    uint8 [N, K/32*34] (GGUF blocks)   in the blocks              -                      d * q
    q4_0    uint8 [N, K/32*18] (GGUF blocks)   in the blocks              -                      d * (q - 8)
    q4_1    uint8 [N, K/32*20] (GGUF blocks)   in the blocks              -                      d * q + m

int4 (AWQ/GPTQ-style, groups of G = 32, 64 or 128 along K, g = k // G): element (n, k) is the 4-bit field at
bits 4*(k % 8) .. 4*(k % 8) + 3 of word `data[n, k // 8]` (GPTQ's order along K; in bytes, little-endian:
byte k // 2, low nibble for even k), unsigned 0..15; the zero point z is 0..15 (8 for symmetric checkpoints).
K need not be a multiple of 8 or of G: the last word and group are partial (fields past K are ignored).
GPTQ checkpoints store `qweight [K/8, N]`, which is this layout transposed; AWQ checkpoints pack 8 output
columns per word in the order 0, 2, 4, 6, 1, 3, 5, 7 and are repacked along K at load
(`trinfer.runtime.quantization`).

GGUF blocks (ggml's Q8_0, Q4_0, Q4_1), exactly as stored in the file, 32 weights along K per block, each row
`K/32` consecutive blocks (K a multiple of 32):
    q8_0  34 bytes: fp16 d, then 32 int8 q
    q4_0  18 bytes: fp16 d, then 16 bytes; byte j holds weight j in its low nibble, weight j + 16 in its high one
    q4_1  20 bytes: fp16 d, fp16 m, then 16 bytes as q4_0

Scales are fp32, fp16 or bf16 tensors (AWQ/GPTQ store fp16); every value is computed in fp32 from them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._utils import FLOAT_DTYPES, check_tensor

INT_FORMATS = ("int8", "int4")
GGUF_FORMATS = ("q8_0", "q4_0", "q4_1")
FORMATS = INT_FORMATS + GGUF_FORMATS
INT4_GROUP_SIZES = (32, 64, 128)
GGUF_BLOCK = 32  # weights per GGUF block
GGUF_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A `[N, K]` weight matrix in one of the formats above (see the module docstring for the layouts).

    format: "int8" | "int4" | "q8_0" | "q4_0" | "q4_1".   shape: (N, K), the logical matrix.
    data / scales / zeros: the tensors of the table (scales/zeros None where the format has none).
    group_size: int4 G (32/64/128); 32 for the GGUF formats; 0 for int8 (one scale per row).
    Construction validates every field and raises a ValueError/TypeError naming it.
    """

    format: str
    shape: tuple[int, int]
    data: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group_size: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {self.format!r}")
        if (not isinstance(self.shape, tuple) or len(self.shape) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in self.shape)):
            raise ValueError(f"shape: expected (out_features, in_features), two ints > 0, got {self.shape!r}")
        n, k = self.shape
        fmt = self.format
        if fmt == "int8":
            self._check_data(torch.int8, (n, k))
            check_tensor("scales", self.scales, dtypes=FLOAT_DTYPES, ndim=1, device=self.data.device,
                         last_dim_contiguous=True)
            _check_shape("scales", self.scales, (n,))
            self._check_no("zeros", self.zeros)
            if self.group_size != 0:
                raise ValueError(f"group_size: expected 0 for int8 (one scale per output row), got {self.group_size}")
        elif fmt == "int4":
            if self.group_size not in INT4_GROUP_SIZES:
                raise ValueError(f"group_size: expected one of {INT4_GROUP_SIZES} for int4, got {self.group_size!r}")
            groups = _cdiv(k, self.group_size)
            self._check_data(torch.int32, (n, _cdiv(k, 8)))
            check_tensor("scales", self.scales, dtypes=FLOAT_DTYPES, ndim=2, device=self.data.device,
                         last_dim_contiguous=True)
            _check_shape("scales", self.scales, (n, groups))
            check_tensor("zeros", self.zeros, dtypes=(torch.uint8,), ndim=2, device=self.data.device,
                         last_dim_contiguous=True)
            _check_shape("zeros", self.zeros, (n, groups))
        else:
            if k % GGUF_BLOCK:
                raise ValueError(f"shape: {fmt} rows are whole blocks of {GGUF_BLOCK} weights; expected in_features "
                                 f"a multiple of {GGUF_BLOCK}, got {k}")
            self._check_data(torch.uint8, (n, k // GGUF_BLOCK * GGUF_BLOCK_BYTES[fmt]))
            self._check_no("scales", self.scales)
            self._check_no("zeros", self.zeros)
            if self.group_size != GGUF_BLOCK:
                raise ValueError(f"group_size: expected {GGUF_BLOCK} for {fmt}, got {self.group_size!r}")

    def _check_data(self, dtype: torch.dtype, shape: tuple[int, int]) -> None:
        check_tensor("data", self.data, dtypes=(dtype,), ndim=2, last_dim_contiguous=True)
        _check_shape("data", self.data, shape)
        if self.format in GGUF_FORMATS and self.data.stride(0) % 2:
            raise ValueError(f"data: expected an even row stride in bytes (fp16 scales), got {self.data.stride(0)}")

    def _check_no(self, name: str, value) -> None:
        if value is not None:
            raise ValueError(f"{name}: expected None for {self.format} (not part of the format), got "
                             f"{type(value).__name__}")

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of the format's tensors: what one pass over the weight reads."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.zeros) if t is not None)

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.data, self.scales, self.zeros

    def _with(self, fn, n: int) -> "QuantizedWeight":
        data, scales, zeros = (None if t is None else fn(t) for t in self._tensors())
        return QuantizedWeight(self.format, (n, self.shape[1]), data, scales, zeros, self.group_size)

    def rows(self, index: torch.Tensor) -> "QuantizedWeight":
        """The weight made of rows `index` (1-D integer tensor, any order, repeats allowed): a new weight whose
        row i is row index[i] of this one (an embedding lookup, a row permutation)."""
        check_tensor("index", index, dtypes=(torch.int32, torch.int64), ndim=1)
        index = index.to(self.device)
        return self._with(lambda t: t.index_select(0, index), int(index.numel()))

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return self._with(lambda t: t.to(device), self.shape[0])

    @staticmethod
    def concat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """The parts stacked along N (fused q/k/v or gate/up); they must share format, K, group size and the
        dtypes of their tensors (ValueError naming the first mismatch)."""
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            for what, a, b in (("format", p.format, first.format), ("in_features", p.shape[1], first.shape[1]),
                               ("group_size", p.group_size, first.group_size),
                               ("scales dtype", None if p.scales is None else p.scales.dtype,
                                None if first.scales is None else first.scales.dtype)):
                if a != b:
                    raise ValueError(f"parts[{i}]: expected {what} {b} (as parts[0]), got {a}")
        cat = [None if t is None else torch.cat(ts, 0)
               for t, ts in zip(first._tensors(), zip(*(p._tensors() for p in parts)))]
        return QuantizedWeight(first.format, (sum(p.shape[0] for p in parts), first.shape[1]), *cat,
                               group_size=first.group_size)

    def __repr__(self) -> str:
        g = f", group_size={self.group_size}" if self.format == "int4" else ""
        return f"QuantizedWeight({self.format}, shape={self.shape}{g}, {self.nbytes} bytes on {self.device})"


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
