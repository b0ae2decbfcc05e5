"""ModelConfig.from_hf on real-looking config.json files of every supported family, and every refusal."""
import copy
import dataclasses

import pytest
import torch

from trinfer.runtime.config import ModelConfig

# Abridged from the published config.json files (the keys trinfer reads, plus some it ignores).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000,
}
LLAMA31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
LLAMA32_1B = {
    **LLAMA31_8B_INSTRUCT, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "head_dim": 64, "tie_word_embeddings": True, "eos_token_id": 128001,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
TINYLLAMA = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 2048, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 576, "intermediate_size": 1536, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "vocab_size": 49152,
}
QWEN25_05B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN2_7B = {
    **QWEN25_05B_INSTRUCT, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "sliding_window": 131072, "max_window_layers": 28,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "vocab_size": 152064,
}
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 32768,
}
# transformers 5 writes rope_theta and the scaling into rope_parameters, and the dtype as "dtype".
LLAMA31_V5_FORM = {
    **{k: v for k, v in LLAMA31_8B_INSTRUCT.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")},
    "dtype": "bfloat16", "head_dim": 128,
    "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
}
QWEN2_V5_FORM = {
    **{k: v for k, v in QWEN25_05B_INSTRUCT.items() if k not in ("rope_theta", "torch_dtype")},
    "dtype": "float32", "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "layer_types": ["full_attention"] * 24, "sliding_window": None,
}


@pytest.mark.parametrize("raw, expected", [
    (LLAMA2_7B, dict(architecture="LlamaForCausalLM", num_kv_heads=32, head_dim=128, rope_theta=10000.0,
                     rope_scaling=None, tie_word_embeddings=False, qkv_bias=False, bos_token_id=1,
                     eos_token_ids=(2,), checkpoint_dtype=torch.float16, max_position_embeddings=4096)),
    (LLAMA31_8B_INSTRUCT, dict(num_kv_heads=8, head_dim=128, rope_theta=500000.0, eos_token_ids=(128001, 128008, 128009),
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                               checkpoint_dtype=torch.bfloat16, vocab_size=128256)),
    (LLAMA32_1B, dict(num_layers=16, head_dim=64, tie_word_embeddings=True, eos_token_ids=(128001,))),
    (TINYLLAMA, dict(num_heads=32, num_kv_heads=4, head_dim=64, intermediate_size=5632, num_layers=22)),
    (SMOLLM2_135M, dict(num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
                        rms_norm_eps=1e-5, vocab_size=49152)),
    (QWEN25_05B_INSTRUCT, dict(architecture="Qwen2ForCausalLM", model_type="qwen2", qkv_bias=True, head_dim=64,
                               tie_word_embeddings=True, bos_token_id=151643, eos_token_ids=(151645,),
                               rms_norm_eps=1e-6)),
    (QWEN2_7B, dict(qkv_bias=True, num_kv_heads=4, tie_word_embeddings=False)),
    (MISTRAL_7B_V03, dict(architecture="MistralForCausalLM", model_type="mistral", qkv_bias=False,
                          num_kv_heads=8, head_dim=128, rope_theta=1e6)),
    (LLAMA31_V5_FORM, dict(rope_theta=500000.0, checkpoint_dtype=torch.bfloat16,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    (QWEN2_V5_FORM, dict(qkv_bias=True, rope_theta=1e6, rope_scaling=None, checkpoint_dtype=torch.float32)),
], ids=["llama2-7b", "llama3.1-8b-instruct", "llama3.2-1b", "tinyllama", "smollm2-135m", "qwen2.5-0.5b",
        "qwen2-7b", "mistral-7b-v0.3", "llama3.1-v5-form", "qwen2-v5-form"])
def test_families_parse(raw, expected):
    before = copy.deepcopy(raw)
    cfg = ModelConfig.from_hf(raw)
    assert raw == before, "from_hf must not modify its input"
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key
    assert cfg.hidden_size == raw["hidden_size"] and cfg.num_layers == raw["num_hidden_layers"]
    assert cfg.num_heads % cfg.num_kv_heads == 0


def test_generation_config_eos_comes_first_and_merges():
    cfg = ModelConfig.from_hf(LLAMA2_7B, {"eos_token_id": [7, 2], "bos_token_id": 1})
    assert cfg.eos_token_ids == (7, 2)
    cfg = ModelConfig.from_hf({**QWEN25_05B_INSTRUCT, "bos_token_id": None}, {"bos_token_id": 151643,
                                                                               "eos_token_id": [151645, 151643]})
    assert cfg.eos_token_ids == (151645, 151643) and cfg.bos_token_id == 151643


def test_linear_rope_scaling_old_and_new_forms():
    old = ModelConfig.from_hf({**LLAMA2_7B, "rope_scaling": {"type": "linear", "factor": 4.0}})
    new = ModelConfig.from_hf({**LLAMA2_7B, "rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                                "rope_theta": 10000.0}})
    assert old.rope_scaling == new.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert ModelConfig.from_hf({**LLAMA2_7B, "rope_scaling": {"rope_type": "default"}}).rope_scaling is None


def test_sliding_window_as_long_as_the_context_is_full_attention():
    assert ModelConfig.from_hf({**MISTRAL_7B_V03, "sliding_window": 32768}).architecture == "MistralForCausalLM"
    assert ModelConfig.from_hf({**QWEN2_7B, "use_sliding_window": True}).qkv_bias  # window 131072 = context


def test_missing_architectures_falls_back_to_model_type():
    raw = {k: v for k, v in TINYLLAMA.items() if k != "architectures"}
    assert ModelConfig.from_hf(raw).architecture == "LlamaForCausalLM"


def test_config_is_frozen_hashable_and_comparable():
    a, b = ModelConfig.from_hf(LLAMA31_8B_INSTRUCT), ModelConfig.from_hf(LLAMA31_V5_FORM)
    assert a == dataclasses.replace(b, checkpoint_dtype=a.checkpoint_dtype)
    assert hash(a) == hash(ModelConfig.from_hf(LLAMA31_8B_INSTRUCT))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.num_layers = 3
    assert a.q_size == 32 * 128 and a.kv_size == 8 * 128


def _with(base, **changes):
    out = dict(base)
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_DROP = object()


@pytest.mark.parametrize("raw, match", [
    (_with(LLAMA2_7B, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox"), "architectures"),
    (_with(MISTRAL_7B_V03, architectures=["MixtralForCausalLM"], model_type="mixtral"), "architectures"),
    (_with(QWEN2_7B, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe"), "architectures"),
    (_with(LLAMA2_7B, architectures=_DROP, model_type="phi3"), "architectures"),
    (_with(LLAMA2_7B, model_type="mistral"), "model_type"),
    (_with(LLAMA2_7B, rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type 'dynamic'"),
    (_with(LLAMA2_7B, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
     "rope_type 'yarn'"),
    (_with(LLAMA2_7B, rope_scaling={"rope_type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}),
     "rope_type 'longrope'"),
    (_with(LLAMA2_7B, rope_scaling={"rope_type": "linear"}), "factor"),
    (_with(LLAMA31_8B_INSTRUCT, rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (_with(LLAMA31_8B_INSTRUCT, rope_scaling={**LLAMA31_8B_INSTRUCT["rope_scaling"], "low_freq_factor": 4.0,
                                               "high_freq_factor": 1.0}), "low_freq_factor"),
    (_with(LLAMA2_7B, rope_parameters={"full_attention": {"rope_type": "default"},
                                       "sliding_attention": {"rope_type": "default"}}), "per-layer"),
    (_with(MISTRAL_7B_V03, sliding_window=4096), "sliding_window"),
    (_with(QWEN25_05B_INSTRUCT, use_sliding_window=True, sliding_window=4096), "sliding_window"),
    (_with(QWEN2_V5_FORM, sliding_window=4096, layer_types=["full_attention"] * 21 + ["sliding_attention"] * 3),
     "sliding_window"),
    (_with(LLAMA2_7B, hidden_act="gelu"), "hidden_act"),
    (_with(LLAMA2_7B, partial_rotary_factor=0.5), "partial_rotary_factor"),
    (_with(LLAMA2_7B, attention_bias=True), "attention_bias"),
    (_with(MISTRAL_7B_V03, attention_bias=True), "attention_bias"),
    (_with(LLAMA2_7B, mlp_bias=True), "mlp_bias"),
    (_with(LLAMA2_7B, quantization_config={"quant_method": "awq", "bits": 4}), "quantization_config"),
    (_with(LLAMA2_7B, num_local_experts=8), "num_local_experts"),
    (_with(TINYLLAMA, num_key_value_heads=5), "num_heads"),
    (_with(LLAMA2_7B, hidden_size=_DROP), "hidden_size"),
    (_with(LLAMA2_7B, vocab_size=0), "vocab_size"),
    (_with(LLAMA2_7B, num_hidden_layers=-1), "num_hidden_layers"),
    (_with(LLAMA2_7B, intermediate_size=11008.0), "intermediate_size"),
    (_with(LLAMA2_7B, hidden_size=4000), "head_dim"),
    (_with(LLAMA2_7B, head_dim=127), "head_dim"),
    (_with(LLAMA2_7B, rms_norm_eps=0.0), "rms_norm_eps"),
    (_with(LLAMA2_7B, rope_theta=-1.0), "rope_theta"),
    (_with(LLAMA2_7B, eos_token_id=32000), "eos_token_id"),
    (_with(LLAMA2_7B, eos_token_id="</s>"), "eos_token_id"),
    (_with(LLAMA2_7B, bos_token_id=-1), "bos_token_id"),
    (_with(LLAMA2_7B, torch_dtype="float8_e4m3fn"), "dtype"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_refusals_name_the_option(raw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(raw)


def test_constructor_validates_directly():
    good = ModelConfig.from_hf(TINYLLAMA)
    for change, match in [
        (dict(architecture="FalconForCausalLM"), "architecture"),
        (dict(num_heads=0), "num_heads"),
        (dict(num_kv_heads=3), "num_heads"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 0.0}), "factor"),
        (dict(rope_scaling={"rope_type": "ntk", "factor": 2.0}), "rope_type"),
        (dict(eos_token_ids=[2]), "eos_token_ids"),
        (dict(tie_word_embeddings=1), "tie_word_embeddings"),
        (dict(checkpoint_dtype=torch.int8), "checkpoint_dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(good, **change)


def test_from_hf_needs_a_dict():
    with pytest.raises(TypeError, match="config"):
        ModelConfig.from_hf("config.json")
