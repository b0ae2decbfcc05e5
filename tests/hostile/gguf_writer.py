"""A small GGUF writer for tests, written from the format (GGUF v3), so that every field can be made wrong.

    spec = tiny_llama_spec(tokens=..., token_types=..., merges=..., chat_template=...)  # a valid tiny llama
    spec.set("llama.block_count", U32, 10**9)       # change (or add) one metadata entry
    spec.tensors[0].dims = (0, 32)                  # or a tensor's directory entry
    path.write_bytes(spec.to_bytes())

Layout written: magic b"GGUF", u32 version, u64 tensor count, u64 metadata count; each metadata entry as
(string key, u32 value type, value); each tensor's directory entry as (string name, u32 n_dims, u64 dims
innermost first, u32 ggml type, u64 offset into the data section); zero padding to `alignment`; the tensors'
bytes. Strings are a u64 byte length and the bytes. Arrays are a u32 item type, a u64 count and the items.
`to_bytes` writes exactly what the spec says: counts, offsets and sizes may all be made inconsistent.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Metadata value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR_FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
                   U64: "<Q", I64: "<q", F64: "<d"}
# ggml tensor types used here: id -> (elements per block, bytes per block)
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8
_GGML_SIZES = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q8_0: (32, 34)}


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


@dataclass
class Array:
    """An array value: items of one type (for ARRAY items, each item is itself an Array)."""

    item_type: int
    items: list


@dataclass
class Raw:
    """A value given as its encoded bytes (to write what no well-formed value encodes to)."""

    data: bytes


def encode_value(kind: int, value: Any) -> bytes:
    """The bytes of one metadata value of type `kind` (without the type tag)."""
    if isinstance(value, Raw):
        return value.data
    if kind == STRING:
        return gguf_string(value)
    if kind == ARRAY:
        out = [struct.pack("<IQ", value.item_type, len(value.items))]
        out += [encode_value(value.item_type, item) for item in value.items]
        return b"".join(out)
    return struct.pack(_SCALAR_FORMATS[kind], value)


def nested_array(depth: int) -> Raw:
    """An array holding an array holding ... `depth` levels (the innermost an empty array of u8), as bytes."""
    return Raw(struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", U8, 0))


@dataclass
class TensorSpec:
    name: str | bytes
    dims: tuple[int, ...]       # GGUF order: innermost first
    ggml_type: int
    data: bytes
    offset: int | None = None   # what the directory says; None: the truth (data always lies after the previous
                                # tensor's, aligned)


@dataclass
class GGUFSpec:
    metadata: list[tuple[str | bytes, int, Any]] = field(default_factory=list)
    tensors: list[TensorSpec] = field(default_factory=list)
    version: int = 3
    alignment: int = 32
    n_tensors: int | None = None  # None: len(tensors)
    n_kv: int | None = None       # None: len(metadata)
    magic: bytes = b"GGUF"

    def set(self, key: str, kind: int, value: Any) -> "GGUFSpec":
        """Replace the entry `key` (keeping its place) or append it."""
        for i, (k, _, _) in enumerate(self.metadata):
            if k == key:
                self.metadata[i] = (key, kind, value)
                return self
        self.metadata.append((key, kind, value))
        return self

    def drop(self, key: str) -> "GGUFSpec":
        self.metadata = [m for m in self.metadata if m[0] != key]
        return self

    def tensor(self, name: str) -> TensorSpec:
        return next(t for t in self.tensors if t.name == name)

    def to_bytes(self) -> bytes:
        out = [self.magic, struct.pack("<I", self.version),
               struct.pack("<QQ", len(self.tensors) if self.n_tensors is None else self.n_tensors,
                           len(self.metadata) if self.n_kv is None else self.n_kv)]
        for key, kind, value in self.metadata:
            out += [gguf_string(key), struct.pack("<I", kind), encode_value(kind, value)]
        natural, pos = [], 0  # where each tensor's data goes: after the previous one's, aligned
        for t in self.tensors:
            pos = (pos + self.alignment - 1) // self.alignment * self.alignment
            natural.append(pos)
            pos += len(t.data)
        for t, offset in zip(self.tensors, natural):  # the directory says `t.offset` when given
            out += [gguf_string(t.name), struct.pack("<I", len(t.dims)), *(struct.pack("<Q", d) for d in t.dims),
                    struct.pack("<IQ", t.ggml_type, offset if t.offset is None else t.offset)]
        header = b"".join(out)
        start = (len(header) + self.alignment - 1) // self.alignment * self.alignment
        data = bytearray(pos)
        for t, offset in zip(self.tensors, natural):
            data[offset:offset + len(t.data)] = t.data
        end = (pos + self.alignment - 1) // self.alignment * self.alignment  # the last tensor padded too
        return header + bytes(start - len(header)) + bytes(data) + bytes(end - pos)


def f32_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator, scale: float = 1.0) -> TensorSpec:
    """An F32 tensor of torch shape `shape` (rows first), random normal * scale."""
    data = (rng.standard_normal(shape) * scale).astype("<f4")
    return TensorSpec(name, tuple(reversed(shape)), GGML_F32, data.tobytes())


TINY = dict(vocab=512, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, context=256)


def tiny_llama_spec(*, tokens: list[str], token_types: list[int], merges: list[str], chat_template: str,
                    seed: int = 0, **sizes: int) -> GGUFSpec:
    """A valid tiny llama GGUF (F32 weights, byte-level BPE tokenizer): the base every corruption starts from.

    tokens/token_types/merges: a "gpt2" vocabulary of exactly `vocab` entries (e.g. tests/checkpoints.py's
    tiny_tokenizer); sizes: TINY's keys (vocab, hidden, intermediate, layers, heads, kv_heads, context).
    """
    s = {**TINY, **sizes}
    v, h, i, n = s["vocab"], s["hidden"], s["intermediate"], s["layers"]
    hd = h // s["heads"]
    rng = np.random.default_rng(seed)
    spec = GGUFSpec()
    for key, kind, value in (
        ("general.architecture", STRING, "llama"), ("general.name", STRING, "tiny hostile"),
        ("llama.block_count", U32, n), ("llama.context_length", U32, s["context"]),
        ("llama.embedding_length", U32, h), ("llama.feed_forward_length", U32, i),
        ("llama.attention.head_count", U32, s["heads"]), ("llama.attention.head_count_kv", U32, s["kv_heads"]),
        ("llama.rope.freq_base", F32, 10000.0), ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.vocab_size", U32, v), ("general.alignment", U32, 32),
        ("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.pre", STRING, "default"),
        ("tokenizer.ggml.tokens", ARRAY, Array(STRING, tokens)),
        ("tokenizer.ggml.token_type", ARRAY, Array(I32, token_types)),
        ("tokenizer.ggml.merges", ARRAY, Array(STRING, merges)),
        ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.add_bos_token", BOOL, True), ("tokenizer.chat_template", STRING, chat_template),
    ):
        spec.set(key, kind, value)
    spec.tensors += [f32_tensor("token_embd.weight", (v, h), rng), f32_tensor("output_norm.weight", (h,), rng, 0.1),
                     f32_tensor("output.weight", (v, h), rng, h ** -0.5)]
    for layer in range(n):
        p = f"blk.{layer}."
        spec.tensors += [
            f32_tensor(p + "attn_norm.weight", (h,), rng, 0.1), f32_tensor(p + "ffn_norm.weight", (h,), rng, 0.1),
            f32_tensor(p + "attn_q.weight", (s["heads"] * hd, h), rng, h ** -0.5),
            f32_tensor(p + "attn_k.weight", (s["kv_heads"] * hd, h), rng, h ** -0.5),
            f32_tensor(p + "attn_v.weight", (s["kv_heads"] * hd, h), rng, h ** -0.5),
            f32_tensor(p + "attn_output.weight", (h, s["heads"] * hd), rng, h ** -0.5),
            f32_tensor(p + "ffn_gate.weight", (i, h), rng, h ** -0.5),
            f32_tensor(p + "ffn_up.weight", (i, h), rng, h ** -0.5),
            f32_tensor(p + "ffn_down.weight", (h, i), rng, i ** -0.5),
        ]
    for t in spec.tensors:  # norms near 1
        if t.name.endswith("norm.weight"):
            t.data = (np.frombuffer(t.data, "<f4") + 1.0).astype("<f4").tobytes()
    return spec
