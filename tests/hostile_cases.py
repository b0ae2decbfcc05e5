"""The hostile-input cases of tests/test_hostile_inputs.py: malformed GGUF files, safetensors headers,
config.json / index / tokenizer files, chat templates, prompts, engine arguments and command lines.

Each `Case` does one hostile thing in a worker process (tests/hostile_worker.py) and says what must come
of it: the exception type (or success) and the strings its message must contain, "{path}" standing for
the file the case wrote. Files are made from one valid tiny model (`build_base`: a llama GGUF written by
tests/gguf_writer.py and the same model as a Hugging Face directory), changed one field at a time, plus
seeded random mutations (`_mutants`), so the set is the same on every run.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import gguf_writer as W

GOOD_PROMPT = "The capital of France is"
GOOD_NEW_TOKENS = 4


@dataclass(frozen=True)
class Case:
    name: str
    group: str                                   # the worker batch that runs it
    run: Callable[["Ctx"], Any]
    error: str | None                            # expected exception class name (or a base of it); None: success
    names: tuple[str, ...] = ()                  # substrings of the message ("{path}": the file the case wrote)
    check: Callable[[Any], str | None] | None = None  # for a success: a problem with the result, or None


CASES: list[Case] = []


def case(group: str, name: str, error: str | None, *names: str, check=None):
    def register(fn):
        CASES.append(Case(name, group, fn, error, names, check))
        return fn
    return register


# ---------------------------------------------------------------------------------------------------------
# The base model, built once by the test process.

def vocab_parts(vocab_size: int = W.TINY["vocab"]) -> dict:
    """tokens, token types and merges of tests/checkpoints.py's tiny byte-level BPE, as a GGUF holds them."""
    from checkpoints import SPECIAL_TOKENS, tiny_tokenizer

    tok = tiny_tokenizer(vocab_size)
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    special = set(SPECIAL_TOKENS) | {t for t in tokens if t.startswith("<|reserved_")}
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    return {"tokens": tokens, "types": [3 if t in special else 1 for t in tokens], "merges": merges,
            "tokenizer_json": tok.to_str()}


def base_spec(parts: dict) -> W.GGUFSpec:
    from checkpoints import CHATML_TEMPLATE

    return W.tiny_llama_spec(tokens=parts["tokens"], token_types=parts["types"], merges=parts["merges"],
                             chat_template=CHATML_TEMPLATE)


def build_base(base: str) -> None:
    """base/vocab.json, base/base.gguf, base/hf/ (a valid Hugging Face directory of the same shapes)."""
    from safetensors.numpy import save_file

    from checkpoints import BOS_ID, CHATML_TEMPLATE, EOS_ID, SPECIAL_TOKENS

    os.makedirs(base, exist_ok=True)
    parts = vocab_parts()
    with open(os.path.join(base, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(parts, f)
    with open(os.path.join(base, "base.gguf"), "wb") as f:
        f.write(base_spec(parts).to_bytes())
    t = W.TINY
    hf = os.path.join(base, "hf")
    os.makedirs(hf, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": t["vocab"],
              "hidden_size": t["hidden"], "intermediate_size": t["intermediate"], "num_hidden_layers": t["layers"],
              "num_attention_heads": t["heads"], "num_key_value_heads": t["kv_heads"],
              "max_position_embeddings": t["context"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
              "torch_dtype": "float32", "hidden_act": "silu"}
    _dump(os.path.join(hf, "config.json"), config)
    _dump(os.path.join(hf, "generation_config.json"), {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID]})
    with open(os.path.join(hf, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(parts["tokenizer_json"])
    _dump(os.path.join(hf, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID], "chat_template": CHATML_TEMPLATE})
    rng = np.random.default_rng(1)
    h, i, v, hd = t["hidden"], t["intermediate"], t["vocab"], t["hidden"] // t["heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(t["layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (t["heads"] * hd, h),
                       p + "self_attn.k_proj.weight": (t["kv_heads"] * hd, h),
                       p + "self_attn.v_proj.weight": (t["kv_heads"] * hd, h),
                       p + "self_attn.o_proj.weight": (h, t["heads"] * hd), p + "mlp.gate_proj.weight": (i, h),
                       p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)})
    save_file({k: (rng.standard_normal(s) * 0.2).astype(np.float32) for k, s in shapes.items()},
              os.path.join(hf, "model.safetensors"))


def _dump(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


# ---------------------------------------------------------------------------------------------------------
# What a case gets in the worker.

@dataclass
class Ctx:
    base: str
    tmp: str
    parts: dict
    spec0: W.GGUFSpec
    loaded: Any = None            # the valid GGUF, loaded (fp32, CPU)
    engine: Any = None            # an engine over it: serves the good request after every case
    path: str | None = None       # the file the current case wrote
    counter: int = 0
    extra: dict = field(default_factory=dict)

    def spec(self) -> W.GGUFSpec:
        return copy.deepcopy(self.spec0)

    def file(self, name: str, data: bytes | str) -> str:
        self.counter += 1
        path = os.path.join(self.tmp, f"{self.counter:03d}-{name}")
        with open(path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        self.path = path
        return path

    def gguf(self, spec_or_bytes, name: str = "m.gguf") -> str:
        data = spec_or_bytes if isinstance(spec_or_bytes, (bytes, bytearray)) else spec_or_bytes.to_bytes()
        return self.file(name, bytes(data))

    def hf(self, edit: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> str:
        """A copy of the base Hugging Face directory with files replaced: {name: bytes | str | JSON value}.
        self.path becomes the (last) edited file."""
        self.counter += 1
        path = os.path.join(self.tmp, f"{self.counter:03d}-hf")
        shutil.copytree(os.path.join(self.base, "hf"), path)
        self.path = path
        for name in drop:
            os.remove(os.path.join(path, name))
        for name, content in (edit or {}).items():
            target = os.path.join(path, name)
            if isinstance(content, bytes):
                data = content
            elif isinstance(content, str):
                data = content.encode("utf-8")
            else:
                data = json.dumps(content).encode("utf-8")
            with open(target, "wb") as f:
                f.write(data)
            self.path = target
        return path

    def config(self, **changes) -> str:
        """The base directory with config.json keys changed (a value of DROP removes the key)."""
        with open(os.path.join(self.base, "hf", "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        for key, value in changes.items():
            if value is DROP:
                config.pop(key, None)
            else:
                config[key] = value
        return self.hf({"config.json": config})

    def tokenizer_config(self, **changes) -> str:
        with open(os.path.join(self.base, "hf", "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config.update(changes)
        return self.hf({"tokenizer_config.json": config})

    def load(self, path: str):
        import torch

        from trinfer.runtime.loader import load_model_files

        return load_model_files(path, device="cpu", dtype=torch.float32, progress=False)

    def templated(self, template: Any):
        """A tokenizer of the base model with `template` as its chat template (origin "test template")."""
        from trinfer.runtime.tokenizer import Tokenizer

        tok = self.loaded.tokenizer
        return Tokenizer(tok.backend, bos_token_id=tok.bos_token_id, eos_token_ids=tok.eos_token_ids,
                         add_bos_token=tok.add_bos_token, chat_template=template, chat_template_origin="test template")

    def render(self, template: str) -> str:
        return self.templated(template).apply_chat_template([{"role": "user", "content": "hi"}])

    def new_engine(self, model=None, **kwargs):
        """An engine over `model` (default: the base model): torch backend, 64 KV blocks of 16, 4 sequences."""
        from trinfer.runtime import Engine

        kw = dict(device="cpu", backend="torch", num_kv_blocks=64, max_num_seqs=4)
        kw.update(kwargs)
        return Engine(model if model is not None else self.loaded, **kw)


DROP = object()


def _cli(ctx: Ctx, argv: list[str], stdin: bytes | None = None) -> dict:
    """Run `trinfer` in this process: {"rc", "err", "out"}."""
    import contextlib
    import io
    import sys

    from trinfer.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        sys.stdin = saved
    return {"rc": rc, "err": err.getvalue(), "out": out.getvalue()}


def cli_refused(*names: str):
    """check for a CLI case: exit 2, one line "trinfer: error: ..." naming `names`, no traceback."""
    def check(result: dict) -> str | None:
        err = result["err"]
        lines = err.strip("\n").split("\n")
        if result["rc"] != 2:
            return f"exit status {result['rc']}, expected 2; stderr: {err[-500:]!r}"
        if len(lines) != 1 or not lines[0].startswith("trinfer: error: ") or "Traceback" in err:
            return f"expected one line 'trinfer: error: ...', got {err[-500:]!r}"
        missing = [n for n in names if n not in err]
        return f"stderr does not name {missing}: {err!r}" if missing else None
    return check


def _good_cli_args(ctx: Ctx, model: str) -> list[str]:
    return ["--model", model, "--max-new-tokens", "2", "--backend", "torch", "--dtype", "float32", "--device", "cpu",
            "--quiet", "--num-kv-blocks", "16"]


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


# ---------------------------------------------------------------------------------------------------------
# Hugging Face directories: config.json, generation_config.json, the index, safetensors, tokenizer files

for _key, _value, _names in [
    ("tie_word_embeddings", "false", ("tie_word_embeddings", "bool")),
    ("tie_word_embeddings", 0, ("tie_word_embeddings",)),
    ("num_hidden_layers", 10**9, ("num_hidden_layers", "declares")),
    ("num_hidden_layers", "2", ("num_hidden_layers", "int")),
    ("num_hidden_layers", 2.0, ("num_hidden_layers",)),
    ("hidden_size", 32.0, ("hidden_size",)),
    ("hidden_size", True, ("hidden_size",)),
    ("hidden_size", -32, ("hidden_size",)),
    ("hidden_size", 2**40, ("hidden_size",)),
    ("vocab_size", [512], ("vocab_size",)),
    ("intermediate_size", None, ("intermediate_size", "missing")),
    ("num_attention_heads", 0, ("num_attention_heads",)),
    ("num_key_value_heads", "2", ("num_key_value_heads",)),
    ("head_dim", {}, ("head_dim",)),
    ("max_position_embeddings", 2**40, ("max_position_embeddings",)),
    ("max_position_embeddings", "256", ("max_position_embeddings",)),
    ("rope_theta", "10000", ("rope_theta",)),
    ("rope_theta", float("nan"), ("rope_theta",)),
    ("rope_theta", float("inf"), ("rope_theta",)),
    ("rope_theta", -1, ("rope_theta",)),
    ("rms_norm_eps", True, ("rms_norm_eps",)),
    ("rms_norm_eps", "1e-5", ("rms_norm_eps",)),
    ("rope_scaling", [2.0], ("rope_scaling",)),
    ("rope_scaling", {"rope_type": "linear", "factor": "2"}, ("factor",)),
    ("rope_scaling", {"rope_type": 3, "factor": 2.0}, ("rope_type",)),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": "8192"}, ("original_max_position_embeddings",)),
    ("rope_parameters", "default", ("rope_parameters",)),
    ("architectures", "LlamaModel", ("architectures",)),
    ("architectures", [1], ("architectures",)),
    ("architectures", {"a": 1}, ("architectures",)),
    ("model_type", 5, ("model_type",)),
    ("eos_token_id", [2, "3"], ("eos_token_id",)),
    ("eos_token_id", 2.0, ("eos_token_id",)),
    ("bos_token_id", [1, 2], ("bos_token_id",)),
    ("bos_token_id", True, ("bos_token_id",)),
    ("torch_dtype", 5, ("torch_dtype",)),
    ("torch_dtype", "int8", ("torch_dtype",)),
    ("hidden_act", ["silu"], ("hidden_act",)),
    ("mlp_bias", "false", ("mlp_bias",)),
    ("attention_bias", 1, ("attention_bias",)),
    ("sliding_window", "4096", ("sliding_window",)),
    ("partial_rotary_factor", "1.0", ("partial_rotary_factor",)),
    ("num_local_experts", "8", ("num_local_experts",)),
    ("layer_types", "full_attention", ("layer_types",)),
    ("is_encoder_decoder", "no", ("is_encoder_decoder",)),
]:
    case("hf", f"config-{_key}-{json.dumps(_value)[:24]}", "ModelFileError", "config.json", *_names)(
        lambda ctx, k=_key, v=_value: ctx.load(ctx.config(**{k: v})))


@case("hf", "config-tie-false-string-is-not-read-as-true", "ModelFileError", "config.json",
      "tie_word_embeddings", "'false'")
def _(ctx):
    return ctx.load(ctx.config(tie_word_embeddings="false"))


@case("hf", "config-max_position_embeddings-2**24", None,
      check=lambda rows: None if rows == 64 * 16 else f"RoPE table has {rows} rows, expected 1024")
def _(ctx):
    return _rope_rows(ctx.new_engine(model=ctx.load(ctx.config(max_position_embeddings=2**24))))


for _label, _data in [
    ("100k-nested-lists", "[" * 100_000 + "]" * 100_000),
    ("100k-nested-objects", '{"a":' * 100_000 + "1" + "}" * 100_000),
    ("a-list", "[1, 2]"),
    ("not-utf8", b"\xff\xfe{}"),
    ("truncated", '{"architectures": ["Llama'),
    ("empty", ""),
]:
    case("hf", f"config-json-{_label}", "ModelFileError", "{path}")(
        lambda ctx, d=_data: ctx.load(ctx.hf({"config.json": d})))
    case("hf", f"generation-config-json-{_label}", "ModelFileError", "{path}")(
        lambda ctx, d=_data: ctx.load(ctx.hf({"generation_config.json": d})))
    case("hf", f"tokenizer-config-json-{_label}", "ModelFileError", "{path}")(
        lambda ctx, d=_data: ctx.load(ctx.hf({"tokenizer_config.json": d})))


@case("hf", "generation-config-eos-string", "ModelFileError", "generation_config.json", "eos_token_id")
def _(ctx):
    return ctx.load(ctx.hf({"generation_config.json": {"eos_token_id": "</s>"}}))


def _index(ctx: Ctx, weight_map: Any) -> str:
    return ctx.hf({"model.safetensors.index.json": {"metadata": {}, "weight_map": weight_map}})


for _label, _map, _names in [
    ("values-ints", {"lm_head.weight": 1}, ("weight_map",)),
    ("a-list", ["model.safetensors"], ("weight_map",)),
    ("empty", {}, ("weight_map",)),
    ("parent-dir", {"lm_head.weight": "../model.safetensors"}, ("../model.safetensors",)),
    ("nul-byte", {"lm_head.weight": "a\0.safetensors"}, ("weight_map",)),
    ("pickle", {"lm_head.weight": "pytorch_model.bin"}, ("pytorch_model.bin",)),
]:
    case("hf", f"index-weight_map-{_label}", "ModelFileError", "model.safetensors.index.json", *_names)(
        lambda ctx, m=_map: ctx.load(_index(ctx, m)))


@case("hf", "index-missing-shard", "FileNotFoundError", "model-2.safetensors")
def _(ctx):
    return ctx.load(_index(ctx, {"lm_head.weight": "model-2.safetensors"}))


def _safetensors(ctx: Ctx, header: bytes | str | dict, data: bytes = b"", length: int | None = None) -> str:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    n = len(raw) if length is None else length
    return ctx.hf({"model.safetensors": struct.pack("<Q", n) + raw + data})


def _safetensors_edit(ctx: Ctx, edit: Callable[[dict], None]) -> str:
    """The base model.safetensors with its header (a dict) changed by `edit`; the data unchanged."""
    with open(os.path.join(ctx.base, "hf", "model.safetensors"), "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return ctx.hf({"model.safetensors": struct.pack("<Q", len(raw)) + raw + blob[8 + n:]})


def _set(name: str, **fields):
    return lambda header: header[name].update(fields)


for _label, _args, _names in [
    ("header-length-past-end", dict(header="{}", length=2**40), ("truncated",)),
    ("header-length-2**64-1", dict(header="{}", length=2**64 - 1), ("truncated",)),
    ("header-not-json", dict(header=b"\xff\x00garbage"), ("not a valid safetensors",)),
    ("header-nested-100k", dict(header="[" * 100_000 + "]" * 100_000), ("not a valid safetensors",)),
    ("header-a-list", dict(header="[]"), ("not a valid safetensors",)),
]:
    case("hf", f"safetensors-{_label}", "ModelFileError", "{path}", *_names)(
        lambda ctx, a=_args: ctx.load(_safetensors(ctx, **a)))


@case("hf", "safetensors-4-byte-file", "ModelFileError", "{path}", "truncated")
def _(ctx):
    return ctx.load(ctx.hf({"model.safetensors": b"\0" * 4}))

for _label, _edit, _names in [
    ("offsets-out-of-range", _set("lm_head.weight", data_offsets=[0, 2**40]), ()),
    ("offsets-mismatch-shape", _set("lm_head.weight", shape=[512, 16]), ()),
    ("dtype-unknown", _set("lm_head.weight", dtype="X9"), ()),
    ("shape-negative", _set("lm_head.weight", shape=[-512, 32]), ()),
    ("shape-huge", _set("lm_head.weight", shape=[2**62, 2**62]), ()),
    ("int-tensor", _set("model.norm.weight", dtype="I32"), ("model.norm.weight", "floating-point")),
    ("wrong-shape", _set("model.norm.weight", shape=[8, 4]), ("model.norm.weight", "shape")),
]:
    case("hf", f"safetensors-{_label}", "ModelFileError", "hf", *_names)(
        lambda ctx, e=_edit: ctx.load(_safetensors_edit(ctx, e)))


def _safetensors_arrays(ctx: Ctx, edit: Callable[[dict], None]) -> str:
    """The base model.safetensors re-written with its tensors (a name -> array dict) changed by `edit`."""
    from safetensors.numpy import load_file, save_file

    arrays = load_file(os.path.join(ctx.base, "hf", "model.safetensors"))
    edit(arrays)
    path = ctx.hf()
    save_file(arrays, os.path.join(path, "model.safetensors"))
    return path


for _label, _edit, _names in [
    ("unexpected-tensor", lambda a: a.update({"model.layers.0.mlp.gate_proj.bias": np.zeros(48, np.float32)}),
     ("gate_proj.bias",)),
    ("huge-layer-index", lambda a: a.update({"model.layers." + "9" * 5000 + ".mlp.up_proj.weight":
                                                 np.zeros(4, np.float32)}), ("unexpected",)),
    ("missing-tensor", lambda a: a.pop("model.layers.1.mlp.up_proj.weight"), ("model.layers.1.mlp.up_proj.weight",)),
    ("layer-beyond-the-config", lambda a: a.update({"model.layers.2.input_layernorm.weight": np.ones(32, np.float32)}),
     ("model.layers.2.input_layernorm.weight",)),
]:
    case("hf", f"safetensors-{_label}", "ModelFileError", "hf", *_names)(
        lambda ctx, e=_edit: ctx.load(_safetensors_arrays(ctx, e)))


@case("hf", "tokenizer-json-broken", "ModelFileError", "{path}", "tokenizer.json")
def _(ctx):
    return ctx.load(ctx.hf({"tokenizer.json": "{broken"}))


@case("hf", "tokenizer-json-merge-not-in-vocab", "ModelFileError", "{path}", "tokenizer.json")
def _(ctx):
    bad = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}}
    return ctx.load(ctx.hf({"tokenizer.json": bad}))


for _key, _value in [("add_bos_token", "false"), ("add_eos_token", 1), ("bos_token", 5),
                     ("eos_token", {"content": 5}), ("chat_template", 5), ("chat_template", ["x"])]:
    case("hf", f"tokenizer-config-{_key}-{json.dumps(_value)}", "ModelFileError", "tokenizer_config.json", _key)(
        lambda ctx, k=_key, v=_value: ctx.load(ctx.tokenizer_config(**{k: v})))


@case("hf", "tokenizer-config-eos-not-in-vocab", "ModelFileError", "tokenizer_config.json", "eos_token")
def _(ctx):
    return ctx.load(ctx.tokenizer_config(eos_token="<|nope|>"))


@case("hf", "chat-template-jinja-not-utf8", "ModelFileError", "{path}", "UTF-8")
def _(ctx):
    return ctx.load(ctx.hf({"chat_template.jinja": b"\xff{{ x }}"}))


@case("hf", "config-num_hidden_layers-10**9", "ModelFileError", "config.json", "num_hidden_layers", "declares")
def _(ctx):
    return ctx.load(ctx.config(num_hidden_layers=10**9))


# Paths that are not model files.

@case("hf", "path-dev-zero", "ModelFileError", "/dev/zero", "character device")
def _(ctx):
    return ctx.load("/dev/zero")


@case("hf", "path-named-pipe", "ModelFileError", "{path}", "named pipe")
def _(ctx):
    path = os.path.join(ctx.tmp, "fifo.gguf")
    os.mkfifo(path)
    ctx.path = path
    return ctx.load(path)  # refused without opening it (opening a pipe would block)


@case("hf", "path-directory-named-gguf", "FileNotFoundError", "{path}")
def _(ctx):
    path = os.path.join(ctx.tmp, "x.gguf")
    os.makedirs(path, exist_ok=True)
    ctx.path = path
    return ctx.load(path)


@case("hf", "path-directory-holding-a-directory-named-gguf", "FileNotFoundError", "{path}")
def _(ctx):
    path = os.path.join(ctx.tmp, "holder")
    os.makedirs(os.path.join(path, "y.gguf"), exist_ok=True)
    ctx.path = path
    return ctx.load(path)


@case("hf", "path-missing", "FileNotFoundError", "/no/such/model")
def _(ctx):
    return ctx.load("/no/such/model")


# ---------------------------------------------------------------------------------------------------------
# Chat templates (rendered with the base model's tokenizer)

_HUGE = 10**9
for _label, _template, _names in [
    ("nested-loops-1e5x1e5", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     ("refused: ", "more than")),  # steps or seconds, whichever comes first on this machine
    ("string-times-1e9", "{{ ('a' * 1000000000) | length }}", ("'*'",)),
    ("list-times-1e8", "{{ ([1] * 100000000) | length }}", ("'*'",)),
    ("doubling-by-tilde", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                          "{% endfor %}{{ ns.s | length }}", ("'~'",)),
    ("doubling-by-plus", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                         "{% endfor %}{{ ns.s | length }}", ("'+'",)),
    ("set-block-amplifies", "{% set s = 'a' * 4000000 %}{% set t %}{% for i in range(1000) %}{{ s }}{% endfor %}"
                            "{% endset %}{{ t | length }}", ("emits more than",)),
    ("output-too-long", "{% for i in range(100) %}{{ 'a' * 100000 }}{% endfor %}", ("longer than",)),
    ("center-1e9", "{{ 'x' | center(1000000000) }}", ("1000000000",)),
    ("str-center-1e9", "{{ 'x'.center(1000000000) }}", ("1000000000",)),
    ("percent-width", "{{ '%1000000000d' % 1 }}", ("1000000000",)),
    ("format-filter-width", "{{ '%1000000000d' | format(1) }}", ("1000000000",)),
    ("str-format-width", "{{ '{:>1000000000}'.format(1) }}", ("1000000000",)),
    ("replace-amplifies", "{{ ('a' * 1000000) | replace('a', 'aaaaaaaaaa') }}", ("replace",)),
    ("str-replace-amplifies", "{{ ('a' * 1000000).replace('a', 'aaaaaaaaaa') }}", ("replace",)),
    ("join-of-refs", "{% set s = 'a' * 1000000 %}{{ [s, s, s, s, s, s, s, s, s, s] | join }}", ("join",)),
    ("str-join-of-refs", "{% set s = 'a' * 1000000 %}{{ ''.join([s, s, s, s, s, s, s, s, s, s]) }}", ("join",)),
    ("indent-amplifies", "{{ ('\\n' * 1000000) | indent(width=100) }}", ("indent",)),
    ("wordwrap-amplifies", "{{ ('a ' * 1000000) | wordwrap(1, wrapstring='xxxxxxxxxx') }}", ("wordwrap",)),
    ("batch-fill-1e9", "{{ [1] | batch(1000000000, 'x') | list }}", ("1000000000",)),
    ("power", "{{ 10 ** 100000000 }}", ("'**'",)),
    ("int-squaring", "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
                     "{% endfor %}{{ ns.n > 0 }}", ("integer",)),
    ("tojson-indent-huge", "{{ messages | tojson(indent=1000000) }}", ("indent",)),
    ("lipsum-removed", "{{ lipsum(100000) }}", ("lipsum",)),
    ("range-1e30", "{{ range(10**30) | list }}", ("range", "10000")),
    ("macro-recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", ("RecursionError",)),
    ("raise-exception", "{{ raise_exception('no system role') }}", ("no system role",)),
    ("sandbox-append", "{{ messages.append(1) }}", ("SecurityError",)),
    ("sandbox-dunder", "{{ ''.__class__.__mro__[1].__subclasses__()[0]('x') }}", ()),
    ("undefined-attribute", "{{ nothing.there.at_all }}", ("UndefinedError",)),
    ("division-by-zero", "{{ 1 / 0 }}", ("ZeroDivisionError",)),
    ("type-error", "{{ 1 + 'a' }}", ("TypeError",)),
    ("overflow", "{{ (1e308 * 10) | int }}", ("OverflowError",)),
    ("syntax-error", "{% for %}", ("invalid Jinja",)),
    ("parens-nested-10000", "{{ " + "(" * 10000 + "1" + ")" * 10000 + " }}", ("nested",)),
    ("source-1MB", "x" * (1 << 20), ("characters",)),
    ("slow-c-ops", "{% for i in range(100000) %}{{ ('a' * 4000000) | length }}{% endfor %}", ("took more than",)),
    ("big-list-sort", "{{ ('a' * 4000000) | list | sort | join }}", ("4194304",)),
]:
    case("requests", f"template-{_label}", "ChatTemplateError", "test template", *_names)(
        lambda ctx, t=_template: ctx.render(t))


@case("requests", "template-not-a-string", "ModelFileError", "test template")
def _(ctx):
    return ctx.templated(12345)


@case("requests", "template-trips-sandbox-through-the-engine", "ChatTemplateError", "tokenizer.chat_template",
      "SecurityError")
def _(ctx):
    eng = ctx.new_engine(model=ctx.load(_meta(ctx, "tokenizer.chat_template", W.STRING, "{{ messages.append(1) }}")))
    return eng.add_request("hi", chat=True)


@case("requests", "template-real-chatml-still-renders", None,
      check=lambda text: None if text.startswith("<|im_start|>user\nhi") else f"rendered {text!r}")
def _(ctx):
    from checkpoints import CHATML_TEMPLATE

    return ctx.render(CHATML_TEMPLATE)


# ---------------------------------------------------------------------------------------------------------
# Prompts and token ids (the worker's engine: context 256)

_10MB = 10 * 2**20
for _label, _make in [
    ("10MB-words", lambda: "hello world " * (_10MB // 12)),
    ("10MB-one-word", lambda: "a" * _10MB),
    ("10MB-digits", lambda: "1" * _10MB),
    ("10MB-spaces", lambda: " " * _10MB),
    ("10MB-punctuation", lambda: "!?" * (_10MB // 2)),
    ("10MB-special-tokens", lambda: "<|im_start|>" * (_10MB // 12)),
]:
    case("requests", f"prompt-{_label}", "ValueError", "prompt", "context of 256")(
        lambda ctx, m=_make: ctx.engine.add_request(m(), max_new_tokens=1))
    case("requests", f"prompt-{_label}-llm-generate", "ValueError", "prompt", "context of 256")(
        lambda ctx, m=_make: ctx.extra["llm"].generate(m(), max_new_tokens=1))


@case("requests", "prompt-10MB-chat", "ValueError", "messages[0]['content']", "4194304")
def _(ctx):
    return ctx.engine.add_request("hello world " * (_10MB // 12), chat=True, max_new_tokens=1)


@case("requests", "tokenizer-exceeds-by-words-with-a-normalizer", None,
      check=lambda n: None if isinstance(n, int) and n > 254 else f"exceeds() gave {n!r}, expected a count > 254")
def _(ctx):
    from tokenizers import Tokenizer as Backend
    from tokenizers import normalizers

    from trinfer.runtime.tokenizer import Tokenizer

    backend = Backend.from_str(ctx.loaded.tokenizer.backend.to_str())
    backend.normalizer = normalizers.NFC()  # no sound characters-per-token bound: the word bound must do
    tok = Tokenizer(backend)
    assert tok.max_chars_per_token is None
    return tok.exceeds("hello world " * (_10MB // 12), 254)


@case("requests", "prompt-10M-token-ids", "ValueError", "prompt", "context of 256")
def _(ctx):
    return ctx.engine.add_request(np.ones(10_000_000, dtype=np.int64), max_new_tokens=1)


@case("requests", "prompt-lone-surrogate", "ValueError", "prompt", "surrogate")
def _(ctx):
    return ctx.engine.add_request("hi \udcff there", max_new_tokens=1)


@case("requests", "prompt-lone-surrogate-chat", "ValueError", "prompt", "surrogate")
def _(ctx):
    return ctx.engine.add_request("hi \ud800", chat=True, max_new_tokens=1)


@case("requests", "prompt-lone-surrogate-in-a-message", "ValueError", "messages[0]", "surrogate")
def _(ctx):
    return ctx.engine.add_request([{"role": "user", "content": "x\udfff"}], chat=True, max_new_tokens=1)


@case("requests", "prompt-bytes", "TypeError", "prompt")
def _(ctx):
    return ctx.engine.add_request(b"hello", max_new_tokens=1)


@case("requests", "prompt-float-ids", "TypeError", "prompt")
def _(ctx):
    return ctx.engine.add_request([1.0, 2.0], max_new_tokens=1)


@case("requests", "prompt-bool-ids", "TypeError", "prompt")
def _(ctx):
    return ctx.engine.add_request([True, False], max_new_tokens=1)


@case("requests", "prompt-2d-array", "ValueError", "prompt", "1-D")
def _(ctx):
    return ctx.engine.add_request(np.ones((2, 3), dtype=np.int64), max_new_tokens=1)


def _same_as_list(ctx: Ctx, prompt) -> str | None:
    want = ctx.extra["llm"].generate([[5, 6, 7]], max_new_tokens=3, ignore_eos=True)[0].token_ids
    got = ctx.extra["llm"].generate(prompt, max_new_tokens=3, ignore_eos=True)
    return [o.token_ids for o in got], want


def _all_equal(result) -> str | None:
    outs, want = result
    return None if outs and all(o == want for o in outs) else f"got {outs}, expected each {want}"


for _label, _make in [
    ("numpy-int64-list", lambda: [np.int64(5), np.int64(6), np.int64(7)]),
    ("numpy-int32-array", lambda: np.array([5, 6, 7], dtype=np.int32)),
    ("numpy-2d-array", lambda: np.array([[5, 6, 7], [5, 6, 7]])),
    ("torch-tensor", lambda: __import__("torch").tensor([5, 6, 7])),
    ("tuple", lambda: (5, 6, 7)),
    ("list-of-numpy-arrays", lambda: [np.array([5, 6, 7]), np.array([5, 6, 7])]),
]:
    case("requests", f"llm-generate-{_label}", None, check=_all_equal)(
        lambda ctx, m=_make: _same_as_list(ctx, m()))


# Engine arguments (over the loaded base model)

for _label, _kwargs, _names in [
    ("kv_cache_memory-inf", dict(kv_cache_memory=float("inf"), num_kv_blocks=None), ("kv_cache_memory",)),
    ("kv_cache_memory-nan", dict(kv_cache_memory=float("nan"), num_kv_blocks=None), ("kv_cache_memory",)),
    ("kv_cache_memory-string", dict(kv_cache_memory="1e6", num_kv_blocks=None), ("kv_cache_memory",)),
    ("kv_cache_memory-negative", dict(kv_cache_memory=-1, num_kv_blocks=None), ("kv_cache_memory",)),
    ("kv_cache_memory-1e18", dict(kv_cache_memory=1e18, num_kv_blocks=None), ("kv_cache_memory",)),
    ("max_model_len-string", dict(max_model_len="64"), ("max_model_len",)),
    ("max_model_len-float", dict(max_model_len=64.0), ("max_model_len",)),
    ("max_model_len-bool", dict(max_model_len=True), ("max_model_len",)),
    ("max_model_len-10**9", dict(max_model_len=10**9), ("max_model_len",)),
    ("max_num_seqs-string", dict(max_num_seqs="8"), ("max_num_seqs",)),
    ("max_num_seqs-zero", dict(max_num_seqs=0), ("max_num_seqs",)),
    ("num_kv_blocks-10**9", dict(num_kv_blocks=10**9), ("num_kv_blocks",)),
    ("num_kv_blocks-float", dict(num_kv_blocks=8.0), ("num_kv_blocks",)),
    ("max_num_batched_tokens-zero", dict(max_num_batched_tokens=0), ("max_num_batched_tokens",)),
    ("block_size-3", dict(block_size=3), ("block_size",)),
]:
    case("requests", f"engine-{_label}", "ValueError", *_names)(lambda ctx, kw=_kwargs: ctx.new_engine(**kw))


@case("requests", "engine-max_num_seqs-10**7", None,
      check=lambda n: None if n <= 64 else f"decode buffers for {n} sequences (expected at most the 64 blocks)")
def _(ctx):
    return ctx.new_engine(max_num_seqs=10**7).runner.decode_buffers.max_num_seqs


# ---------------------------------------------------------------------------------------------------------
# The command line (in-process): one line and exit status 2 for each user mistake

def _cli_case(name: str, *names: str):
    def register(fn):
        CASES.append(Case(name, "cli", fn, None, (), cli_refused(*names)))
        return fn
    return register


@_cli_case("cli-template-trips-sandbox", "tokenizer.chat_template", "SecurityError")
def _(ctx):
    model = _meta(ctx, "tokenizer.chat_template", W.STRING, "{{ messages.append(1) }}")
    return _cli(ctx, ["generate", "--chat", "hi", *_good_cli_args(ctx, model)])


for _label, _template, _what in [("undefined", "{{ a.b.c }}", "UndefinedError"),
                                 ("overflow", "{{ (1e308 * 10) | int }}", "OverflowError"),
                                 ("recursion", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
                                 ("type-error", "{{ 1 + 'a' }}", "TypeError")]:
    _cli_case(f"cli-template-{_label}", "tokenizer.chat_template", _what)(
        lambda ctx, t=_template: _cli(ctx, ["generate", "--chat", "hi", *_good_cli_args(
            ctx, _meta(ctx, "tokenizer.chat_template", W.STRING, t))]))


@_cli_case("cli-template-not-a-string", "tokenizer.chat_template")
def _(ctx):
    model = _meta(ctx, "tokenizer.chat_template", W.U32, 7)
    return _cli(ctx, ["generate", "--chat", "hi", *_good_cli_args(ctx, model)])


@_cli_case("cli-prompt-invalid-utf8-argv", "prompt", "surrogate")
def _(ctx):
    # Python decodes argv with surrogateescape: the bytes b"\xff\xfe" arrive as "\udcff\udcfe".
    return _cli(ctx, ["generate", os.fsdecode(b"hi \xff\xfe"), *_good_cli_args(ctx, os.path.join(ctx.base, "base.gguf"))])


@_cli_case("cli-prompt-invalid-utf8-stdin", "stdin", "UTF-8")
def _(ctx):
    return _cli(ctx, ["generate", "-", *_good_cli_args(ctx, os.path.join(ctx.base, "base.gguf"))],
                stdin=b"hello \xff\xfe")


@_cli_case("cli-num-kv-blocks-10**9", "num_kv_blocks")
def _(ctx):
    args = _good_cli_args(ctx, os.path.join(ctx.base, "base.gguf"))
    args[args.index("--num-kv-blocks") + 1] = str(10**9)
    return _cli(ctx, ["generate", "hi", *args])


@_cli_case("cli-gguf-5000-nested-arrays", "x.nested")
def _(ctx):
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, _meta(ctx, "x.nested", W.ARRAY, W.nested_array(5000)))])


@_cli_case("cli-config-100k-nested", "config.json")
def _(ctx):
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, ctx.hf({"config.json": "[" * 100_000}))])


@_cli_case("cli-model-dev-zero", "/dev/zero")
def _(ctx):
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, "/dev/zero")])


@_cli_case("cli-model-directory-named-gguf", "x.gguf")
def _(ctx):
    path = os.path.join(ctx.tmp, "cli", "x.gguf")
    os.makedirs(path, exist_ok=True)
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, path)])


@_cli_case("cli-gguf-tensor-zero-dims", "output_norm.weight")
def _(ctx):
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, _tensor(ctx, "output_norm.weight", dims=()))])


@_cli_case("cli-gguf-dims-with-zero", "token_embd.weight")
def _(ctx):
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, _tensor(ctx, "token_embd.weight", dims=(32, 0)))])


@_cli_case("cli-prompt-10MB", "prompt", "context")
def _(ctx):
    return _cli(ctx, ["generate", "-", *_good_cli_args(ctx, os.path.join(ctx.base, "base.gguf"))],
                stdin=("hello world " * (_10MB // 12)).encode())


@case("cli", "cli-good-run", None,
      check=lambda r: None if r["rc"] == 0 and r["out"].strip() else f"exit {r['rc']}, stderr {r['err'][-300:]!r}")
def _(ctx):
    return _cli(ctx, ["generate", "The capital", *_good_cli_args(ctx, os.path.join(ctx.base, "base.gguf"))])


GROUPS = tuple(dict.fromkeys(c.group for c in CASES))
