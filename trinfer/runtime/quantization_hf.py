"""Hugging Face AWQ / GPTQ 4-bit checkpoints: their `quantization_config` and tensors, loaded without decoding.

Supported (anything else is refused with a ValueError naming the `quantization_config` field):
    quant_method "gptq": bits 4, group_size 32/64/128, desc_act false, sym true or false,
        checkpoint_format (or format) "gptq" (zero points stored minus 1) or "gptq_v2" (stored as they are)
    quant_method "awq": bits (or w_bit) 4, group_size (or q_group_size) 32/64/128, zero_point true,
        version "gemm"

Per quantized linear layer `<m>` the checkpoint holds, for W `[N, K]` and G the group size:
    GPTQ  <m>.qweight int32 [K/8, N]: 8 weights along K per word, weight 8r + j at bits 4j of row r
          <m>.qzeros  int32 [ceil(K/G), N/8]: 8 zero points along N per word, column 8c + j at bits 4j
          <m>.scales  fp16  [ceil(K/G), N]      <m>.g_idx int32 [K] (optional; must be k // G: no act-order)
    AWQ   <m>.qweight int32 [K, N/8]: 8 weights along N per word, column 8c + ORDER[i] at bits 4i,
          with ORDER = 0, 2, 4, 6, 1, 3, 5, 7;  <m>.qzeros int32 [K/G, N/8] packed the same way;
          <m>.scales fp16 [K/G, N]
and W[n, k] = (q - z) * s. GPTQ's qweight is trinfer's int4 layout transposed (`weight_formats.py`), so it is
only transposed; AWQ's is unpacked and repacked along K. Zero points become one uint8 per group.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trinfer.triton_kernels.weight_formats import INT4_GROUP_SIZES, QuantizedWeight

from .fields import is_int
from .quantization import pack_int4

__all__ = ["HFQuantization", "parse_quantization_config", "HFQuantizedTensors"]

_AWQ_COLUMN_OF_FIELD = (0, 2, 4, 6, 1, 3, 5, 7)  # field i of an AWQ word holds column 8c + this
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class HFQuantization:
    method: str       # "awq" | "gptq"
    group_size: int   # 32 | 64 | 128
    zero_offset: int  # added to every stored zero point (GPTQ v1 stores z - 1)


def _field(qc: Mapping[str, Any], *names: str, default: Any = None) -> tuple[str, Any]:
    for name in names:
        if name in qc:
            return name, qc[name]
    return names[0], default


def parse_quantization_config(qc: Any) -> HFQuantization:
    """Validate a config.json `quantization_config`; ValueError naming the first unsupported field."""
    if not isinstance(qc, Mapping):
        raise ValueError(f"quantization_config: expected an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method not in ("gptq", "awq"):
        raise ValueError(f"quantization_config.quant_method: expected 'gptq' or 'awq' (4-bit), got {method!r}")
    name, bits = _field(qc, "bits", "w_bit")
    if not is_int(bits) or bits != 4:  # an int: 4.0 or "4" is a malformed file, not a 4-bit one
        raise ValueError(f"quantization_config.{name}: only 4-bit weights are supported (the integer 4), "
                         f"got {bits!r}")
    name, group = _field(qc, "group_size", "q_group_size")
    if not is_int(group) or group not in INT4_GROUP_SIZES:
        raise ValueError(f"quantization_config.{name}: expected an integer, one of {INT4_GROUP_SIZES}, "
                         f"got {group!r}")
    if method == "gptq":
        desc_act = qc.get("desc_act", False)
        if not isinstance(desc_act, bool):
            raise ValueError(f"quantization_config.desc_act: expected true or false, got {desc_act!r}")
        if desc_act:
            raise ValueError("quantization_config.desc_act: act-order checkpoints (desc_act true) are not supported")
        name, fmt = _field(qc, "checkpoint_format", "format", default="gptq")
        if not isinstance(fmt, str) or fmt.lower() not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config.{name}: expected 'gptq' or 'gptq_v2', got {fmt!r}")
        sym = qc.get("sym", True)
        if not isinstance(sym, bool):
            raise ValueError(f"quantization_config.sym: expected true or false, got {sym!r}")
        return HFQuantization("gptq", group, 1 if fmt.lower() == "gptq" else 0)
    name, version = _field(qc, "version", default="gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        raise ValueError(f"quantization_config.{name}: expected 'gemm' (AWQ's GEMM packing), got {version!r}")
    if qc.get("zero_point", True) is not True:
        raise ValueError(f"quantization_config.zero_point: AWQ without zero points is not supported, got "
                         f"{qc.get('zero_point')!r}")
    return HFQuantization("awq", group, 0)


def _fields(words: torch.Tensor) -> torch.Tensor:
    """int32 `[R, C]` -> the 4-bit fields `[R, C, 8]` (int64), field i at bits 4i."""
    return (words.to(torch.int64)[:, :, None] >> torch.arange(0, 32, 4, dtype=torch.int64)) & 0xF


def _awq_columns(words: torch.Tensor) -> torch.Tensor:
    """AWQ words `[R, N/8]` -> values `[R, N]` in column order."""
    f = _fields(words)
    out = torch.empty_like(f)
    out[:, :, list(_AWQ_COLUMN_OF_FIELD)] = f
    return out.reshape(words.shape[0], -1)


class HFQuantizedTensors:
    """Collects the quantized layers' tensors of a checkpoint as they stream by, and converts each layer to a
    `QuantizedWeight` named `<m>.weight` once every file has been read (a layer's parts may sit in different
    shards).

        held = HFQuantizedTensors(spec, qkv_bias=config.qkv_bias)
        for key, tensor in stream: for key, tensor in held.feed(key, tensor, source): ...   # other tensors
        for key, weight, source in held.weights(): ...                                      # the layers
    """

    def __init__(self, spec: HFQuantization, *, qkv_bias: bool) -> None:
        self.spec = spec
        self.qkv_bias = qkv_bias
        self._parts: dict[str, dict[str, tuple[torch.Tensor, str]]] = {}

    def feed(self, key: str, tensor: torch.Tensor, source: str) -> list[tuple[str, torch.Tensor]]:
        """[(key, tensor)] for a tensor to load as it is; [] for a quantized layer's part (held) and for the
        all-zero biases GPTQ writers store for layers that have none."""
        module, _, part = key.rpartition(".")
        if part in _PARTS:
            self._parts.setdefault(module, {})[part] = (tensor, source)
            return []
        if part == "bias" and not bool(tensor.any()):
            keeps = self.qkv_bias and module.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj")
            if not keeps:
                return []
        return [(key, tensor)]

    def weights(self):
        """Yield `(module + ".weight", QuantizedWeight, source)` for every quantized layer; ValueError naming the
        first tensor that is missing or malformed."""
        for module, parts in self._parts.items():
            for need in ("qweight", "qzeros", "scales"):
                if need not in parts:
                    raise ValueError(f"missing tensor {module + '.' + need!r} in the checkpoint (the other parts of "
                                     f"quantized layer {module!r} are there)")
            yield module + ".weight", self._convert(module, parts), parts["qweight"][1]

    def _convert(self, module: str, parts: dict[str, tuple[torch.Tensor, str]]) -> QuantizedWeight:
        qweight, qzeros, scales = (parts[p][0] for p in ("qweight", "qzeros", "scales"))
        g = self.spec.group_size
        for p, t in (("qweight", qweight), ("qzeros", qzeros)):
            if t.dtype != torch.int32 or t.dim() != 2:
                raise ValueError(f"tensor {module + '.' + p!r}: expected a 2-D int32 tensor, got {t.dtype} "
                                 f"{list(t.shape)}")
        if scales.dim() != 2 or not scales.is_floating_point():
            raise ValueError(f"tensor {module + '.scales'!r}: expected a 2-D float tensor, got {scales.dtype} "
                             f"{list(scales.shape)}")
        n = scales.shape[1]
        if self.spec.method == "gptq":
            k = qweight.shape[0] * 8
            expect = {"qweight": (k // 8, n), "qzeros": (-(-k // g), n // 8), "scales": (-(-k // g), n)}
        else:
            k = qweight.shape[0]
            expect = {"qweight": (k, n // 8), "qzeros": (-(-k // g), n // 8), "scales": (-(-k // g), n)}
        for p, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
            if n % 8 or tuple(t.shape) != expect[p]:
                raise ValueError(f"tensor {module + '.' + p!r}: expected shape {list(expect[p])} for a "
                                 f"{self.spec.method} layer of {n} outputs (a multiple of 8) and group size {g}, "
                                 f"got {list(t.shape)}")
        if "g_idx" in parts:
            g_idx = parts["g_idx"][0]
            if tuple(g_idx.shape) != (k,) or not torch.equal(g_idx.to(torch.int64), torch.arange(k) // g):
                raise ValueError(f"tensor {module + '.g_idx'!r}: expected k // {g} for every k (no act-order "
                                 f"reordering), got another group index")
        if self.spec.method == "gptq":
            data = qweight.t().contiguous()
            zeros = (_fields(qzeros).reshape(qzeros.shape[0], -1) + self.spec.zero_offset) & 0xF
        else:
            data = pack_int4(_awq_columns(qweight).t())
            zeros = _awq_columns(qzeros)
        return QuantizedWeight("int4", (n, k), data, scales.t().contiguous(), zeros.t().to(torch.uint8).contiguous(),
                               g)
