"""Hugging Face directories: config.json, generation_config.json, the safetensors index, safetensors headers,
tokenizer files, and paths that are not model files."""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable

import numpy as np

from .core import Ctx, case
from .gguf_cases import _rope_rows


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


@case("hf", "tokenizer-json-over-the-size-cap", "ModelFileError", "{path}", "MiB")
def _(ctx):
    path = ctx.hf()
    with open(os.path.join(path, "tokenizer.json"), "r+b") as f:  # sparse: refused by its size, never read
        f.truncate(300 << 20)
    ctx.path = os.path.join(path, "tokenizer.json")
    return ctx.load(path)


def _with_duplicate(ctx: Ctx, name: str, key: str, value: Any) -> str:
    """The base directory's `name` (a JSON object) with `key` given a second time, at the end."""
    with open(os.path.join(ctx.base, "hf", name), encoding="utf-8") as f:
        text = f.read().rstrip()
    assert text.endswith("}") and f'"{key}"' in text
    return ctx.hf({name: f"{text[:-1]}, {json.dumps(key)}: {json.dumps(value)}}}"})


@case("hf", "config-json-duplicate-key", "ModelFileError", "{path}", "num_hidden_layers", "twice")
def _(ctx):
    return ctx.load(_with_duplicate(ctx, "config.json", "num_hidden_layers", 1))


@case("hf", "tokenizer-config-json-duplicate-key", "ModelFileError", "{path}", "eos_token", "twice")
def _(ctx):
    return ctx.load(_with_duplicate(ctx, "tokenizer_config.json", "eos_token", "<s>"))


for _label, _qc, _names in [
    ("group_size-128.0", {"bits": 4, "group_size": 128.0}, ("quantization_config.group_size", "128.0")),
    ("bits-4.0", {"bits": 4.0, "group_size": 128}, ("quantization_config.bits", "4.0")),
    ("bits-true", {"bits": True, "group_size": 128}, ("quantization_config.bits",)),
    ("desc_act-string", {"bits": 4, "group_size": 128, "desc_act": "false"}, ("quantization_config.desc_act",)),
]:
    case("hf", f"config-quantization-{_label}", "ModelFileError", "config.json", *_names)(
        lambda ctx, q=_qc: ctx.load(ctx.config(quantization_config={"quant_method": "gptq", "sym": True, **q})))


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
