"""Random-weight models of real shapes, made directly on the device (no checkpoint on disk).

Benchmarks and the profiler need models of real sizes on a machine where nothing can be downloaded:

    loaded = random_model("Llama-3-8B", device="cuda", dtype=torch.bfloat16)   # a LoadedModel, ~1 s on a GPU
    engine = Engine(loaded)                                                     # prompts as token ids

`MODEL_SHAPES` holds the config.json fields of the published models (the one table of real shapes; bench/
shapes.py reads it). Weights are drawn from a seeded generator on the device: projections with std
1/sqrt(fan_in) (the embedding too: 1/sqrt(hidden)), norm weights 1 + N(0, 0.1^2): outputs vary from token to
token instead of repeating the input. Random weights give small logit margins, so two implementations in
bf16 agree for a few tokens and then may part on a near-tie; in fp32 they agree far longer. The model has no
tokenizer; `hf_state_dict` gives the same tensors under Hugging Face names (views, no copy), so transformers
can run on identical weights.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch

from .config import ModelConfig
from .loader import LoadedModel, expected_weight_shapes

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16"}
_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
          "attention_bias": False, "torch_dtype": "bfloat16", "use_sliding_window": False, "sliding_window": None,
          "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
          "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645}

# config.json fields of the published checkpoints (Hugging Face hub), as read by ModelConfig.from_hf.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "SmolLM2-135M": {**_LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0},
    "Llama-3.2-1B": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001},
    "Llama-3-8B": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001},
    # Qwen3 (q/k norm); the 0.6B's head_dim 128 is twice hidden / heads.
    "Qwen3-0.6B": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_window_layers": 28,
                   "tie_word_embeddings": True},
    "Qwen3-8B": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_window_layers": 36,
                 "tie_word_embeddings": False},
    # A toy of the same family for CPU smoke runs and tests.
    "tiny": {**_LLAMA, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000,
             "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2},
    # And one of Qwen3's: q/k norm, head_dim 128 twice hidden / heads (the e2e benchmark's CPU check of that path).
    "tiny-qwen3": {**_QWEN3, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 1000,
                   "max_position_embeddings": 2048, "max_window_layers": 2, "tie_word_embeddings": False,
                   "bos_token_id": 1, "eos_token_id": 2},
}


def hf_config_dict(shape: str | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The config.json dict of a named shape (a copy), or of a given dict, with `overrides` applied."""
    if isinstance(shape, str):
        if shape not in MODEL_SHAPES:
            raise ValueError(f"shape: expected one of {', '.join(MODEL_SHAPES)}, got {shape!r}")
        base = MODEL_SHAPES[shape]
    elif isinstance(shape, Mapping):
        base = shape
    else:
        raise TypeError(f"shape: expected a shape name or a config dict, got {type(shape).__name__}")
    out = copy.deepcopy(dict(base))
    out.update(overrides)
    return out


def weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of all weights (a tied embedding counted once)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(_numel(s) for s in expected_weight_shapes(config).values()) * elem


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def random_weights(config: ModelConfig, *, device: str | torch.device, dtype: torch.dtype,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Every canonical weight of `config` (see loader.py), random, on `device` in `dtype`."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in expected_weight_shapes(config).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if len(shape) == 1:
            if name.endswith("qkv_bias"):
                t.normal_(0.0, 0.02, generator=gen)
            else:  # norm weights
                t.normal_(1.0, 0.1, generator=gen)
        else:
            # Every matrix (embeddings too) std 1/sqrt(its row length). A larger (tied) embedding would make
            # each token's own logit dominate and the model repeat its input forever.
            t.normal_(0.0, shape[1] ** -0.5, generator=gen)
        weights[name] = t
    return weights


def random_model(shape: str | Mapping[str, Any] | ModelConfig, *, device: str | torch.device,
                 dtype: torch.dtype, seed: int = 0, **overrides: Any) -> LoadedModel:
    """A `LoadedModel` (no tokenizer) of a named shape, a config.json dict or a ModelConfig, random weights."""
    config = shape if isinstance(shape, ModelConfig) else ModelConfig.from_hf(hf_config_dict(shape, **overrides))
    weights = random_weights(config, device=device, dtype=dtype, seed=seed)
    return LoadedModel(config=config, weights=weights, tokenizer=None, source="random")


def hf_state_dict(config: ModelConfig, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The canonical weights under Hugging Face Llama/Qwen names; fused q/k/v and gate/up are split into row views
    (no copy), so a transformers model loaded with `load_state_dict(..., assign=True)` shares the storage."""
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    sd = {"model.embed_tokens.weight": weights["embed_tokens"], "model.norm.weight": weights["norm"],
          "lm_head.weight": weights["embed_tokens"] if config.tie_word_embeddings else weights["lm_head"]}
    for n in range(config.num_layers):
        p, h = f"layers.{n}.", f"model.layers.{n}."
        qkv, gu = weights[p + "qkv_proj"], weights[p + "gate_up_proj"]
        sd[h + "self_attn.q_proj.weight"] = qkv[:q]
        sd[h + "self_attn.k_proj.weight"] = qkv[q:q + kv]
        sd[h + "self_attn.v_proj.weight"] = qkv[q + kv:]
        if config.qkv_bias:
            b = weights[p + "qkv_bias"]
            sd[h + "self_attn.q_proj.bias"], sd[h + "self_attn.k_proj.bias"] = b[:q], b[q:q + kv]
            sd[h + "self_attn.v_proj.bias"] = b[q + kv:]
        if config.qk_norm:
            sd[h + "self_attn.q_norm.weight"] = weights[p + "q_norm"]
            sd[h + "self_attn.k_norm.weight"] = weights[p + "k_norm"]
        sd[h + "self_attn.o_proj.weight"] = weights[p + "o_proj"]
        sd[h + "mlp.gate_proj.weight"] = gu[:inter]
        sd[h + "mlp.up_proj.weight"] = gu[inter:]
        sd[h + "mlp.down_proj.weight"] = weights[p + "down_proj"]
        sd[h + "input_layernorm.weight"] = weights[p + "input_norm"]
        sd[h + "post_attention_layernorm.weight"] = weights[p + "post_attn_norm"]
    return sd


def hf_model(loaded: LoadedModel, raw_config: Mapping[str, Any], *, attn_implementation: str = "sdpa"):
    """A transformers model (LlamaForCausalLM, Qwen3ForCausalLM, ...: the config's model_type) on the same
    device, in the same dtype, sharing `loaded`'s weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    w = loaded.weights["embed_tokens"]
    cfg_dict = dict(raw_config)
    cfg_dict.pop("architectures", None)
    model_type = cfg_dict.pop("model_type", "llama")
    hf_cfg = AutoConfig.for_model(model_type, **cfg_dict)
    hf_cfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=w.dtype)
    sd = hf_state_dict(loaded.config, loaded.weights)
    if loaded.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and loaded.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"hf_model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if loaded.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers made on the meta device (the rotary inverse frequencies) are rebuilt: on the CPU, then moved,
    # as transformers computes them when it builds a model.
    with torch.device("cpu"):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_cfg).to(w.device)
    for name, buf in model.named_buffers():
        if buf.device.type == "meta":
            raise ValueError(f"hf_model: buffer {name} left on the meta device")
    return model.eval()
