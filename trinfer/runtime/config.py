"""The model configuration trinfer runs: one frozen dataclass, parsed from a Hugging Face config.json.

Only what trinfer implements is accepted. Every option that would change the model's math in a way the
runtime does not reproduce (another architecture, an active sliding window, a rope type other than
default/linear/llama3, biases where the model has none, another activation, partial rotary) is refused
with a ValueError that names the option, so a checkpoint is never silently run wrong.

    cfg = ModelConfig.from_hf(json.load(open("config.json")), json.load(open("generation_config.json")))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

# architecture -> the model_type its config.json carries.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
}
# Architectures often mistaken for a supported one, refused with the reason.
REFUSED_ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "Qwen3-MoE is a mixture-of-experts model, which trinfer does not run (dense Qwen3 "
                           "models, Qwen3ForCausalLM, it does)",
    "Qwen2MoeForCausalLM": "Qwen2-MoE is a mixture-of-experts model, which trinfer does not run",
}
# Architectures with the same sliding-window switch (use_sliding_window, on layers from max_window_layers on).
_QWEN_WINDOW_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shapes and options of a Llama-family decoder, in Hugging Face terms.

    rope_scaling is None (plain RoPE), {"rope_type": "linear", "factor": f}, or {"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    eos_token_ids are all the ids that end generation (generation_config first, then config).
    checkpoint_dtype is the dtype the weights are stored in (float32 for a dequantized GGUF).
    qkv_bias: q/k/v projections with biases (Qwen2). qk_norm: an RMSNorm over each query and key head (weights of
    size head_dim, eps rms_norm_eps) before the rotary embedding (Qwen3).
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: torch.dtype
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture: {self.architecture!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        expected_type = SUPPORTED_ARCHITECTURES[self.architecture]
        if self.model_type != expected_type:
            raise ValueError(
                f"model_type: expected {expected_type!r} for {self.architecture}, got {self.model_type!r}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads: expected a multiple of num_kv_heads={self.num_kv_heads}, got {self.num_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim: expected an even number (rotary pairs), got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: expected a positive finite float, got {value!r}")
        _check_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        for name in ("tie_word_embeddings", "qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.bos_token_id is not None and not _is_token_id(self.bos_token_id, self.vocab_size):
            raise ValueError(f"bos_token_id: expected None or an int in [0, {self.vocab_size}), got {self.bos_token_id!r}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError(f"eos_token_ids: expected a tuple of ints, got {type(self.eos_token_ids).__name__}")
        for token_id in self.eos_token_ids:
            if not _is_token_id(token_id, self.vocab_size):
                raise ValueError(f"eos_token_ids: expected ints in [0, {self.vocab_size}), got {token_id!r}")
        if self.checkpoint_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"checkpoint_dtype: expected float32/float16/bfloat16, got {self.checkpoint_dtype!r}")

    # A dict field makes the generated hash fail; hash the rope options as sorted items instead.
    def __hash__(self) -> int:
        values = []
        for f in fields(self):
            value = getattr(self, f.name)
            values.append(tuple(sorted(value.items())) if isinstance(value, dict) else value)
        return hash(tuple(values))

    @property
    def q_size(self) -> int:
        """Rows of the q part of qkv_proj: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Rows of the k part (and of the v part) of qkv_proj: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(
        cls, config: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None
    ) -> "ModelConfig":
        """Parse a Hugging Face config.json dict (transformers 4.x or 5.x form) and optional generation_config."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a dict (the parsed config.json), got {type(config).__name__}")
        architecture = _architecture(config)
        model_type = config.get("model_type")
        if model_type is None:
            model_type = SUPPORTED_ARCHITECTURES[architecture]
        _refuse_unsupported_options(config, architecture)

        hidden_size = _require(config, "hidden_size")
        num_heads = _require(config, "num_attention_heads")
        num_kv_heads = config.get("num_key_value_heads")
        if num_kv_heads is None:
            num_kv_heads = num_heads
        head_dim = config.get("head_dim")
        if head_dim is None:
            if not isinstance(hidden_size, int) or not isinstance(num_heads, int) or num_heads <= 0 \
                    or hidden_size % num_heads != 0:
                raise ValueError(
                    f"head_dim: not given and hidden_size={hidden_size!r} is not a multiple of "
                    f"num_attention_heads={num_heads!r}"
                )
            head_dim = hidden_size // num_heads
        max_positions = _require(config, "max_position_embeddings")
        rope_theta, rope_scaling = _rope(config)

        eos: list[int] = []
        for source in (generation_config or {}, config):
            for token_id in _as_id_list(source.get("eos_token_id"), "eos_token_id"):
                if token_id not in eos:
                    eos.append(token_id)
        bos = config.get("bos_token_id")
        if bos is None and generation_config:
            bos = generation_config.get("bos_token_id")
        if isinstance(bos, list):  # some configs write a one-element list
            bos = bos[0] if len(bos) == 1 else bos

        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=_require(config, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_require(config, "intermediate_size"),
            num_layers=_require(config, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM",
            bos_token_id=bos,
            eos_token_ids=tuple(eos),
            checkpoint_dtype=_dtype(config),
            qk_norm=architecture == "Qwen3ForCausalLM",
        )


def _is_token_id(value: Any, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


def _require(config: Mapping[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ValueError(f"config.json: missing required key {key!r}")
    return config[key]


def _as_id_list(value: Any, name: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError(f"{name}: expected an int or a list of ints, got {value!r}")


def _architecture(config: Mapping[str, Any]) -> str:
    architectures = config.get("architectures")
    if architectures is None:
        model_type = config.get("model_type")
        by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
        if model_type not in by_type:
            raise ValueError(
                f"architectures: not given and model_type {model_type!r} is not one of {sorted(by_type)}"
            )
        return by_type[model_type]
    if isinstance(architectures, str):
        architectures = [architectures]
    refused = [a for a in architectures if isinstance(a, str) and a in REFUSED_ARCHITECTURES]
    if refused:
        raise ValueError(f"architectures: {refused[0]!r} is not supported: {REFUSED_ARCHITECTURES[refused[0]]}")
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architectures: {architectures!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    return architectures[0]


def _refuse_unsupported_options(config: Mapping[str, Any], architecture: str) -> None:
    """Raise ValueError naming the first option whose effect trinfer does not implement."""
    act = config.get("hidden_act", config.get("hidden_activation", "silu"))
    if act != "silu":
        raise ValueError(f"hidden_act: only 'silu' is supported, got {act!r}")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias: biases on the MLP projections are not supported (mlp_bias=True)")
    if config.get("attention_bias"):
        # Hugging Face Llama/Mistral put the bias on o_proj too; trinfer has only q/k/v biases (Qwen2).
        raise ValueError(
            "attention_bias: biases on the attention projections (including o_proj) are not supported "
            "(attention_bias=True)"
        )
    partial = config.get("partial_rotary_factor")
    rope_params = config.get("rope_parameters")
    if partial is None and isinstance(rope_params, Mapping):
        partial = rope_params.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor: only full rotary (1.0) is supported, got {partial!r}")
    if config.get("quantization_config") is not None:
        method = config["quantization_config"].get("quant_method", "?") if isinstance(
            config["quantization_config"], Mapping) else "?"
        raise ValueError(f"quantization_config: quantized safetensors checkpoints are not supported ({method})")
    if config.get("num_local_experts") or config.get("num_experts"):
        raise ValueError("num_local_experts: mixture-of-experts models are not supported")
    if config.get("is_encoder_decoder"):
        raise ValueError("is_encoder_decoder: encoder-decoder models are not supported")
    _refuse_sliding_window(config, architecture)


def _refuse_sliding_window(config: Mapping[str, Any], architecture: str) -> None:
    window = config.get("sliding_window")
    max_positions = config.get("max_position_embeddings")
    layer_types = config.get("layer_types") or []
    if architecture in _QWEN_WINDOW_ARCHITECTURES:
        # Qwen2/Qwen3 slide only with use_sliding_window (on layers from max_window_layers on).
        uses_window = bool(config.get("use_sliding_window")) or "sliding_attention" in layer_types
    else:
        uses_window = window is not None or "sliding_attention" in layer_types
    if not uses_window:
        return
    if window is None or (isinstance(max_positions, int) and window >= max_positions):
        return  # a window as long as the context never masks anything
    raise ValueError(
        f"sliding_window: sliding-window attention is not supported (sliding_window={window} < "
        f"max_position_embeddings={max_positions}); only models with full attention can run"
    )


def _rope(config: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's rope_parameters or 4.x's rope_theta/rope_scaling."""
    params = config.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"rope_parameters: expected a dict, got {params!r}")
    if params is not None and any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"rope_parameters: per-layer-type rope parameters are not supported, got {dict(params)!r}")
    scaling = params if params is not None else config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ValueError(f"rope_scaling: expected a dict or null, got {scaling!r}")
    theta = None
    if params is not None:
        theta = params.get("rope_theta")
    if theta is None:
        theta = config.get("rope_theta", 10000.0)
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling: rope_type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        if "factor" not in scaling:
            raise ValueError("rope_scaling: rope_type 'linear' needs 'factor'")
        return theta, {"rope_type": "linear", "factor": float(scaling["factor"])}
    missing = [k for k in _LLAMA3_ROPE_KEYS if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling: rope_type 'llama3' needs {missing}")
    out = {"rope_type": "llama3"}
    for key in _LLAMA3_ROPE_KEYS:
        out[key] = float(scaling[key]) if key != "original_max_position_embeddings" else scaling[key]
    return theta, out


def _check_rope_scaling(scaling: dict | None, max_positions: int) -> None:
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling: expected None or a dict, got {scaling!r}")
    rope_type = scaling.get("rope_type")
    if rope_type == "linear":
        if set(scaling) != {"rope_type", "factor"}:
            raise ValueError(f"rope_scaling: 'linear' takes exactly rope_type and factor, got {sorted(scaling)}")
    elif rope_type == "llama3":
        if set(scaling) != {"rope_type", *_LLAMA3_ROPE_KEYS}:
            raise ValueError(
                f"rope_scaling: 'llama3' takes exactly rope_type and {list(_LLAMA3_ROPE_KEYS)}, got {sorted(scaling)}"
            )
        omax = scaling["original_max_position_embeddings"]
        if isinstance(omax, bool) or not isinstance(omax, int) or omax <= 0:
            raise ValueError(f"rope_scaling: original_max_position_embeddings must be a positive int, got {omax!r}")
        if not 0 < scaling["low_freq_factor"] < scaling["high_freq_factor"]:
            raise ValueError(
                f"rope_scaling: llama3 needs 0 < low_freq_factor < high_freq_factor, got "
                f"{scaling['low_freq_factor']} and {scaling['high_freq_factor']}"
            )
    else:
        raise ValueError(
            f"rope_scaling: rope_type {rope_type!r} is not supported; supported: None, 'linear', 'llama3'"
        )
    factor = scaling["factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"rope_scaling: factor must be a positive finite number, got {factor!r}")


def _dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = config.get("dtype", config.get("torch_dtype"))
    if name is None:
        return torch.float32
    name = str(name).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"dtype: checkpoint dtype {name!r} is not supported; supported: float32, float16, bfloat16")
    return _DTYPES[name]
