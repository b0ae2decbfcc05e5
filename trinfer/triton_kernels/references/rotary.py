"""References for apply_rotary and rotary_write_kv_cache (Hugging Face rotate_half convention and casts; the
optional per-head q/k RMSNorm of Qwen3 with Qwen3RMSNorm's casts)."""
from __future__ import annotations

import torch

from .norm import rms_norm_ref


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x `[T, H, D]` in place: `x * cos + rotate_half(x) * sin` with each product and the sum rounded to x's
    dtype, as HF computes it in the activation dtype. cos, sin: `[T, 1, D/2]` fp32, already rounded to x's dtype."""
    dt, half = x.dtype, x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()

    def rnd(t):
        return t.to(dt).float()

    o1 = rnd(x1 * cos) + rnd(-x2 * sin)
    o2 = rnd(x2 * cos) + rnd(x1 * sin)
    x.copy_(torch.cat([o1, o2], dim=-1).to(dt))


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Rotate q `[T, Hq, D]` and k `[T, Hk, D]` in place with the rows `positions` of the fp32 table
    `cos_sin_cache [max_positions, D]` (cos | sin, see `build_rope_cache`); cos/sin are first cast to the
    activation dtype, as HF's LlamaRotaryEmbedding returns them. Returns (q, k)."""
    half = q.shape[-1] // 2
    rows = cos_sin_cache[positions.long()]
    cos = rows[:, None, :half].to(q.dtype).float()
    sin = rows[:, None, half:].to(q.dtype).float()
    _rotate_(q, cos, sin)
    _rotate_(k, cos, sin)
    return q, k


def rotary_write_kv_cache_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                              q_norm_weight=None, k_norm_weight=None, norm_eps=None):
    """With q/k norm weights (`[D]`, Qwen3's q_norm / k_norm), first `q = rms_norm_ref(q, q_norm_weight,
    norm_eps)` and `k = rms_norm_ref(k, k_norm_weight, norm_eps)` over each head, in place; then
    `apply_rotary_ref(q, k)`, then `k_cache[slot] = k[t]` and `v_cache[slot] = v[t]` for every token whose slot
    (`block * block_size + offset` in `[num_blocks, block_size, kv_heads, head_dim]`) is not -1."""
    if q_norm_weight is not None:
        q.copy_(rms_norm_ref(q, q_norm_weight, norm_eps))
        k.copy_(rms_norm_ref(k, k_norm_weight, norm_eps))
    apply_rotary_ref(q, k, positions, cos_sin_cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = k[keep]
    v_cache[slots // block_size, slots % block_size] = v[keep]
    return q, k
