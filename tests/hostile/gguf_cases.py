"""GGUF files: every header field, metadata values of every type in the wrong place, arrays, the tensor
directory, sentencepiece vocabularies, and seeded random mutations of the header."""
from __future__ import annotations

import random
import struct
from typing import Any, Callable

import numpy as np

from . import gguf_writer as W
from .core import Ctx, case


# ---------------------------------------------------------------------------------------------------------
# GGUF: header fields

def _header(ctx: Ctx, edit: Callable[[W.GGUFSpec], None]) -> str:
    spec = ctx.spec()
    edit(spec)
    return ctx.gguf(spec)


for _name, _edit, _names in [
    ("magic", lambda s: setattr(s, "magic", b"GGML"), ("{path}", "not a GGUF file")),
    ("version-1", lambda s: setattr(s, "version", 1), ("{path}", "version")),
    ("version-4", lambda s: setattr(s, "version", 4), ("{path}", "version")),
    ("version-big-endian", lambda s: setattr(s, "version", 3 << 24), ("{path}", "big-endian")),
    ("n_tensors-2**63", lambda s: setattr(s, "n_tensors", 2**63), ("{path}", "cannot fit")),
    ("n_kv-2**64-1", lambda s: setattr(s, "n_kv", 2**64 - 1), ("{path}", "cannot fit")),
    ("n_kv-one-too-many", lambda s: setattr(s, "n_kv", len(s.metadata) + 1), ("{path}",)),
    ("n_kv-one-too-few", lambda s: setattr(s, "n_kv", len(s.metadata) - 1), ("{path}",)),
    ("n_tensors-one-too-few", lambda s: setattr(s, "n_tensors", len(s.tensors) - 1), ("{path}",)),
    ("n_tensors-one-too-many", lambda s: setattr(s, "n_tensors", len(s.tensors) + 1), ("{path}",)),
    ("n_tensors-zero", lambda s: setattr(s, "n_tensors", 0), ("{path}",)),
]:
    case("gguf", f"gguf-header-{_name}", "ModelFileError", *_names)(lambda ctx, e=_edit: ctx.load(_header(ctx, e)))


@case("gguf", "gguf-empty-file", "ModelFileError", "{path}")
def _(ctx):
    return ctx.load(ctx.file("empty.gguf", b""))


@case("gguf", "gguf-23-bytes", "ModelFileError", "{path}", "truncated")
def _(ctx):
    return ctx.load(ctx.file("short.gguf", ctx.spec().to_bytes()[:23]))


for _fraction in (0.01, 0.1, 0.3, 0.6, 0.9, 0.999):
    case("gguf", f"gguf-truncated-at-{_fraction}", "ModelFileError", "{path}", "truncated")(
        lambda ctx, fr=_fraction: ctx.load(ctx.gguf(ctx.spec().to_bytes()[:int(len(ctx.spec().to_bytes()) * fr)])))


# ---------------------------------------------------------------------------------------------------------
# GGUF: metadata values of every type in the wrong place

def _meta(ctx: Ctx, key: str, kind: int, value: Any, *, drop: bool = False) -> str:
    spec = ctx.spec()
    if drop:
        spec.drop(key)
    else:
        spec.set(key, kind, value)
    return ctx.gguf(spec)


_WRONG_TYPES = {  # kind name -> (kind, value)
    "string": (W.STRING, "2"), "f32": (W.F32, 2.0), "f64": (W.F64, 2.5), "bool": (W.BOOL, True),
    "array-u32": (W.ARRAY, W.Array(W.U32, [2])), "i8-negative": (W.I8, -2), "u64-2**40": (W.U64, 2**40),
}
for _key in ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.context_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.vocab_size"):
    for _label, (_kind, _value) in _WRONG_TYPES.items():
        case("gguf", f"gguf-{_key}-as-{_label}", "ModelFileError", "{path}", _key)(
            lambda ctx, k=_key, kd=_kind, v=_value: ctx.load(_meta(ctx, k, kd, v)))
    case("gguf", f"gguf-{_key}-zero", "ModelFileError", "{path}", _key)(
        lambda ctx, k=_key: ctx.load(_meta(ctx, k, W.U32, 0)))

for _key in ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"):
    for _label, (_kind, _value) in [("string", (W.STRING, "1e4")), ("bool", (W.BOOL, True)),
                                    ("nan", (W.F32, float("nan"))), ("inf", (W.F64, float("inf"))),
                                    ("negative", (W.F32, -1.0)), ("array", (W.ARRAY, W.Array(W.F32, [1.0])))]:
        case("gguf", f"gguf-{_key}-as-{_label}", "ModelFileError", "{path}", _key)(
            lambda ctx, k=_key, kd=_kind, v=_value: ctx.load(_meta(ctx, k, kd, v)))

for _label, (_kind, _value) in [("string", (W.STRING, "32")), ("zero", (W.U32, 0)), ("three", (W.U32, 3)),
                                ("f32", (W.F32, 32.0)), ("2**40", (W.U64, 2**40)), ("bool", (W.BOOL, True))]:
    case("gguf", f"gguf-general.alignment-{_label}", "ModelFileError", "{path}", "general.alignment")(
        lambda ctx, kd=_kind, v=_value: ctx.load(_meta(ctx, "general.alignment", kd, v)))

for _key, _kind, _value, _label in [
    ("general.architecture", W.U32, 7, "int"), ("general.architecture", W.STRING, "qwen2", "qwen2"),
    ("tokenizer.ggml.model", W.U32, 1, "int"), ("tokenizer.ggml.model", W.STRING, "bert", "bert"),
    ("tokenizer.ggml.pre", W.ARRAY, W.Array(W.STRING, ["default"]), "array"),
    ("tokenizer.ggml.pre", W.STRING, "jais", "unknown"),
    ("tokenizer.ggml.tokens", W.STRING, "abc", "string"),
    ("tokenizer.ggml.tokens", W.ARRAY, W.Array(W.U32, [1, 2, 3]), "ints"),
    ("tokenizer.ggml.tokens", W.ARRAY, W.Array(W.ARRAY, [W.Array(W.STRING, ["a"])]), "nested"),
    ("tokenizer.ggml.tokens", W.ARRAY, W.Array(W.STRING, []), "empty"),
    ("tokenizer.ggml.token_type", W.ARRAY, W.Array(W.STRING, ["1"] * 512), "strings"),
    ("tokenizer.ggml.token_type", W.ARRAY, W.Array(W.I32, [1] * 100), "short"),
    ("tokenizer.ggml.merges", W.ARRAY, W.Array(W.U32, [1, 2]), "ints"),
    ("tokenizer.ggml.merges", W.STRING, "a b", "string"),
    ("tokenizer.ggml.merges", W.ARRAY, W.Array(W.STRING, ["a"]), "one-part"),
    ("tokenizer.ggml.merges", W.ARRAY, W.Array(W.STRING, ["<unknown> x"]), "unknown-token"),
    ("tokenizer.ggml.bos_token_id", W.U32, 10**6, "out-of-vocab"),
    ("tokenizer.ggml.bos_token_id", W.STRING, "1", "string"),
    ("tokenizer.ggml.eos_token_id", W.F32, 2.0, "f32"),
    ("tokenizer.ggml.eos_token_id", W.I32, -1, "negative"),
    ("tokenizer.ggml.add_bos_token", W.STRING, "false", "string"),
    ("tokenizer.ggml.add_bos_token", W.U8, 1, "u8"),
    ("tokenizer.ggml.add_space_prefix", W.STRING, "true", "string"),
    ("tokenizer.chat_template", W.U32, 5, "int"),
    ("tokenizer.chat_template", W.ARRAY, W.Array(W.STRING, ["{{ x }}"]), "array"),
    ("llama.rope.scaling.type", W.U32, 1, "int"),
    ("llama.rope.scaling.type", W.STRING, "yarn", "yarn"),
    ("llama.expert_count", W.STRING, "8", "string"),
    ("llama.rope.dimension_count", W.U32, 4, "partial"),
    ("llama.attention.key_length", W.STRING, "8", "string"),
]:
    case("gguf", f"gguf-{_key}-{_label}", "ModelFileError", "{path}", _key)(
        lambda ctx, k=_key, kd=_kind, v=_value: ctx.load(_meta(ctx, k, kd, v)))

for _key in ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.block_count",
             "llama.embedding_length"):
    case("gguf", f"gguf-missing-{_key}", "ModelFileError", "{path}", _key)(
        lambda ctx, k=_key: ctx.load(_meta(ctx, k, 0, None, drop=True)))


@case("gguf", "gguf-merge-result-not-a-token", "ModelFileError", "{path}", "tokenizer.ggml.merges[0]")
def _(ctx):
    # tokenizers panics (a BaseException) on a merge whose result is not in the vocabulary
    return ctx.load(_meta(ctx, "tokenizer.ggml.merges", W.ARRAY, W.Array(W.STRING, ["Ġ <s>"])))


@case("gguf", "gguf-duplicate-key", "ModelFileError", "{path}", "llama.block_count", "twice")
def _(ctx):
    spec = ctx.spec()
    spec.metadata.append(("llama.block_count", W.U32, 2))
    return ctx.load(ctx.gguf(spec))


@case("gguf", "gguf-unknown-value-type", "ModelFileError", "{path}", "x.odd", "unknown value type 13")
def _(ctx):
    return ctx.load(_meta(ctx, "x.odd", 13, W.Raw(b"\0" * 8)))


@case("gguf", "gguf-unknown-array-item-type", "ModelFileError", "{path}", "x.odd", "unknown value type 200")
def _(ctx):
    return ctx.load(_meta(ctx, "x.odd", W.ARRAY, W.Raw(struct.pack("<IQ", 200, 1) + b"\0" * 8)))


@case("gguf", "gguf-string-not-utf8", "ModelFileError", "{path}", "general.name", "UTF-8")
def _(ctx):
    return ctx.load(_meta(ctx, "general.name", W.STRING, W.Raw(W.gguf_string(b"\xff\xfe"))))


@case("gguf", "gguf-key-not-utf8", "ModelFileError", "{path}", "UTF-8")
def _(ctx):
    spec = ctx.spec()
    spec.metadata.append((b"\xff\xfe", W.U32, 1))
    return ctx.load(ctx.gguf(spec))


@case("gguf", "gguf-string-length-2**60", "ModelFileError", "{path}", "general.name", "truncated")
def _(ctx):
    return ctx.load(_meta(ctx, "general.name", W.STRING, W.Raw(struct.pack("<Q", 2**60) + b"abc")))


@case("gguf", "gguf-array-count-2**60", "ModelFileError", "{path}", "x.big", "does not fit")
def _(ctx):
    return ctx.load(_meta(ctx, "x.big", W.ARRAY, W.Raw(struct.pack("<IQ", W.U32, 2**60))))


@case("gguf", "gguf-string-array-count-2**60", "ModelFileError", "{path}", "x.big", "does not fit")
def _(ctx):
    return ctx.load(_meta(ctx, "x.big", W.ARRAY, W.Raw(struct.pack("<IQ", W.STRING, 2**60))))


@case("gguf", "gguf-5000-nested-arrays", "ModelFileError", "{path}", "x.nested", "nested")
def _(ctx):
    return ctx.load(_meta(ctx, "x.nested", W.ARRAY, W.nested_array(5000)))


@case("gguf", "gguf-block_count-10**9", "ModelFileError", "{path}", "llama.block_count", "declares 1000000000")
def _(ctx):
    return ctx.load(_meta(ctx, "llama.block_count", W.U32, 10**9))


@case("gguf", "gguf-block_count-too-few", "ModelFileError", "{path}", "blk.1.")
def _(ctx):
    return ctx.load(_meta(ctx, "llama.block_count", W.U32, 1))


@case("gguf", "gguf-context_length-2**40", "ModelFileError", "{path}", "llama.context_length")
def _(ctx):
    return ctx.load(_meta(ctx, "llama.context_length", W.U64, 2**40))


def _rope_rows(engine) -> int:
    return engine.runner.model.rope.shape[0]


@case("gguf", "gguf-context_length-2**24-rope-sized-by-cache", None,
      check=lambda rows: None if rows == 64 * 16 else f"RoPE table has {rows} rows, expected 1024 (the cache's tokens)")
def _(ctx):
    return _rope_rows(ctx.new_engine(model=ctx.load(_meta(ctx, "llama.context_length", W.U32, 2**24))))


@case("gguf", "gguf-context_length-2**31-1-default-cache", None,
      check=lambda rows: None if rows < 2**26 else f"RoPE table has {rows} rows")
def _(ctx):
    eng = ctx.new_engine(model=ctx.load(_meta(ctx, "llama.context_length", W.U32, 2**31 - 1)), num_kv_blocks=None,
                         kv_cache_memory=64 << 20)
    return _rope_rows(eng)


@case("gguf", "gguf-vocab_size-mismatch", "ModelFileError", "{path}", "token_embd.weight")
def _(ctx):
    return ctx.load(_meta(ctx, "llama.vocab_size", W.U32, 1000))


# ---------------------------------------------------------------------------------------------------------
# GGUF: the tensor directory

def _tensor(ctx: Ctx, tensor_name: str, **fields) -> str:
    spec = ctx.spec()
    t = spec.tensor(tensor_name)
    for key, value in fields.items():
        setattr(t, key, value)
    return ctx.gguf(spec)


for _label, _tname, _fields, _names in [
    ("zero-dims", "output_norm.weight", dict(dims=()), ("output_norm.weight", "0 dims")),
    ("five-dims", "output_norm.weight", dict(dims=(32, 1, 1, 1, 1)), ("output_norm.weight", "5 dims")),
    ("a-zero-dim", "output_norm.weight", dict(dims=(0,)), ("output_norm.weight", "zero dim")),
    ("dims-with-zero", "token_embd.weight", dict(dims=(32, 0)), ("token_embd.weight", "zero dim")),
    ("dims-2**62", "output_norm.weight", dict(dims=(2**62,)), ("output_norm.weight",)),
    ("dims-2**64-1", "token_embd.weight", dict(dims=(2**64 - 1, 2**64 - 1)), ("token_embd.weight",)),
    ("unknown-type", "output_norm.weight", dict(ggml_type=99), ("output_norm.weight", "ggml type 99")),
    ("type-f16-for-f32-data", "output_norm.weight", dict(ggml_type=W.GGML_F16), ("output",)),
    ("type-q8-rows-not-blocks", "output_norm.weight", dict(ggml_type=W.GGML_Q8_0, dims=(33,)),
     ("output_norm.weight", "blocks")),
    ("offset-overlaps", "output_norm.weight", dict(offset=0), ("output_norm.weight", "overlaps")),
    ("offset-misaligned", "output_norm.weight", dict(offset=65540), ("output_norm.weight", "aligned")),
    ("offset-gap", "output_norm.weight", dict(offset=65536 + 64), ("output_norm.weight", "gap")),
    ("offset-2**64-1", "output_norm.weight", dict(offset=2**64 - 1), ("output_norm.weight",)),
    ("first-offset-not-0", "token_embd.weight", dict(offset=32), ("token_embd.weight",)),
    ("name-not-utf8", "output_norm.weight", dict(name=b"\xff"), ("UTF-8",)),
    ("name-duplicate", "output_norm.weight", dict(name="token_embd.weight"), ("token_embd.weight", "twice")),
    ("shape-wrong", "output_norm.weight", dict(dims=(16,), data=b"\0" * 64), ("output_norm.weight", "shape")),
    ("unexpected-name", "output_norm.weight", dict(name="blk.0.attn_q.bias"), ("blk.0.attn_q.bias",)),
    ("huge-layer-index", "blk.1.ffn_up.weight", dict(name="blk." + "9" * 5000 + ".ffn_up.weight"), ("unexpected",)),
]:
    case("gguf", f"gguf-tensor-{_label}", "ModelFileError", "{path}", *_names)(
        lambda ctx, n=_tname, f=_fields: ctx.load(_tensor(ctx, n, **f)))


@case("gguf", "gguf-tensor-last-type-mismatch", "ModelFileError", "{path}", "blk.1.ffn_down.weight")
def _(ctx):
    return ctx.load(_tensor(ctx, "blk.1.ffn_down.weight", ggml_type=W.GGML_F16))


@case("gguf", "gguf-tensor-missing", "ModelFileError", "{path}", "blk.1.ffn_up.weight", "missing")
def _(ctx):
    spec = ctx.spec()
    spec.tensors = [t for t in spec.tensors if t.name != "blk.1.ffn_up.weight"]
    return ctx.load(ctx.gguf(spec))


@case("gguf", "gguf-tensor-unsupported-type", "ModelFileError", "{path}", "output_norm.weight", "ggml type 6")
def _(ctx):
    return ctx.load(_tensor(ctx, "output_norm.weight", ggml_type=6, data=b"\0" * 22))  # Q5_0: 32 values in 22 bytes


@case("gguf", "gguf-rope_freqs-wrong-size", "ModelFileError", "{path}", "rope_freqs.weight")
def _(ctx):
    spec = ctx.spec()
    spec.tensors.insert(1, W.TensorSpec("rope_freqs.weight", (3,), W.GGML_F32, b"\0" * 12))
    return ctx.load(ctx.gguf(spec))


# ---------------------------------------------------------------------------------------------------------
# GGUF: sentencepiece vocabularies (merges rebuilt from the tokens)

def _sentencepiece(ctx: Ctx, extra: list[str], *, scores: W.Array | None = None, unk: int | None = None) -> str:
    """A "llama" (sentencepiece BPE) vocabulary: <unk> <s> </s>, the 256 byte tokens, then pieces."""
    spec = ctx.spec()
    vocab = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581", "a", "b", "ab", *extra]
    spec.set("tokenizer.ggml.model", W.STRING, "llama")
    spec.set("tokenizer.ggml.tokens", W.ARRAY, W.Array(W.STRING, vocab))
    spec.set("tokenizer.ggml.token_type", W.ARRAY, W.Array(W.I32, [2, 3, 3] + [6] * 256 + [1] * (len(vocab) - 259)))
    spec.set("tokenizer.ggml.scores", W.ARRAY, scores or W.Array(W.F32, [-float(i) for i in range(len(vocab))]))
    if unk is not None:
        spec.set("tokenizer.ggml.unknown_token_id", W.U32, unk)
    spec.set("llama.vocab_size", W.U32, len(vocab))
    spec.drop("tokenizer.ggml.merges")
    for name in ("token_embd.weight", "output.weight"):
        spec.tensor(name).dims = (W.TINY["hidden"], len(vocab))
        spec.tensor(name).data = np.zeros((len(vocab), W.TINY["hidden"]), "<f4").tobytes()
    return ctx.gguf(spec)


@case("gguf", "gguf-sentencepiece-200k-char-token", None,
      check=lambda ids: None if ids else "no tokens")
def _(ctx):
    return ctx.load(_sentencepiece(ctx, ["a" * 200_000])).tokenizer.encode("ab ab")


@case("gguf", "gguf-sentencepiece-merges-explode", "ModelFileError", "{path}", "tokenizer.ggml.tokens", "merges")
def _(ctx):
    return ctx.load(_sentencepiece(ctx, ["a" * k for k in range(3, 800)]))


@case("gguf", "gguf-sentencepiece-scores-strings", "ModelFileError", "{path}", "tokenizer.ggml.scores")
def _(ctx):
    return ctx.load(_sentencepiece(ctx, [], scores=W.Array(W.STRING, ["x"] * 263)))


@case("gguf", "gguf-sentencepiece-scores-short", "ModelFileError", "{path}", "tokenizer.ggml.scores")
def _(ctx):
    return ctx.load(_sentencepiece(ctx, [], scores=W.Array(W.F32, [0.0])))


@case("gguf", "gguf-sentencepiece-unknown_token_id-out-of-range", "ModelFileError", "{path}",
      "tokenizer.ggml.unknown_token_id")
def _(ctx):
    return ctx.load(_sentencepiece(ctx, [], unk=10**6))


# ---------------------------------------------------------------------------------------------------------
# GGUF: seeded random mutations of the header (metadata and tensor directory)

_REGIONS = ("small-metadata", "vocabulary", "tensor-directory")


def _mutants(n: int, seed: int = 1234):
    """n seeded mutations of the header (the part a parser interprets): (label, kind, region, where, value, byte).

    Spread over the three regions of the header: the small metadata entries before the vocabulary, the
    vocabulary arrays, and the tensor directory; kinds: flip a byte, overwrite 8 or 4 bytes with an extreme
    value, cut the file, insert bytes, zero 16 bytes.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choice(["flip", "u64", "u32", "cut", "insert", "zero"])
        region = _REGIONS[i % len(_REGIONS)]
        value = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1, 7, 9, 13, 32])
        out.append((f"{region}-{i:02d}-{kind}", kind, region, rng.random(), value, rng.randrange(1, 256)))
    return out


def _region(data: bytes, region: str) -> tuple[int, int]:
    """Byte range of a header region of the base GGUF."""
    vocab = data.index(b"tokenizer.ggml.tokens")
    directory = data.index(b"token_embd.weight", data.index(b"tokenizer.chat_template")) - 8
    end = data.index(b"blk.1.ffn_down.weight", directory) + 21 + 4 + 16 + 4 + 8
    return {"small-metadata": (24, vocab), "vocabulary": (vocab, directory), "tensor-directory": (directory, end)}[region]


def _mutate(data: bytes, kind: str, region: str, where: float, value: int, byte: int) -> bytes:
    lo, hi = _region(data, region)
    pos = lo + int(where * (hi - lo - 1))
    b = bytearray(data)
    if kind == "flip":
        b[pos] ^= byte
    elif kind == "u64":
        b[pos:pos + 8] = struct.pack("<Q", value % 2**64)
    elif kind == "u32":
        b[pos:pos + 4] = struct.pack("<I", value % 2**32)
    elif kind == "cut":
        b = b[:pos]
    elif kind == "insert":
        b[pos:pos] = bytes([byte]) * 5
    else:
        b[pos:pos + 16] = bytes(16)
    return bytes(b)


for _label, _kind, _region_name, _where, _value, _byte in _mutants(90):
    case("gguf", f"gguf-mutant-{_label}", "ValueError|ok", "{path}")(
        lambda ctx, k=_kind, r=_region_name, w=_where, v=_value, b=_byte: ctx.load(ctx.gguf(_mutate(
            ctx.spec().to_bytes(), k, r, w, v, b))))
