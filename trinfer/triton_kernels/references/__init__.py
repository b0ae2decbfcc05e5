"""Plain-PyTorch references, one per kernel, written for clarity in fp32.

Tests, benchmarks and the runtime's `torch` backend all import these same functions. Each mirrors the
casts of the Hugging Face module it stands for, so that it is also the CPU fallback of the runtime.
"""
from .lm_head import lm_head_greedy_ref
from .linear import dequantize_ref, linear_ref
from .norm import fused_add_rms_norm_ref, rms_norm_ref
from .activation import silu_and_mul_ref
from .attention import paged_decode_attention_ref, paged_prefill_attention_ref, write_kv_cache_ref
from .rotary import apply_rotary_ref, rotary_write_kv_cache_ref
from .sampling import greedy_sample_ref

__all__ = ["rms_norm_ref", "fused_add_rms_norm_ref"]
__all__ += ["greedy_sample_ref"]
__all__ += ["apply_rotary_ref", "rotary_write_kv_cache_ref"]
__all__ += ["lm_head_greedy_ref"]
__all__ += ["linear_ref", "dequantize_ref"]
__all__ += ["silu_and_mul_ref"]
__all__ += ["write_kv_cache_ref", "paged_prefill_attention_ref", "paged_decode_attention_ref"]
