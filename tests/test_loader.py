"""load_model_files: Hugging Face safetensors directories and llama GGUF files -> canonical fused weights.

Oracles: transformers' own models for the safetensors checkpoints; for GGUF, the gguf package's reader and
dequantizer plus transformers' q/k un-permutation (tests/checkpoints.hf_state_dict_from_gguf), and tiny
GGUFs written here the way llama.cpp's converter writes them.
"""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from checkpoints import (
    FAMILIES,
    hf_state_dict_from_gguf,
    llama_cpp_permute,
    load_hf_model,
    make_gguf_checkpoint,
    make_hf_checkpoint,
)
from trinfer.runtime.loader import LoadedModel, expected_weight_shapes, load_model_files
from trinfer.runtime.loader_gguf import GGML_TYPES, dequantize, read_gguf, unpermute_rows


def load(path, dtype=torch.float32):
    return load_model_files(path, device="cpu", dtype=dtype, progress=False)


def fused_from_hf(sd: dict, cfg, i: int) -> dict:
    """The canonical tensors of layer i, built from a Hugging Face state dict by concatenation."""
    p = f"model.layers.{i}."
    out = {
        "input_norm": sd[p + "input_layernorm.weight"],
        "qkv_proj": torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
        "o_proj": sd[p + "self_attn.o_proj.weight"],
        "post_attn_norm": sd[p + "post_attention_layernorm.weight"],
        "gate_up_proj": torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
        "down_proj": sd[p + "mlp.down_proj.weight"],
    }
    if cfg.qkv_bias:
        out["qkv_bias"] = torch.cat([sd[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
    return out


# ---------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied, sharded", [(False, False), (True, True)], ids=["untied", "tied-sharded"])
def test_safetensors_round_trip(tmp_path, family, tied, sharded):
    path = make_hf_checkpoint(tmp_path, family, tie_word_embeddings=tied,
                              max_shard_size="100KB" if sharded else None)
    files = os.listdir(path)
    assert ("model.safetensors.index.json" in files) == sharded
    if sharded:
        assert sum(f.endswith(".safetensors") for f in files) > 2
    loaded = load(path)
    assert isinstance(loaded, LoadedModel) and loaded.source == "safetensors"
    hf = load_hf_model(path)
    cfg, hcfg = loaded.config, hf.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        hcfg.hidden_size, hcfg.num_hidden_layers, hcfg.num_attention_heads, hcfg.num_key_value_heads,
        hcfg.vocab_size)
    assert cfg.tie_word_embeddings == tied and cfg.qkv_bias == (family == "qwen2")
    if family == "llama3":
        assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
    sd = hf.state_dict()
    w = loaded.weights
    assert {k: tuple(v.shape) for k, v in w.items()} == expected_weight_shapes(cfg)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in w.values())
    for i in range(cfg.num_layers):
        for name, want in fused_from_hf(sd, cfg, i).items():
            assert torch.equal(w[f"layers.{i}.{name}"], want), f"layers.{i}.{name}"
    assert torch.equal(w["embed_tokens"], sd["model.embed_tokens.weight"])
    assert torch.equal(w["norm"], sd["model.norm.weight"])
    assert ("lm_head" in w) == (not tied)
    if not tied:
        assert torch.equal(w["lm_head"], sd["lm_head.weight"])
    # Config and tokenizer agree on what ends a sequence.
    assert set(loaded.tokenizer.eos_token_ids) <= set(cfg.eos_token_ids)


def test_safetensors_converts_dtype(tmp_path):
    path = make_hf_checkpoint(tmp_path, "qwen2")
    bf16 = load(path, dtype=torch.bfloat16).weights
    fp32 = load(path).weights
    assert set(bf16) == set(fp32)
    for name, t in bf16.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, fp32[name].to(torch.bfloat16)), name


def test_lm_head_stored_in_a_tied_checkpoint_is_ignored(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_hf_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, file, metadata={"format": "pt"})
    assert "lm_head" not in load(path).weights


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    edit(sd)
    save_file(sd, file, metadata={"format": "pt"})


@pytest.fixture
def llama_dir(tmp_path):
    return make_hf_checkpoint(tmp_path, "llama")


def test_missing_tensor_is_named(llama_dir):
    _rewrite(llama_dir, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load(llama_dir)


def test_missing_lm_head_of_an_untied_model_is_named(llama_dir):
    _rewrite(llama_dir, lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing tensor 'lm_head.weight'"):
        load(llama_dir)


def test_unexpected_tensor_is_named(llama_dir):
    _rewrite(llama_dir, lambda sd: sd.update({"model.layers.0.self_attn.o_proj.bias": torch.ones(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        load(llama_dir)


def test_layer_beyond_the_config_is_unexpected(llama_dir):
    _rewrite(llama_dir, lambda sd: sd.update({"model.layers.2.input_layernorm.weight": torch.ones(64)}))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.input_layernorm\.weight"):
        load(llama_dir)


def test_wrong_shape_is_named(llama_dir):
    _rewrite(llama_dir, lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight": torch.ones(16, 64)}))
    with pytest.raises(ValueError, match=r"k_proj\.weight.*expected shape \[32, 64\].*got \[16, 64\]"):
        load(llama_dir)


def test_integer_tensor_is_refused(llama_dir):
    _rewrite(llama_dir, lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(ValueError, match="model.norm.weight.*floating-point"):
        load(llama_dir)


def test_truncated_safetensors_header(llama_dir):
    file = os.path.join(llama_dir, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="truncated or corrupted safetensors header"):
        load(llama_dir)
    with open(file, "wb") as f:
        f.write(b"\x01\x02")
    with pytest.raises(ValueError, match="truncated safetensors file"):
        load(llama_dir)


def test_truncated_safetensors_data(llama_dir):
    file = os.path.join(llama_dir, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ValueError, match="model.safetensors"):
        load(llama_dir)


def test_garbage_safetensors_header(llama_dir):
    file = os.path.join(llama_dir, "model.safetensors")
    with open(file, "wb") as f:
        f.write((20).to_bytes(8, "little") + b"this is not json!!!!" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load(llama_dir)


def test_missing_config_json(llama_dir):
    os.remove(os.path.join(llama_dir, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(llama_dir)


def test_corrupted_config_json(llama_dir):
    with open(os.path.join(llama_dir, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load(llama_dir)


def test_unknown_architecture_in_config_json(llama_dir):
    file = os.path.join(llama_dir, "config.json")
    with open(file) as f:
        raw = json.load(f)
    raw["architectures"] = ["GPT2LMHeadModel"]
    with open(file, "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load(llama_dir)


def test_missing_shard(tmp_path):
    path = make_hf_checkpoint(tmp_path, "mistral", max_shard_size="100KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=f"missing shard '{shard}'"):
        load(path)


def test_missing_tokenizer(llama_dir):
    os.remove(os.path.join(llama_dir, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load(llama_dir)


def test_pickle_checkpoints_are_never_loaded(llama_dir):
    os.rename(os.path.join(llama_dir, "model.safetensors"), os.path.join(llama_dir, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="pickle"):
        load(llama_dir)


def test_missing_path_and_bad_dtype(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype"):
        load_model_files(llama_dir, device="cpu", dtype=torch.int8)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match="neither"):
        load(other)


def test_progress_bar_goes_to_stderr_after_a_second(monkeypatch, llama_dir):
    import trinfer.runtime.loader as loader

    seen = {}
    real = loader._progress

    def spy(total, desc, enabled):
        bar = real(total, desc, enabled)
        seen.update(total=total, delay=bar.delay, file=bar.fp, disable=bar.disable)
        return bar

    monkeypatch.setattr(loader, "_progress", spy)
    load_model_files(llama_dir, device="cpu", dtype=torch.float32)
    assert seen["total"] == 21 and seen["delay"] == 1.0 and not seen["disable"]
    assert getattr(seen["file"], "_wrapped", seen["file"]) is sys.stderr


# ---------------------------------------------------------------------- GGUF: the default model


@pytest.fixture(scope="module")
def default_loaded(default_gguf):
    return load(default_gguf)


CHECKED_LAYERS = (0, 13, 29)


@pytest.fixture(scope="module")
def gguf_reader(default_gguf):
    """The gguf package's reader of the default model (one ~2 s parse, shared)."""
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(default_gguf)


@pytest.fixture(scope="module")
def transformers_gguf(default_gguf, gguf_reader):
    """A few layers of the default GGUF as transformers reads them (gguf dequantization, transformers'
    q/k un-permutation; no trinfer code)."""
    names = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{n}.weight" for i in CHECKED_LAYERS for n in (
            "attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    return hf_state_dict_from_gguf(default_gguf, names, reader=gguf_reader)


def test_default_model_config(default_loaded, gguf_reader):
    cfg = default_loaded.config
    meta = {k: f.contents() for k, f in gguf_reader.fields.items() if k.startswith("llama.")}
    assert default_loaded.source == "gguf"
    assert cfg.architecture == "LlamaForCausalLM" and cfg.checkpoint_dtype == torch.float32
    # FIELD.md's facts, and the same numbers as the gguf package reads them
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size, cfg.max_position_embeddings) == (30, 576, 1536, 9, 3, 64, 49152, 8192)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.max_position_embeddings) == (
        meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
        meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"], meta["llama.context_length"])
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.tie_word_embeddings and cfg.rope_scaling is None
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert {k: tuple(v.shape) for k, v in default_loaded.weights.items()} == expected_weight_shapes(cfg)


def test_default_model_weights_match_transformers(default_loaded, transformers_gguf):
    sd = transformers_gguf
    w = default_loaded.weights
    assert torch.equal(w["embed_tokens"], sd["model.embed_tokens.weight"])
    assert torch.equal(w["norm"], sd["model.norm.weight"])
    for i in CHECKED_LAYERS:
        for name, want in fused_from_hf(sd, default_loaded.config, i).items():
            assert torch.equal(w[f"layers.{i}.{name}"], want), f"layers.{i}.{name}"


def test_own_gguf_reader_matches_the_gguf_package(default_gguf, gguf_reader):
    ours = read_gguf(default_gguf)
    ref = gguf_reader
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        got = ours.metadata[key]
        if isinstance(want, float):
            assert got == pytest.approx(want), key
        else:
            assert got == want, key
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(reversed(t.shape.tolist())) and mine.ggml_type == int(t.tensor_type)
        assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes
    ours.close()


# ---------------------------------------------------------------------- GGUF: dequantization and layout


@pytest.mark.parametrize("type_name", [name for name, _, _ in GGML_TYPES.values()])
def test_dequantize_matches_the_gguf_package(type_name):
    gguf = pytest.importorskip("gguf")
    kind = getattr(gguf.GGMLQuantizationType, type_name)
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((7, 96)) * rng.uniform(0.01, 3, (7, 1))).astype(np.float32)
    if type_name == "F32":
        packed = data
    elif type_name == "F16":
        packed = data.astype(np.float16)
    else:
        packed = gguf.quants.quantize(data, kind)
    want = gguf.quants.dequantize(packed, kind)
    raw = torch.from_numpy(np.ascontiguousarray(packed).reshape(-1).view(np.uint8).copy())
    got = dequantize(raw, GGML_TYPES_BY_NAME[type_name], (7, 96))
    assert got.dtype == torch.float32 and got.shape == (7, 96)
    assert torch.equal(got, torch.from_numpy(want.astype(np.float32)))


GGML_TYPES_BY_NAME = {name: kind for kind, (name, _, _) in GGML_TYPES.items()}


def test_dequantize_refuses_unknown_types_and_wrong_sizes():
    with pytest.raises(ValueError, match="ggml type 6 is not supported"):
        dequantize(torch.zeros(22, dtype=torch.uint8), 6, (32,))
    with pytest.raises(ValueError, match="expected 34 bytes"):
        dequantize(torch.zeros(30, dtype=torch.uint8), 8, (32,))


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_unpermute_undoes_llama_cpp_permutation(heads):
    w = torch.randn(heads * 64, 40)
    assert torch.equal(unpermute_rows(llama_cpp_permute(w, heads), heads), w)
    b = torch.randn(heads * 16)
    assert torch.equal(unpermute_rows(llama_cpp_permute(b, heads), heads), b)
    # Head h, pair j of the interleaved layout is rotate_half's (j, j + hd/2).
    perm = llama_cpp_permute(w, heads)
    assert torch.equal(perm[1], w[32]) and torch.equal(perm[2], w[1])


@pytest.mark.parametrize("qtype, family, tied", [
    ("F32", "llama", False), ("F16", "llama", True), ("BF16", "llama3", False),
    ("Q8_0", "llama", False), ("Q4_0", "llama", True), ("Q4_1", "llama3", False),
])
def test_tiny_gguf_matches_its_source_checkpoint(tmp_path, qtype, family, tied):
    gguf = pytest.importorskip("gguf")
    path, hf_dir = make_gguf_checkpoint(tmp_path, qtype=qtype, family=family, tie_word_embeddings=tied)
    loaded = load(path)
    hf_loaded = load(hf_dir)
    kind = getattr(gguf.GGMLQuantizationType, qtype)

    def stored(t: torch.Tensor) -> torch.Tensor:  # what the file holds, dequantized by the gguf package
        if qtype == "F32" or t.dim() == 1:
            return t
        if qtype == "F16":
            return t.half().float()
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), kind), kind))

    cfg = loaded.config
    assert cfg.tie_word_embeddings == tied and cfg.rope_scaling == hf_loaded.config.rope_scaling
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta) == (
        hf_loaded.config.num_heads, hf_loaded.config.num_kv_heads, hf_loaded.config.head_dim,
        hf_loaded.config.rope_theta)
    assert set(loaded.weights) == set(hf_loaded.weights)
    for name, want in hf_loaded.weights.items():
        # quantization blocks run along rows, so a fused matrix quantizes exactly like its parts
        assert torch.equal(loaded.weights[name], stored(want)), name
    assert loaded.tokenizer.encode("Hello world") == hf_loaded.tokenizer.encode("Hello world")


def test_gguf_dtype_conversion(tmp_path):
    pytest.importorskip("gguf")  # to write the file; trinfer reads GGUF without it
    path, _ = make_gguf_checkpoint(tmp_path, qtype="Q8_0")
    fp32 = load(path).weights
    half = load_model_files(path, device="cpu", dtype=torch.float16, progress=False).weights
    for name in fp32:
        assert half[name].dtype == torch.float16 and torch.equal(half[name], fp32[name].half()), name


def test_gguf_in_a_directory(tmp_path):
    pytest.importorskip("gguf")
    path, _ = make_gguf_checkpoint(tmp_path / "a", qtype="F16")
    folder = tmp_path / "only"
    folder.mkdir()
    shutil.copy(path, folder / "model.gguf")
    assert load(folder).source == "gguf"
    shutil.copy(path, folder / "other.gguf")
    with pytest.raises(ValueError, match="2 .gguf files"):
        load(folder)


# ---------------------------------------------------------------------- GGUF: corrupted and unsupported files


@pytest.fixture
def tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    return make_gguf_checkpoint(tmp_path, qtype="Q8_0")[0]


def test_wrong_gguf_magic(tmp_path, tiny_gguf):
    data = bytearray(open(tiny_gguf, "rb").read())
    data[:4] = b"GGML"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load(bad)


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.999], ids=["in-metadata", "halfway", "in-last-tensor"])
def test_truncated_gguf(tmp_path, tiny_gguf, keep):
    data = open(tiny_gguf, "rb").read()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated GGUF file"):
        load(bad)


def _edit_gguf(src: str, dst: str, *, arch: str = "llama", drop_tensor: str | None = None,
               retype: tuple[str, str] | None = None, extra_tensor: str | None = None,
               set_kv: dict | None = None) -> str:
    """Rewrite a GGUF through the gguf package with one change. set_kv: {key: (value, GGUFValueType name)}."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch)
    for key, (value, kind) in (set_kv or {}).items():
        w.add_key_value(key, value, getattr(gguf.GGUFValueType, kind))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in (set_kv or {}):
            continue
        value = field.contents()
        new_key = key.replace("llama.", f"{arch}.", 1) if key.startswith("llama.") else key
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_key_value(new_key, value, kind, sub_type=field.types[1])
        else:
            w.add_key_value(new_key, value, kind)
    for t in reader.tensors:
        if t.name == drop_tensor:
            continue
        if retype is not None and t.name == retype[0]:
            kind = getattr(gguf.GGMLQuantizationType, retype[1])
            dense = gguf.quants.dequantize(t.data, t.tensor_type)
            w.add_tensor(t.name, gguf.quants.quantize(dense, kind), raw_dtype=kind)
            continue
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, np.array(t.data))
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    if extra_tensor is not None:
        w.add_tensor(extra_tensor, np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_gguf_of_another_architecture_is_refused(tmp_path, tiny_gguf):
    bad = _edit_gguf(tiny_gguf, str(tmp_path / "qwen.gguf"), arch="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        load(bad)


def test_gguf_missing_tensor_is_named(tmp_path, tiny_gguf):
    bad = _edit_gguf(tiny_gguf, str(tmp_path / "m.gguf"), drop_tensor="blk.1.ffn_up.weight")
    with pytest.raises(ValueError, match="missing tensor 'blk.1.ffn_up.weight'"):
        load(bad)


def test_gguf_unexpected_tensor_is_named(tmp_path, tiny_gguf):
    bad = _edit_gguf(tiny_gguf, str(tmp_path / "x.gguf"), extra_tensor="blk.0.attn_q.bias")
    with pytest.raises(ValueError, match="unexpected tensor 'blk.0.attn_q.bias'"):
        load(bad)


def test_gguf_unsupported_quantization_is_named(tmp_path, tiny_gguf):
    bad = _edit_gguf(tiny_gguf, str(tmp_path / "q5.gguf"), retype=("blk.0.ffn_down.weight", "Q5_0"))
    with pytest.raises(ValueError, match="'blk.0.ffn_down.weight' is stored as ggml type 6"):
        load(bad)


@pytest.mark.parametrize("kv, match", [
    ({"llama.rope.scaling.type": ("yarn", "STRING"), "llama.rope.scaling.factor": (4.0, "FLOAT32")},
     "llama.rope.scaling.type 'yarn'"),
    ({"llama.rope.dimension_count": (8, "UINT32")}, "partial rotary"),
    ({"llama.expert_count": (8, "UINT32")}, "mixture-of-experts"),
    ({"llama.attention.value_length": (8, "UINT32")}, "value_length"),
    ({"tokenizer.ggml.model": ("bert", "STRING")}, "tokenizer.ggml.model 'bert'"),
], ids=["yarn", "partial-rotary", "moe", "value-length", "tokenizer"])
def test_gguf_unsupported_options_are_named(tmp_path, tiny_gguf, kv, match):
    bad = _edit_gguf(tiny_gguf, str(tmp_path / "opt.gguf"), set_kv=kv)
    with pytest.raises(ValueError, match=match):
        load(bad)


def test_gguf_linear_rope_scaling(tmp_path, tiny_gguf):
    ok = _edit_gguf(tiny_gguf, str(tmp_path / "lin.gguf"), set_kv={
        "llama.rope.scaling.type": ("linear", "STRING"), "llama.rope.scaling.factor": (4.0, "FLOAT32")})
    assert load(ok).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_llama3_rope_factors_are_recovered_or_refused():
    from trinfer.runtime.loader_gguf import _llama3_rope_factors, _rope_scaling_from_freqs

    for factor in (8.0, 32.0):  # Llama 3.1 8B and Llama 3.2 1B
        stored = _llama3_rope_factors(500000.0, 128, factor, 1.0, 4.0, 8192).astype(np.float32)
        assert _rope_scaling_from_freqs(stored, 500000.0, 128) == {
            "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    assert _rope_scaling_from_freqs(np.ones(64, dtype=np.float32), 500000.0, 128) is None
    with pytest.raises(ValueError, match="not Llama-3 rope scaling"):
        _rope_scaling_from_freqs(np.linspace(1, 3, 64), 500000.0, 128)
    with pytest.raises(ValueError, match="shape"):
        _rope_scaling_from_freqs(np.ones(32), 500000.0, 128)
