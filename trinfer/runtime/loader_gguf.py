"""Load a GGUF file of the `llama` architecture (SmolLM2, TinyLlama, Llama 2/3, Mistral as llama.cpp writes them)
or of the `qwen3` architecture (dense Qwen3: q/k norm weights `attn_q_norm` / `attn_k_norm`).

The file is parsed here (the GGUF v2/v3 layout: header, metadata, tensor directory, aligned data), so the
`gguf` package is not needed at run time; tests check this reader against it. Tensors are dequantized by
the torch code below (F32, F16, BF16, Q8_0, Q4_0, Q4_1) on the target device,
then brought to Hugging Face's layout:
- GGUF lists dims innermost first: a [ne0=H, ne1=V] tensor is the [V, H] matrix Hugging Face stores.
- llama.cpp's converter reorders the rows of q_proj and k_proj within each head, from rotate_half's
  [first halves | second halves] to interleaved pairs, for its RoPE. `unpermute_rows` undoes it (nq heads
  for q, nkv heads for k), so the model applies the same half-split RoPE as for safetensors. Only `llama`
  files are permuted: llama.cpp runs `qwen3` with the half-split ("NeoX") RoPE and stores q/k as they are.
- Llama-3.1-style rope scaling travels as a `rope_freqs.weight` tensor of per-frequency factors; it is
  matched against the llama3 formula to recover Hugging Face's rope_scaling dict, and refused otherwise.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import MAX_SIZE, SUPPORTED_ARCHITECTURES, ModelConfig
from .distributed import ShardSpec
from .fields import ModelFileError, get_int, get_list, get_number, get_str, short_repr
from .loader import LoadedModel, WeightAssembler, _progress, _with_tokenizer_eos, check_layer_count
from .quantization import GGUF_TYPE_FORMATS, QuantizedWeight, gguf_weight
from .tokenizer import Tokenizer

__all__ = ["load_gguf", "read_gguf", "GGUFFile", "GGUFTensor", "dequantize", "unpermute_rows", "gguf_config"]

# ggml tensor types trinfer reads: id -> (name, elements per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    30: ("BF16", 1, 2),
}

# general.architecture -> the Hugging Face architecture it loads as.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
REFUSED_GGUF_ARCHITECTURES = {"qwen3moe": "Qwen3-MoE: mixture of experts", "qwen2moe": "Qwen2-MoE: mixture of experts"}

_LAYER = re.compile(r"blk\.(\d{1,9})\.(.+)")  # at most 9 digits: int() stays cheap
_LAYER_NAMES = {
    "attn_norm.weight": ("input_norm", None),
    "ffn_norm.weight": ("post_attn_norm", None),
    "attn_q.weight": ("qkv_proj", "q"),
    "attn_k.weight": ("qkv_proj", "k"),
    "attn_v.weight": ("qkv_proj", "v"),
    "attn_q_norm.weight": ("q_norm", None),
    "attn_k_norm.weight": ("k_norm", None),
    "attn_output.weight": ("o_proj", None),
    "ffn_gate.weight": ("gate_up_proj", "gate"),
    "ffn_up.weight": ("gate_up_proj", "up"),
    "ffn_down.weight": ("down_proj", None),
}
_TOP_NAMES = {
    "token_embd.weight": ("embed_tokens", None),
    "output_norm.weight": ("norm", None),
    "output.weight": ("lm_head", None),
}


# ---------------------------------------------------------------------- dequantization


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[blocks, 2] uint8 (little-endian fp16) -> [blocks, 1] float32."""
    return raw.contiguous().view(torch.float16).float()


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize one GGUF tensor to float32 of `shape` (torch order: rows first).

    raw: the tensor's bytes as uint8 (1-D), on any device; the math runs there.
    Q8_0 block (32 values): fp16 scale d, 32 int8 q; x = d*q.
    Q4_0 block: fp16 d, 16 bytes of 4-bit q (byte j: element j in the low nibble, j+16 in the high one);
    x = d*(q-8).   Q4_1 block: fp16 d, fp16 m, 16 bytes as Q4_0; x = d*q + m.
    """
    if ggml_type not in GGML_TYPES:
        raise ValueError(f"ggml type {ggml_type} is not supported; supported: "
                         f"{', '.join(name for name, _, _ in GGML_TYPES.values())}")
    name, block, nbytes = GGML_TYPES[ggml_type]
    n = math.prod(shape)
    if n % block != 0 or raw.numel() != n // block * nbytes:
        raise ValueError(f"{name} tensor of shape {list(shape)}: expected {n // block * nbytes} bytes, got {raw.numel()}")
    raw = raw.reshape(-1)
    if name == "F32":
        return raw.view(torch.float32).reshape(shape)
    if name == "F16":
        return raw.view(torch.float16).float().reshape(shape)
    if name == "BF16":
        return raw.view(torch.bfloat16).float().reshape(shape)
    blocks = raw.view(-1, nbytes)
    if name == "Q8_0":
        out = blocks[:, 2:].contiguous().view(torch.int8).float()
        out.mul_(_f16(blocks[:, 0:2]))
        return out.reshape(shape)
    qs = blocks[:, nbytes - 16:]
    out = torch.empty(blocks.shape[0], 32, dtype=torch.float32, device=raw.device)
    torch.bitwise_and(qs, 0x0F, out=out[:, :16])
    torch.bitwise_right_shift(qs, 4, out=out[:, 16:])
    if name == "Q4_0":
        out.sub_(8.0).mul_(_f16(blocks[:, 0:2]))
    else:  # Q4_1
        out.mul_(_f16(blocks[:, 0:2])).add_(_f16(blocks[:, 2:4]))
    return out.reshape(shape)


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, interleaved pairs (0,hd/2),(1,hd/2+1).. -> [halves].

    w: [n_heads*head_dim, ...] (a weight matrix or a bias). Returns a new tensor of the same shape.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"cannot unpermute {rows} rows into {n_heads} heads of an even head_dim")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------- reading the file

# GGUF metadata value types: id -> numpy dtype (8 is a string, 9 an array).
_VALUE_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _BOOL = 8, 9, 7
MAX_ARRAY_DEPTH = 4  # arrays of arrays of ... (no llama.cpp key nests at all)
MAX_DIMS = 4         # GGML_MAX_DIMS

# Block layout of every ggml tensor type (elements per block, bytes per block), the ones trinfer cannot
# dequantize included: the reader checks every tensor's byte size and offset against it, and refuses a
# type id that ggml does not have.
GGML_BLOCK_LAYOUT = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order (rows first): GGUF's dims reversed
    offset: int             # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0] if self.ggml_type in GGML_TYPES else f"ggml type {self.ggml_type}"


def _error(path: str, key: str | None, message: str) -> ModelFileError:
    if key is not None and key.startswith("tensor "):  # "FILE: tensor 'x' has ...", reads better than "...': has"
        error = ModelFileError(path, None, f"{key} {message}")
        error.key = key
        return error
    return ModelFileError(path, key, message)


class _Cursor:
    """Little-endian reads from the memory map, with an error naming the file (and the field) when it ends early."""

    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)
        self.key: str | None = None  # the metadata key or tensor being read, for messages

    def _need(self, n: int) -> None:
        if self.pos + n > self.size:
            if self.key is None:
                raise _error(self.path, None, f"truncated GGUF file (metadata runs past the end at byte {self.size})")
            raise _error(self.path, self.key, f"runs past the end of the file at byte {self.size}: truncated GGUF file")

    def scalar(self, fmt: str, n: int):
        self._need(n)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self) -> str:
        n = self.scalar("<Q", 8)
        self._need(n)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _error(self.path, self.key, f"a metadata string is not valid UTF-8 ({exc})") from exc

    def value(self, kind: int, depth: int = 0):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise _error(self.path, self.key, f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
            item, count = self.scalar("<I", 4), self.scalar("<Q", 8)
            # The smallest encoding of one item: a string's length, an array's type and count, a scalar.
            smallest = 8 if item == _STRING else 12 if item == _ARRAY else self._dtype(item).itemsize
            if count * smallest > self.size - self.pos:
                raise _error(self.path, self.key, f"array of {count} items of type {item} does not fit in the "
                             f"{self.size - self.pos} bytes left in the file (corrupted or truncated)")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item == _ARRAY:
                return [self.value(_ARRAY, depth + 1) for _ in range(count)]
            dtype = self._dtype(item)
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return values.astype(bool).tolist() if item == _BOOL else values.tolist()
        dtype = self._dtype(kind)
        self._need(dtype.itemsize)
        value = np.frombuffer(self.buf, dtype=dtype, count=1, offset=self.pos)[0].item()
        self.pos += dtype.itemsize
        return bool(value) if kind == _BOOL else value

    def _dtype(self, kind: int) -> np.dtype:
        if kind not in _VALUE_DTYPES:
            raise _error(self.path, self.key, f"corrupted GGUF metadata (unknown value type {kind} at byte {self.pos})")
        return np.dtype(_VALUE_DTYPES[kind])


class GGUFFile:
    """A GGUF file's metadata (plain Python values) and tensor directory, over a read-only memory map.

    Parsing checks the file's structure, so that a malformed file is refused here with a ModelFileError
    naming the key or tensor: counts that cannot fit in the file, duplicate keys, unknown value types,
    arrays nested more than MAX_ARRAY_DEPTH deep, a general.alignment that is not a power of two, tensors
    without dims or with a zero dim, more than MAX_DIMS dims, types ggml does not have, rows that are not
    whole quantization blocks, and tensor data that is not laid out as llama.cpp requires (each tensor's
    bytes right after the previous one's, in directory order, padded to the alignment): so overlapping or
    misaligned data, and a declared type whose byte size does not match the room the data takes, are refused.
    raw(tensor) gives a tensor's bytes as a uint8 torch tensor without copying them.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] != b"GGUF":
                raise _error(path, None, f"not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
            if size < 24:
                raise _error(path, None, f"truncated GGUF file ({size} bytes)")
            version = int.from_bytes(head[4:8], "little")
            if version not in (2, 3):
                hint = " (a big-endian file?)" if int.from_bytes(head[4:8], "big") in (2, 3) else ""
                raise _error(path, "version", f"GGUF version {version} is not supported (2 and 3 are){hint}")
            # Copy-on-write: torch can view the bytes without a read-only warning; nothing goes back to disk.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        cur = _Cursor(self._map, path)
        cur.pos = 8
        n_tensors, n_kv = cur.scalar("<Q", 8), cur.scalar("<Q", 8)
        # Smallest metadata entry: key length 8, type 4, a u8 value 1; smallest tensor entry: name length 8,
        # n_dims 4, type 4, offset 8.
        if n_kv * 13 + n_tensors * 24 > size - 24:
            raise _error(path, None, f"truncated GGUF file, or a corrupted header: {n_tensors} tensors and {n_kv} "
                         f"metadata entries cannot fit in {size} bytes")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            cur.key = None
            key = cur.string()
            cur.key = key if len(key) <= 120 else short_repr(key)
            if key in self.metadata:
                raise _error(path, cur.key, "metadata key appears twice")
            self.metadata[key] = cur.value(cur.scalar("<I", 4))
        infos = []
        for _ in range(n_tensors):
            cur.key = None
            name = cur.string()
            cur.key = f"tensor {short_repr(name)}"
            n_dims = cur.scalar("<I", 4)
            if not 1 <= n_dims <= MAX_DIMS:
                raise _error(path, cur.key, f"has {n_dims} dims, expected 1 to {MAX_DIMS}")
            dims = [cur.scalar("<Q", 8) for _ in range(n_dims)]
            infos.append((name, dims, cur.scalar("<I", 4), cur.scalar("<Q", 8)))
        alignment = self.metadata.get("general.alignment", 32)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 \
                or alignment & (alignment - 1) or alignment > 1 << 20:
            raise _error(path, "general.alignment", f"expected a power of two up to 2**20 (an int), got "
                         f"{short_repr(alignment)}")
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        expected = 0  # where the next tensor's data must start, relative to data_start
        previous = None
        for name, dims, ggml_type, offset in infos:
            key = f"tensor {short_repr(name)}"
            if name in self.tensors:
                raise _error(path, key, "appears twice in the tensor directory")
            if 0 in dims:
                raise _error(path, key, f"has a zero dim ({dims}, innermost first)")
            if ggml_type not in GGML_BLOCK_LAYOUT:
                raise _error(path, key, f"has an unknown ggml type {ggml_type}")
            block, block_bytes = GGML_BLOCK_LAYOUT[ggml_type]
            if dims[0] % block:
                raise _error(path, key, f"has rows of {dims[0]} elements, not whole blocks of {block} for its "
                             f"ggml type {ggml_type}")
            nbytes = math.prod(dims) // block * block_bytes
            if offset != expected:
                raise _error(path, key, _offset_problem(offset, expected, alignment, previous))
            t = GGUFTensor(name, ggml_type, tuple(reversed(dims)), data_start + offset, nbytes)
            if t.offset + t.nbytes > size:
                raise _error(path, key, f"ends at byte {t.offset + t.nbytes}, past the end of the file ({size} "
                             "bytes): truncated GGUF file")
            self.tensors[name] = t
            expected = offset + (nbytes + alignment - 1) // alignment * alignment
            previous = t
        if previous is not None and size > data_start + expected:
            raise _error(path, f"tensor {previous.name!r}", f"is followed by {size - data_start - expected} "
                         f"bytes (the last tensor's data ({previous.type_name}, shape {list(previous.shape)}: {previous.nbytes} "
                         "bytes); its declared type or shape does not match the data")

    def raw(self, t: GGUFTensor) -> torch.Tensor:
        if t.ggml_type not in GGML_TYPES:
            raise _error(self.path, f"tensor {t.name!r}", f"is stored as {t.type_name}; supported: "
                         f"{', '.join(n for n, _, _ in GGML_TYPES.values())}")
        return self._bytes(t.offset, t.nbytes)

    def _bytes(self, offset: int, count: int) -> torch.Tensor:
        """A uint8 view of the file's bytes [offset, offset + count): nothing is read until it is used."""
        return torch.frombuffer(self._map, dtype=torch.uint8, count=count, offset=offset)

    def raw_slice(self, t: GGUFTensor, index: tuple[slice, ...] | None
                  ) -> tuple[torch.Tensor, tuple[int, ...], slice | None]:
        """The bytes of the part of matrix `t` that `index` selects (`ShardSpec.index`: rows, or every row's columns
        [c0, c1)), without reading the rest: (uint8 bytes, the shape they dequantize to, the columns to keep
        after dequantizing). Rows are runs of whole blocks; columns come as the blocks that cover them (a block
        is 32 values in Q8_0/Q4_0/Q4_1, one in F32/F16/BF16), trimmed after dequantizing. index None: the whole."""
        raw = self.raw(t)
        if index is None:
            return raw, t.shape, None
        _, block, block_bytes = GGML_TYPES[t.ggml_type]
        if len(t.shape) != 2:
            raise _error(self.path, f"tensor {t.name!r}", f"of shape {list(t.shape)} cannot be sliced by rows or "
                         "columns (expected a matrix)")
        rows, cols = t.shape
        row_bytes = cols // block * block_bytes
        r = index[0]
        if len(index) == 1:
            return self._bytes(t.offset + r.start * row_bytes, (r.stop - r.start) * row_bytes), \
                (r.stop - r.start, cols), None
        c = index[1]
        b0, b1 = c.start // block, -(-c.stop // block)
        part = raw.view(rows, cols // block, block_bytes)[:, b0:b1].contiguous()  # only these blocks are read
        return part.view(-1), (rows, (b1 - b0) * block), slice(c.start - b0 * block, c.stop - b0 * block)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:
            pass  # a tensor still views the map; it closes when that is gone


def _offset_problem(offset: int, expected: int, alignment: int, previous: GGUFTensor | None) -> str:
    where = f"has data offset {offset}, expected {expected}"
    if offset % alignment:
        return f"{where}: not aligned to general.alignment {alignment}"
    if previous is None:
        return f"{where}: the first tensor's data must start the data section"
    prev = f"tensor {previous.name!r} ({previous.type_name}, shape {list(previous.shape)}: {previous.nbytes} bytes)"
    if offset < expected:
        return f"{where}: overlaps the data of the previous {prev}"
    return (f"{where}: leaves a gap after the previous {prev}; its declared type or shape does not match its "
            "data (tensors' data must follow one another in directory order)")


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor directory); tensors stay on disk until read."""
    return GGUFFile(path)


def _meta_int(meta: dict[str, Any], key: str, source: str, default: Any = None) -> int:
    """A positive int (no larger than MAX_SIZE) from the metadata; a per-layer list is refused by name."""
    value = meta.get(key, default)
    if value is None:
        raise ModelFileError(source, key, "missing (required)")
    if isinstance(value, list):
        raise ModelFileError(source, key, f"varies per layer ({short_repr(value[:4])}...); not supported")
    return get_int({key: value}, key, source=source, minimum=1, maximum=MAX_SIZE)


def _llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float, original: int):
    """The per-frequency divisors llama.cpp stores as rope_freqs.weight for Llama-3 rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    out = np.where(wavelen < original / high, 1.0,
                   np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out


def _rope_scaling_from_freqs(factors: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """Recover the llama3 rope_scaling dict whose factors llama.cpp stored; refuse anything else.

    The factors fix only original/low_freq_factor and original/high_freq_factor (scaling all three by the
    same number gives the same rotary math), so the first match on a grid of the usual values is exact.
    """
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"GGUF: rope_freqs.weight has shape {list(factors.shape)}, expected [{head_dim // 2}]")
    factor = float(factors.max())
    if np.allclose(factors, 1.0):
        return None
    for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (2.0, 8.0), (4.0, 8.0)):
        for original in (2 ** k for k in range(6, 21)):
            want = _llama3_rope_factors(theta, head_dim, factor, low, high, original)
            if np.allclose(factors, want, rtol=1e-4, atol=1e-6):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": original}
    raise ValueError("GGUF: rope_freqs.weight holds rope frequency factors that are not Llama-3 rope scaling; "
                     "this rope variant is not supported")


def gguf_config(gguf: GGUFFile) -> ModelConfig:
    """ModelConfig from `ARCH.*` metadata (ARCH: `llama` or `qwen3`) and the tensors' presence (output.weight,
    rope_freqs.weight).

    Every key is read with its type checked: a ModelFileError names the file, the key, what was expected
    and what was found. The layer count is checked against the blk.N tensors present (`check_layer_count`).
    """
    meta, tensors, src = gguf.metadata, gguf.tensors, gguf.path
    arch = get_str(meta, "general.architecture", source=src, default=None)
    if arch not in GGUF_ARCHITECTURES:
        why = f" ({REFUSED_GGUF_ARCHITECTURES[arch]})" if arch in REFUSED_GGUF_ARCHITECTURES else ""
        raise ModelFileError(src, "general.architecture", f"architecture {short_repr(arch)} is not supported{why}; "
                             f"supported: {', '.join(map(repr, GGUF_ARCHITECTURES))}")
    a = arch + "."  # the prefix of the model's metadata keys
    experts = meta.get(a + "expert_count")
    if experts is not None and get_int(meta, a + "expert_count", source=src, minimum=0):
        raise ModelFileError(src, a + "expert_count", f"{experts}: mixture-of-experts is not supported")
    hidden = _meta_int(meta, a + "embedding_length", src)
    heads = _meta_int(meta, a + "attention.head_count", src)
    kv_heads = _meta_int(meta, a + "attention.head_count_kv", src, heads)
    if hidden % heads != 0 and a + "attention.key_length" not in meta:
        raise ModelFileError(src, a + "attention.head_count", f"embedding_length {hidden} is not a multiple of "
                             f"head_count {heads}")
    head_dim = _meta_int(meta, a + "attention.key_length", src, hidden // heads)
    value_dim = _meta_int(meta, a + "attention.value_length", src, head_dim)
    if value_dim != head_dim:
        raise ModelFileError(src, a + "attention.value_length", f"{value_dim} != key_length {head_dim}: "
                             "not supported")
    rot = _meta_int(meta, a + "rope.dimension_count", src, head_dim)
    if rot != head_dim:
        raise ModelFileError(src, a + "rope.dimension_count", f"{rot} < head_dim {head_dim}: partial rotary is "
                             "not supported")
    theta = get_number(meta, a + "rope.freq_base", source=src, default=10000.0, positive=True)
    tokens = get_list(meta, "tokenizer.ggml.tokens", source=src, default=None)
    vocab = _meta_int(meta, a + "vocab_size", src, len(tokens) if tokens else None)

    scaling = None
    kind = get_str(meta, a + "rope.scaling.type", source=src, default="none")
    if kind == "linear":
        if a + "rope.scaling.factor" not in meta:
            raise ModelFileError(src, a + "rope.scaling.factor", f"{a}rope.scaling.type 'linear' needs it")
        scaling = {"rope_type": "linear",
                   "factor": get_number(meta, a + "rope.scaling.factor", source=src, positive=True)}
    elif a + "rope.scale_linear" in meta:  # older files
        scaling = {"rope_type": "linear",
                   "factor": get_number(meta, a + "rope.scale_linear", source=src, positive=True)}
    elif kind != "none":
        raise ModelFileError(src, None, f"{a}rope.scaling.type {short_repr(kind)} is not supported; supported: "
                             "none, linear")
    if "rope_freqs.weight" in tensors:
        if scaling is not None:
            raise ModelFileError(src, "tensor 'rope_freqs.weight'", "both rope_freqs.weight and linear rope "
                                 "scaling; not supported")
        t = tensors["rope_freqs.weight"]
        if t.ggml_type not in GGML_TYPES or math.prod(t.shape) != head_dim // 2:
            raise ModelFileError(src, "tensor 'rope_freqs.weight'", f"expected {head_dim // 2} F32/F16 factors, "
                                 f"got {t.type_name} of shape {list(t.shape)}")
        factors = dequantize(gguf.raw(t), t.ggml_type, t.shape).double().numpy()
        try:
            scaling = _rope_scaling_from_freqs(factors, theta, head_dim)
        except ValueError as exc:
            raise ModelFileError(src, "tensor 'rope_freqs.weight'", str(exc).removeprefix("GGUF: ")) from None

    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = get_int(meta, key, source=src, default=None, minimum=0, maximum=vocab - 1)
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    bos = get_int(meta, "tokenizer.ggml.bos_token_id", source=src, default=None, minimum=0, maximum=vocab - 1)
    config = ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        model_type=SUPPORTED_ARCHITECTURES[GGUF_ARCHITECTURES[arch]],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_meta_int(meta, a + "feed_forward_length", src),
        num_layers=_meta_int(meta, a + "block_count", src),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=get_number(meta, a + "attention.layer_norm_rms_epsilon", source=src, default=1e-5,
                                positive=True),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_meta_int(meta, a + "context_length", src),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias=False,
        qk_norm=arch == "qwen3",
        bos_token_id=bos,
        eos_token_ids=tuple(eos),
        checkpoint_dtype=torch.float32,
    )
    layers = {int(m.group(1)) for m in map(_LAYER.fullmatch, tensors) if m is not None}
    check_layer_count(config, layers, source=src, key=a + "block_count")
    return config


def gguf_canonical_name(name: str, config: ModelConfig, source: str = "GGUF") -> tuple[str, str | None] | None:
    """(canonical name, part) of a GGUF tensor name; None for rope_freqs (read into the config)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if name == "rope_freqs.weight":
        return None
    match = _LAYER.fullmatch(name)
    if match is not None and int(match.group(1)) < config.num_layers and match.group(2) in _LAYER_NAMES:
        canon, part = _LAYER_NAMES[match.group(2)]
        return f"layers.{match.group(1)}.{canon}", part
    raise ModelFileError(source, None, f"unexpected tensor {short_repr(name)} (not part of a {config.model_type} "
                         f"model with {config.num_layers} layers)")


def _source_names(config: ModelConfig) -> dict[tuple[str, str | None], str]:
    names = {canon: name for name, canon in _TOP_NAMES.items()}
    for n in range(config.num_layers):
        for rest, (canon, part) in _LAYER_NAMES.items():
            names[(f"layers.{n}.{canon}", part)] = f"blk.{n}.{rest}"
    return names


def load_gguf(path: str, *, device: torch.device, dtype: torch.dtype, progress: bool = True,
              keep_quantized: bool = False, tensor_parallel: tuple[int, int] | None = None) -> LoadedModel:
    """Config, canonical weights and tokenizer of a llama or qwen3 GGUF file (see load_model_files).
    keep_quantized: the matrices stored as Q8_0/Q4_0/Q4_1 stay in their blocks (`quantization.gguf_weight`), else
    are decoded. tensor_parallel: (rank, world_size): only that rank's rows, or the blocks covering its columns,
    are read; a quantized column slice that does not fall on block boundaries is decoded."""
    gguf = read_gguf(path)
    try:
        config = gguf_config(gguf)
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata, eos_token_ids=config.eos_token_ids, source=path)
        config = _with_tokenizer_eos(config, tokenizer)
        shard = None if tensor_parallel is None else ShardSpec.of(config, *tensor_parallel)
        local = config if shard is None else shard.local_config(config)  # whole heads: unpermute per local head
        assembler = WeightAssembler(local, device=device, dtype=dtype, checkpoint=path)
        permuted = config.architecture == "LlamaForCausalLM"  # llama.cpp's q/k row order (see the docstring)
        with _progress(len(gguf.tensors), f"loading {os.path.basename(path)}", progress) as bar:
            for t in gguf.tensors.values():
                target = gguf_canonical_name(t.name, config, path)
                if target is not None:
                    # One tensor's bytes (this rank's part of them) at a time leave the memory map;
                    # dequantization runs on the device.
                    raw, shape, keep = gguf.raw_slice(t, None if shard is None else shard.index(*target))
                    assembler.check(target[0], target[1],
                                    shape if keep is None else (shape[0], keep.stop - keep.start), repr(t.name))
                    if keep_quantized and t.type_name in GGUF_TYPE_FORMATS and len(shape) == 2 and \
                            (keep is None or keep == slice(0, shape[1])):
                        weight = gguf_weight(raw.to(device, copy=True), t.type_name, shape)  # off the map
                    else:
                        weight = dequantize(raw.to(device), t.ggml_type, shape)
                        if keep is not None:
                            weight = weight[:, keep]
                    if permuted and target[1] in ("q", "k"):
                        heads = local.num_heads if target[1] == "q" else local.num_kv_heads
                        weight = (weight.rows(unpermute_rows(torch.arange(weight.shape[0]), heads))
                                  if isinstance(weight, QuantizedWeight) else unpermute_rows(weight, heads))
                    assembler.put(target[0], target[1], weight, repr(t.name))
                    del weight
                bar.update(1)
        weights = assembler.finish(_source_names(config))
    finally:
        gguf.close()
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, source="gguf", shard=shard)
