"""The model shapes and sweep sizes that every kernel benchmark uses.

Model numbers are those of the published Hugging Face configs (config.json), kept in one table in the
package (`trinfer.runtime.random_model.MODEL_SHAPES`) and read from there. Benchmarks take their sizes from
this module and nowhere else, so "Llama-3-8B, batch 64" means the same tensor shapes in every table.
"""
from __future__ import annotations

from dataclasses import dataclass

from trinfer.runtime.random_model import MODEL_SHAPES


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    n_layers: int
    rope_theta: float
    rms_eps: float = 1e-5
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head before the rotary embedding

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim


def from_config(name: str, cfg: dict) -> ModelShape:
    """A ModelShape from a config.json dict."""
    return ModelShape(name, hidden=cfg["hidden_size"], n_heads=cfg["num_attention_heads"],
                      n_kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
                      intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                      n_layers=cfg["num_hidden_layers"], rope_theta=cfg["rope_theta"], rms_eps=cfg["rms_norm_eps"],
                      qk_norm=cfg["architectures"] == ["Qwen3ForCausalLM"])


# The real shapes come from the package's one table of published configs (also used by the end-to-end
# benchmark and `trinfer profile` to make random-weight models).
SMOLLM2_135M = from_config("SmolLM2-135M", MODEL_SHAPES["SmolLM2-135M"])
LLAMA_3_2_1B = from_config("Llama-3.2-1B", MODEL_SHAPES["Llama-3.2-1B"])
LLAMA_3_8B = from_config("Llama-3-8B", MODEL_SHAPES["Llama-3-8B"])
QWEN3_8B = from_config("Qwen3-8B", MODEL_SHAPES["Qwen3-8B"])  # the q/k norm of the fused rotary kernel

# A toy shape for --tiny / --cpu-smoke runs (the Triton interpreter costs ~3 ms per program loop trip):
# GQA group 2, head_dim 64 (what the attention kernels serve), everything else small.
TINY = ModelShape("tiny", hidden=128, n_heads=4, n_kv_heads=2, head_dim=64, intermediate=96, vocab=1000,
                  n_layers=2, rope_theta=10000.0)

MODELS: tuple[ModelShape, ...] = (SMOLLM2_135M, LLAMA_3_2_1B, LLAMA_3_8B)
# Kernels that only Qwen3 runs (the q/k norm fused into rotary + KV write) are measured at its shape.
QK_NORM_MODELS: tuple[ModelShape, ...] = (QWEN3_8B,)
MODELS_BY_NAME = {m.name: m for m in MODELS + QK_NORM_MODELS + (TINY,)}

# --quick (the GPU check): attention at the two shapes the end-to-end decode benchmark runs (head_dim 64 and
# 128); the row-wise kernels, whose speed depends on bytes rather than on the model, at Llama-3-8B only.
QUICK_MODELS: tuple[ModelShape, ...] = (LLAMA_3_2_1B, LLAMA_3_8B)
QUICK_ROW_MODELS: tuple[ModelShape, ...] = (LLAMA_3_8B,)

# Token counts. Decode: one token per sequence, batch 1/8/64. Prefill: a prompt's tokens in one call.
DECODE_BATCHES = (1, 8, 64)
PREFILL_TOKENS = (512, 4096)
QUICK_DECODE_BATCHES = (1, 64)
QUICK_PREFILL_TOKENS = (4096,)

# Attention contexts (KV length per sequence).
CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
QUICK_CONTEXTS = (1024, 8192, 32768)
PREFILL_CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
QUICK_PREFILL_CONTEXTS = (1024, 8192)

# KV cache paging.
BLOCK_SIZE = 16

# --tiny / --cpu-smoke sizes.
TINY_BATCHES = (1, 3)
TINY_TOKENS = (5,)
TINY_CONTEXTS = (17, 40)


def model(name: str) -> ModelShape:
    try:
        return MODELS_BY_NAME[name]
    except KeyError:
        raise ValueError(f"model: expected one of {sorted(MODELS_BY_NAME)}, got {name!r}") from None
