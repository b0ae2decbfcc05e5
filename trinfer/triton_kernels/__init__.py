"""trinfer's Triton kernels: public API.

Every function here validates its inputs, runs a @triton.jit kernel through a torch custom op
(`torch.ops.trinfer.*`), and has a plain-PyTorch fp32 reference in `trinfer.triton_kernels.references`.
On CPU tensors the kernels run only under TRITON_INTERPRET=1 (set before this package is imported).
"""
from .activation import silu_and_mul
from .attention import (
    PrefillPlan,
    decode_workspace_numel,
    paged_decode_attention,
    paged_prefill_attention,
    plan_prefill_attention,
    prefill_workspace_numel,
)
from .kv_cache import write_kv_cache
from .linear import dequantize, linear
from .lm_head import lm_head_greedy
from .rms_norm import fused_add_rms_norm, rms_norm
from .rotary import apply_rotary, build_rope_cache, rotary_write_kv_cache
from .sampling import greedy_sample
from .weight_formats import QuantizedWeight

__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "apply_rotary",
    "rotary_write_kv_cache",
    "build_rope_cache",
    "greedy_sample",
    "lm_head_greedy",
    "write_kv_cache",
    "paged_prefill_attention",
    "plan_prefill_attention",
    "PrefillPlan",
    "prefill_workspace_numel",
    "paged_decode_attention",
    "decode_workspace_numel",
    "linear",
    "dequantize",
    "QuantizedWeight",
]
