"""The model configuration trinfer runs: one frozen dataclass, parsed from a Hugging Face config.json.

Only what trinfer implements is accepted. Every option that would change the model's math in a way the
runtime does not reproduce (another architecture, an active sliding window, a rope type other than
default/linear/llama3, biases where the model has none, another activation, partial rotary) is refused
with a ValueError that names the option, so a checkpoint is never silently run wrong. Every field is read
with its type checked (`fields`): `"tie_word_embeddings": "false"` is a ModelFileError naming the file, the
key, the expected type and the value, never a truthy string.

    cfg = ModelConfig.from_hf(json.load(open("config.json")), json.load(open("generation_config.json")))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

from .fields import (REQUIRED, ModelFileError, get_bool, get_int, get_list, get_mapping, get_number, get_str,
                     is_int, short_repr)

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
        cls, config: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None, *,
        source: str = "config.json", generation_source: str = "generation_config.json",
    ) -> "ModelConfig":
        """Parse a Hugging Face config.json dict (transformers 4.x or 5.x form) and optional generation_config.

        Every field is read with its type checked (`fields`): a ModelFileError (a ValueError) names the file
        (`source` / `generation_source`, for the message), the key, what was expected and what was found.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a dict (the parsed config.json), got {type(config).__name__}")
        if generation_config is not None and not isinstance(generation_config, Mapping):
            raise TypeError(f"generation_config: expected a dict, got {type(generation_config).__name__}")
        src = source
        architecture = _architecture(config, src)
        model_type = get_str(config, "model_type", source=src, default=SUPPORTED_ARCHITECTURES[architecture])
        _refuse_unsupported_options(config, architecture, src)

        hidden_size = _size(config, "hidden_size", src)
        num_heads = _size(config, "num_attention_heads", src)
        num_kv_heads = _size(config, "num_key_value_heads", src, default=num_heads)
        head_dim = _size(config, "head_dim", src, default=None)
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ModelFileError(src, "head_dim", f"not given and hidden_size={hidden_size} is not a multiple "
                                     f"of num_attention_heads={num_heads}")
            head_dim = hidden_size // num_heads
        rope_theta, rope_scaling = _rope(config, src)

        eos: list[int] = []
        for data, where in ((generation_config or {}, generation_source), (config, src)):
            for token_id in _as_id_list(data, "eos_token_id", where):
                if token_id not in eos:
                    eos.append(token_id)
        bos = _bos(config, src)
        if bos is None and generation_config:
            bos = _bos(generation_config, generation_source)
        vocab_size = _size(config, "vocab_size", src)
        for name, token_id in (("bos_token_id", bos), *(("eos_token_id", t) for t in eos)):
            if token_id is not None and token_id >= vocab_size:
                raise ModelFileError(src, name, f"{token_id} is not a token id of the vocabulary (vocab_size "
                                     f"{vocab_size})")

        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=_size(config, "intermediate_size", src),
            num_layers=_size(config, "num_hidden_layers", src),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=get_number(config, "rms_norm_eps", source=src, default=1e-6, positive=True),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_size(config, "max_position_embeddings", src),
            tie_word_embeddings=get_bool(config, "tie_word_embeddings", source=src, default=False),
            qkv_bias=architecture == "Qwen2ForCausalLM",
            bos_token_id=bos,
            eos_token_ids=tuple(eos),
            checkpoint_dtype=_dtype(config, src),
            qk_norm=architecture == "Qwen3ForCausalLM",
        )


def _is_token_id(value: Any, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


# Sizes and counts index int32 tensors (block tables, kernel offsets): anything larger is not a real model.
MAX_SIZE = 2**31 - 1


def _size(config: Mapping[str, Any], key: str, source: str, default: Any = REQUIRED) -> Any:
    """A required (or defaulted) positive int no larger than MAX_SIZE."""
    return get_int(config, key, source=source, default=default, minimum=1, maximum=MAX_SIZE)


def _as_id_list(config: Mapping[str, Any], key: str, source: str) -> list[int]:
    """An int or a list of ints (token ids >= 0); [] when absent."""
    value = config.get(key)
    if value is None:
        return []
    if is_int(value):
        value = [value]
    ids = get_list({key: value}, key, source=source, item=lambda v: is_int(v) and v >= 0,
                   item_name="token ids (ints >= 0)")
    return list(ids)


def _bos(config: Mapping[str, Any], source: str) -> int | None:
    """bos_token_id: an int (or a one-element list of one, as some configs write it), or None."""
    ids = _as_id_list(config, "bos_token_id", source)
    if len(ids) > 1:
        raise ModelFileError(source, "bos_token_id", f"expected one token id, got {short_repr(ids)}")
    return ids[0] if ids else None


def _architecture(config: Mapping[str, Any], source: str) -> str:
    architectures = config.get("architectures")
    if architectures is None:
        model_type = get_str(config, "model_type", source=source, default=None)
        by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
        if model_type not in by_type:
            raise ModelFileError(source, "architectures",
                                 f"not given and model_type {model_type!r} is not one of {sorted(by_type)}")
        return by_type[model_type]
    if isinstance(architectures, str):
        architectures = [architectures]
    architectures = get_list({"architectures": architectures}, "architectures", source=source,
                             item=lambda v: isinstance(v, str), item_name="strings")
    refused = [a for a in architectures if a in REFUSED_ARCHITECTURES]
    if refused:
        raise ModelFileError(source, "architectures",
                             f"{refused[0]!r} is not supported: {REFUSED_ARCHITECTURES[refused[0]]}")
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelFileError(source, "architectures", f"{short_repr(architectures)} is not supported; supported: "
                             f"{sorted(SUPPORTED_ARCHITECTURES)}")
    return architectures[0]


def _refuse_unsupported_options(config: Mapping[str, Any], architecture: str, source: str) -> None:
    """Raise ModelFileError naming the first option whose effect trinfer does not implement."""
    key = "hidden_act" if "hidden_act" in config or "hidden_activation" not in config else "hidden_activation"
    act = get_str(config, key, source=source, default="silu")
    if act != "silu":
        raise ModelFileError(source, key, f"only 'silu' is supported, got {act!r}")
    if get_bool(config, "mlp_bias", source=source, default=False):
        raise ModelFileError(source, "mlp_bias", "biases on the MLP projections are not supported (mlp_bias=true)")
    if get_bool(config, "attention_bias", source=source, default=False):
        # Hugging Face Llama/Mistral put the bias on o_proj too; trinfer has only q/k/v biases (Qwen2).
        raise ModelFileError(source, "attention_bias", "biases on the attention projections (including o_proj) are "
                             "not supported (attention_bias=true)")
    rope_params = get_mapping(config, "rope_parameters", source=source, default=None)
    partial = get_number(config, "partial_rotary_factor", source=source, default=None)
    if partial is None and rope_params is not None:
        partial = get_number(rope_params, "partial_rotary_factor", source=source, default=None)
    if partial is not None and partial != 1.0:
        raise ModelFileError(source, "partial_rotary_factor", f"only full rotary (1.0) is supported, got {partial!r}")
    quant = config.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, Mapping) else "?"
        raise ModelFileError(source, "quantization_config",
                             f"quantized safetensors checkpoints are not supported ({short_repr(method)})")
    for key in ("num_local_experts", "num_experts"):
        if get_int(config, key, source=source, default=0, minimum=0):
            raise ModelFileError(source, key, "mixture-of-experts models are not supported")
    if get_bool(config, "is_encoder_decoder", source=source, default=False):
        raise ModelFileError(source, "is_encoder_decoder", "encoder-decoder models are not supported")
    _refuse_sliding_window(config, architecture, source)


def _refuse_sliding_window(config: Mapping[str, Any], architecture: str, source: str) -> None:
    window = get_int(config, "sliding_window", source=source, default=None, minimum=0)
    max_positions = _size(config, "max_position_embeddings", source)
    layer_types = get_list(config, "layer_types", source=source, default=[], item=lambda v: isinstance(v, str),
                           item_name="strings")
    if architecture in _QWEN_WINDOW_ARCHITECTURES:
        # Qwen2/Qwen3 slide only with use_sliding_window (on layers from max_window_layers on).
        uses_window = get_bool(config, "use_sliding_window", source=source, default=False) \
            or "sliding_attention" in layer_types
    else:
        uses_window = window is not None or "sliding_attention" in layer_types
    if not uses_window:
        return
    if window is None or window >= max_positions:
        return  # a window as long as the context never masks anything
    raise ModelFileError(
        source, "sliding_window", f"sliding-window attention is not supported (sliding_window={window} < "
        f"max_position_embeddings={max_positions}); only models with full attention can run"
    )


def _rope(config: Mapping[str, Any], source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's rope_parameters or 4.x's rope_theta/rope_scaling."""
    params = get_mapping(config, "rope_parameters", source=source, default=None)
    if params is not None and any(isinstance(v, Mapping) for v in params.values()):
        raise ModelFileError(source, "rope_parameters",
                             f"per-layer-type rope parameters are not supported, got {short_repr(dict(params))}")
    key = "rope_parameters" if params is not None else "rope_scaling"
    scaling = params if params is not None else get_mapping(config, "rope_scaling", source=source, default=None)
    theta = None
    if params is not None:
        theta = get_number(params, "rope_theta", source=f"{source}: rope_parameters", default=None, positive=True)
    if theta is None:
        theta = get_number(config, "rope_theta", source=source, default=10000.0, positive=True)
    if not scaling:
        return theta, None
    where = f"{source}: {key}"
    type_key = "rope_type" if "rope_type" in scaling or "type" not in scaling else "type"
    rope_type = get_str(scaling, type_key, source=where, default="default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelFileError(source, key, f"rope_type {rope_type!r} is not supported; supported: "
                             f"{list(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        if scaling.get("factor") is None:
            raise ModelFileError(source, key, "rope_type 'linear' needs 'factor'")
        return theta, {"rope_type": "linear", "factor": get_number(scaling, "factor", source=where, positive=True)}
    missing = [k for k in _LLAMA3_ROPE_KEYS if scaling.get(k) is None]
    if missing:
        raise ModelFileError(source, key, f"rope_type 'llama3' needs {missing}")
    out: dict[str, Any] = {"rope_type": "llama3"}
    for k in _LLAMA3_ROPE_KEYS:
        if k == "original_max_position_embeddings":
            out[k] = _size(scaling, k, where)
        else:
            out[k] = get_number(scaling, k, source=where, positive=True)
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


def _dtype(config: Mapping[str, Any], source: str) -> torch.dtype:
    key = "dtype" if config.get("dtype") is not None else "torch_dtype"
    name = get_str(config, key, source=source, default=None)
    if name is None:
        return torch.float32
    name = name.replace("torch.", "")
    if name not in _DTYPES:
        raise ModelFileError(source, key, f"checkpoint dtype {short_repr(name)} is not supported; supported: "
                             "float32, float16, bfloat16")
    return _DTYPES[name]
