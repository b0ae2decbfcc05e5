"""Rotary position embedding: the cos/sin table, in-place rotation of q and k, and the fused KV-cache write.

`build_rope_cache` makes the fp32 table once per model (theta, linear or Llama-3 scaling, as Hugging Face's
rope init functions compute it). `apply_rotary` rotates q and k in place; `rotary_write_kv_cache` also
stores the rotated k and v into the paged KV cache (layout: `kv_cache_layout`) in the same launch. Both run
a torch custom op (`torch.ops.trinfer.apply_rotary` / `rotary_write_kv_cache`) that mutates only the
tensors it names, so callers compile with `torch.compile(fullgraph=True)` and are CUDA-graph capturable.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import triton

from ._utils import FLOAT_DTYPES, TRITON_DTYPE, AotSpec, check_positive_float, check_same, check_tensor
from .kernels.rotary import rotary_kernel

INDEX_DTYPES = (torch.int32, torch.int64)
ROPE_TYPES = ("default", "linear", "llama3")


# ----------------------------------------------------------------------------------------------- the table
def _scaling_param(scaling: dict, key: str, rope_type: str) -> float:
    if key not in scaling:
        raise ValueError(f"scaling: rope_type {rope_type!r} expects key {key!r}, got keys {sorted(scaling)}")
    value = scaling[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"scaling[{key!r}]: expected a finite number, got {value!r}")
    return float(value)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3.1 frequency scaling, in the same fp32 arithmetic order as transformers' llama3 rope init."""
    factor = _scaling_param(scaling, "factor", "llama3")
    low = _scaling_param(scaling, "low_freq_factor", "llama3")
    high = _scaling_param(scaling, "high_freq_factor", "llama3")
    original = _scaling_param(scaling, "original_max_position_embeddings", "llama3")
    if not (factor > 0 and 0 < low < high and original > 0):
        raise ValueError(f"scaling: expected factor > 0, 0 < low_freq_factor < high_freq_factor and "
                         f"original_max_position_embeddings > 0 for llama3, got {scaling}")
    if float(original).is_integer():
        original = int(original)
    low_freq_wavelen = original / low   # wavelengths above this are slowed down by `factor`
    high_freq_wavelen = original / high  # wavelengths below this are kept
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # Between the two, interpolate smoothly between the scaled and the original frequency.
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_rope_cache(
    head_dim: int,
    max_positions: int,
    theta: float = 10000.0,
    scaling: dict[str, Any] | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The fp32 rotary table `[max_positions, head_dim]`: cos of the angles in the first head_dim/2 columns,
    sin in the last head_dim/2, for angle[p, i] = p * inv_freq[i], inv_freq[i] = theta^(-2i/head_dim).

    Args:
        head_dim: even, >= 2 (the whole head is rotated; partial rotary is not supported).
        max_positions: rows of the table (positions 0 .. max_positions - 1), >= 1.
        theta: the rope base (`rope_theta`), > 0.
        scaling: Hugging Face's `rope_scaling` / `rope_parameters` dict, or None. Supported `rope_type`
            (or legacy `type`): "default" (none), "linear" (`factor`: frequencies divided by it) and "llama3"
            (`factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`). Any other
            type raises ValueError naming it. A `rope_theta` key, if present, must equal `theta`.
        device: where the table lives. The inverse frequencies are computed on the CPU (as HF's rotary module
            does at init), the angles and cos/sin on `device` (as HF's forward does).
    Returns:
        The table; build it once per model and pass it to `apply_rotary` / `rotary_write_kv_cache`. Its values
        equal the fp32 cos/sin of HF's LlamaRotaryEmbedding (built on the CPU, run on `device`), bit for bit.
    """
    for name, value, low in (("head_dim", head_dim, 2), ("max_positions", max_positions, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even number, got {head_dim}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise TypeError(f"theta: expected a float > 0, got {type(theta).__name__}")
    if not (theta > 0 and math.isfinite(theta)):
        raise ValueError(f"theta: expected a finite float > 0, got {theta}")
    theta = float(theta)
    rope_type = "default"
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise TypeError(f"scaling: expected a dict (HF rope_scaling) or None, got {type(scaling).__name__}")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"scaling: rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if scaling.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"scaling: partial_rotary_factor {scaling['partial_rotary_factor']} is not supported "
                             f"(expected 1.0)")
        if "rope_theta" in scaling and float(scaling["rope_theta"]) != theta:
            raise ValueError(f"scaling: rope_theta {scaling['rope_theta']} differs from theta {theta}")
    # Frequencies on the CPU, as HF's rotary module computes them at init (a GPU pow may differ by an ulp);
    # angles and cos/sin on `device`, as HF's forward does on the activations' device.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if rope_type == "linear":
        factor = _scaling_param(scaling, "factor", "linear")
        if not factor > 0:
            raise ValueError(f"scaling['factor']: expected a float > 0 for linear scaling, got {factor}")
        inv_freq = inv_freq / factor
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    inv_freq = inv_freq.to(device)
    angles = torch.arange(max_positions, device=device, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).contiguous()


# ------------------------------------------------------------------------------------------------ launches
def rotary_launch_config(n_q_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, int]:
    """Tile sizes and warps: up to 2048 elements per half-head tile, ~8 of them per thread."""
    block_d = triton.next_power_of_2(max(head_dim // 2, 1))
    cap = max(1, 2048 // block_d)
    block_hq = min(triton.next_power_of_2(max(n_q_heads, 1)), cap)
    block_hk = min(triton.next_power_of_2(max(n_kv_heads, 1)), cap)
    num_warps = max(1, min(8, block_hq * block_d // 256))  # ~8 elements of each half per thread
    return dict(block_d=block_d, block_hq=block_hq, block_hk=block_hk, num_warps=num_warps)


def _launch(q, k, positions, cos_sin_cache, v=None, k_cache=None, v_cache=None, slot_mapping=None,
            q_norm_weight=None, k_norm_weight=None, norm_eps=0.0) -> None:
    tokens, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    cfg = rotary_launch_config(n_q_heads, n_kv_heads, head_dim)
    write = k_cache is not None
    if not write:  # placeholders of the right types, never read without WRITE_CACHE
        v, k_cache, v_cache, slot_mapping = k, k, k, positions
        cache_strides = (0, 0, 0, 0, 0, 0)
        block_size = 16  # placeholder (unused), the value real caches have
    else:
        cache_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3])
        block_size = k_cache.shape[1]
    qk_norm = q_norm_weight is not None
    if not qk_norm:  # placeholders, never read without QK_NORM
        q_norm_weight = k_norm_weight = q
    rotary_kernel[(tokens, 2)](
        q, q.stride(0), q.stride(1), n_q_heads,
        k, k.stride(0), k.stride(1), n_kv_heads,
        positions, cos_sin_cache, cos_sin_cache.stride(0), head_dim // 2,
        v, v.stride(0), v.stride(1),
        slot_mapping, k_cache, v_cache, *cache_strides, block_size,
        q_norm_weight, k_norm_weight, float(norm_eps),
        BLOCK_HQ=cfg["block_hq"], BLOCK_HK=cfg["block_hk"], BLOCK_D=cfg["block_d"], WRITE_CACHE=write,
        QK_NORM=qk_norm, num_warps=cfg["num_warps"],
    )


@torch.library.custom_op("trinfer::apply_rotary", mutates_args=("q", "k"))
def _apply_rotary_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    _launch(q, k, positions, cos_sin_cache)


@_apply_rotary_op.register_fake
def _(q, k, positions, cos_sin_cache):
    return None


@torch.library.custom_op("trinfer::rotary_write_kv_cache", mutates_args=("q", "k", "k_cache", "v_cache"))
def _rotary_write_kv_cache_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: Optional[torch.Tensor], k_norm_weight: Optional[torch.Tensor], norm_eps: float,
) -> None:
    _launch(q, k, positions, cos_sin_cache, v, k_cache, v_cache, slot_mapping, q_norm_weight, k_norm_weight,
            norm_eps)


@_rotary_write_kv_cache_op.register_fake
def _(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, q_norm_weight, k_norm_weight, norm_eps):
    return None


# ------------------------------------------------------------------------------------------------ wrappers
def _check_rotary(q, k, positions, cos_sin_cache, validate: bool) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    check_tensor("k", k, dtypes=(q.dtype,), ndim=3, device=q.device, last_dim_contiguous=True)
    tokens, _, head_dim = q.shape
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"q: expected an even head_dim (dim 2) >= 2, got {head_dim}")
    check_same("k", k.shape[0], tokens, "tokens (dim 0) equal to q's")
    check_same("k", k.shape[2], head_dim, "head_dim (dim 2) equal to q's")
    check_tensor("positions", positions, dtypes=INDEX_DTYPES, ndim=1, device=q.device, contiguous=True)
    check_same("positions", positions.shape[0], tokens, "one position per token:")
    check_tensor("cos_sin_cache", cos_sin_cache, dtypes=(torch.float32,), ndim=2, device=q.device,
                 last_dim_contiguous=True)
    check_same("cos_sin_cache", cos_sin_cache.shape[1], head_dim, "columns (dim 1) equal to head_dim")
    if validate and tokens:
        p = positions.long()
        bad = (p < 0) | (p >= cos_sin_cache.shape[0])
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"positions: expected values in [0, {cos_sin_cache.shape[0]}) (rows of cos_sin_cache), "
                             f"got {int(p[i])} at token {i}")


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, *, validate: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding applied in place to q and k (Hugging Face `rotate_half` convention and casts).

    Args:
        q: `[tokens, q_heads, head_dim]` fp32/fp16/bf16; last dim contiguous, token and head strides free
            (views of a fused qkv projection output are fine). Rotated in place.
        k: `[tokens, kv_heads, head_dim]`, q's dtype and device, same freedom of strides. Rotated in place.
        positions: `[tokens]` int32/int64, contiguous: the position of each token (a row of the table).
        cos_sin_cache: the fp32 `[max_positions, head_dim]` table of `build_rope_cache`.
        validate: also check (one host sync) that every position is a row of the table. Off in the hot path:
            without it an out-of-range position reads outside the table.
    Returns:
        `(q, k)`, the same tensors. Equal to HF's `apply_rotary_pos_emb(q, k, cos, sin)` with HF's cos/sin cast
        to the activation dtype. Reference: `trinfer.triton_kernels.references.apply_rotary_ref`.
    """
    _check_rotary(q, k, positions, cos_sin_cache, validate)
    if q.shape[0]:
        _apply_rotary_op(q, k, positions, cos_sin_cache)
    return q, k


def _check_caches(k_cache, v_cache, k, v, slot_mapping, validate: bool) -> None:
    check_tensor("v", v, dtypes=(k.dtype,), ndim=3, device=k.device, last_dim_contiguous=True)
    check_same("v", tuple(v.shape), tuple(k.shape), "the shape of k")
    check_tensor("k_cache", k_cache, dtypes=(k.dtype,), ndim=4, device=k.device, last_dim_contiguous=True)
    check_tensor("v_cache", v_cache, dtypes=(k.dtype,), ndim=4, device=k.device, last_dim_contiguous=True)
    check_same("k_cache", tuple(k_cache.shape[2:]), tuple(k.shape[1:]), "[kv_heads, head_dim] of k")
    check_same("v_cache", tuple(v_cache.shape), tuple(k_cache.shape), "the shape of k_cache")
    check_tensor("slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, ndim=1, device=k.device, contiguous=True)
    check_same("slot_mapping", slot_mapping.shape[0], k.shape[0], "one slot per token:")
    if validate and k.shape[0]:
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        s = slot_mapping.long()
        bad = (s < -1) | (s >= num_slots)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"slot_mapping: expected slots in [-1, {num_slots}) (num_blocks * block_size), "
                             f"got {int(s[i])} at token {i}")
        used = s[s >= 0]
        if used.numel() != torch.unique(used).numel():
            raise ValueError("slot_mapping: expected each slot at most once (two tokens would race), got duplicates")


def _check_qk_norm(q, q_norm_weight, k_norm_weight, norm_eps) -> float:
    """The per-head q/k RMSNorm arguments: both weights `[head_dim]` of q's dtype and device and an eps > 0, or
    none of the three. Returns eps (0.0 when there is no norm)."""
    if q_norm_weight is None and k_norm_weight is None:
        if norm_eps is not None:
            raise ValueError(f"norm_eps: expected None without q_norm_weight/k_norm_weight, got {norm_eps!r}")
        return 0.0
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is None:
            other = "k_norm_weight" if name == "q_norm_weight" else "q_norm_weight"
            raise ValueError(f"{name}: expected a [head_dim] tensor when {other} is given (both or neither), "
                             f"got None")
        check_tensor(name, w, dtypes=(q.dtype,), ndim=1, device=q.device, contiguous=True)
        check_same(name, w.shape[0], q.shape[2], "size equal to head_dim")
    if norm_eps is None:
        raise ValueError("norm_eps: expected a float > 0 with q_norm_weight/k_norm_weight, got None")
    return check_positive_float("norm_eps", norm_eps)


def rotary_write_kv_cache(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
    norm_eps: float | None = None, validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary(q, k, ...)` and then `k_cache[slot] = k[t]`, `v_cache[slot] = v[t]`, in one launch;
    with q/k norm weights (Qwen3), every q and k head is RMS-normalized first, in the same pass.

    Args:
        q, k, positions, cos_sin_cache: as for `apply_rotary` (q and k rotated in place).
        v: `[tokens, kv_heads, head_dim]`, k's dtype, shape and device, last dim contiguous; not modified.
        k_cache, v_cache: `[num_blocks, block_size, kv_heads, head_dim]` of k's dtype (layout of
            `kv_cache_layout`; the last dim contiguous, other strides free). Written at the tokens' slots.
        slot_mapping: `[tokens]` int32/int64, contiguous: the flat slot `block * block_size + offset` of each
            token; -1 skips the token's cache write (padding).
        q_norm_weight, k_norm_weight: optional `[head_dim]` RMSNorm weights (q's dtype and device, contiguous),
            both or neither: each head h of q becomes `q_norm_weight * rnd(h * rsqrt(mean(h^2) + norm_eps))`
            (fp32 math, rnd() rounding to the dtype, as Qwen3RMSNorm casts), likewise k with k_norm_weight,
            before the rotation; the normalized, rotated k is what the cache receives.
        norm_eps: the norm's epsilon (> 0; Qwen3's rms_norm_eps), required with the weights, else None.
        validate: also check (one host sync) positions, slots in [-1, num_blocks * block_size) and no slot twice.
    Returns:
        `(q, k)`, (normalized and) rotated. Reference: `trinfer.triton_kernels.references.rotary_write_kv_cache_ref`.
    """
    _check_rotary(q, k, positions, cos_sin_cache, validate)
    _check_caches(k_cache, v_cache, k, v, slot_mapping, validate)
    eps = _check_qk_norm(q, q_norm_weight, k_norm_weight, norm_eps)
    if q.shape[0]:
        _rotary_write_kv_cache_op(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                  q_norm_weight, k_norm_weight, eps)
    return q, k


# (q heads, kv heads, head_dim): SmolLM2-135M, Llama-3.2-1B, Llama-3-8B, and a head_dim-80 case (padded tile).
AOT_MODELS = ((9, 3, 64), (32, 8, 64), (32, 8, 128), (32, 8, 80))
# With the q/k norm (the model's fused path only): Qwen3-0.6B/1.7B, 4B/8B, 14B (two q-head steps), 32B.
AOT_QK_NORM_MODELS = ((16, 8, 128), (32, 8, 128), (40, 8, 128), (64, 8, 128))


def _aot_spec(n_q: int, n_kv: int, head_dim: int, dtype: torch.dtype, write: bool, qk_norm: bool) -> AotSpec:
    cfg = rotary_launch_config(n_q, n_kv, head_dim)
    t = "*" + TRITON_DTYPE[dtype]
    idx = "*i32" if dtype == torch.float32 else "*i64"
    return AotSpec(
        name=f"rotary[h={n_q}/{n_kv},d={head_dim},{TRITON_DTYPE[dtype]},{idx[1:]},cache={int(write)}"
             f"{',qk_norm' if qk_norm else ''}]",
        fn=rotary_kernel,
        # Fused-qkv views, the table and a contiguous cache: every stride is a multiple of
        # head_dim, hence of 16 ("i32:16", as the JIT specializes it); half is when head_dim % 32 == 0.
        signature={
            "q_ptr": t, "q_tok_stride": "i32:16", "q_head_stride": "i32:16", "n_q_heads": "i32",
            "k_ptr": t, "k_tok_stride": "i32:16", "k_head_stride": "i32:16", "n_kv_heads": "i32",
            "pos_ptr": idx, "cos_sin_ptr": "*fp32", "cos_sin_stride": "i32:16",
            "half": "i32:16" if head_dim % 32 == 0 else "i32",
            "v_ptr": t, "v_tok_stride": "i32:16", "v_head_stride": "i32:16",
            "slot_ptr": idx, "k_cache_ptr": t, "v_cache_ptr": t,
            "kc_block_stride": "i32:16", "kc_slot_stride": "i32:16", "kc_head_stride": "i32:16",
            "vc_block_stride": "i32:16", "vc_slot_stride": "i32:16", "vc_head_stride": "i32:16",
            "block_size": "i32:16", "q_norm_ptr": t, "k_norm_ptr": t, "eps": "fp32",
        },
        constexprs={"BLOCK_HQ": cfg["block_hq"], "BLOCK_HK": cfg["block_hk"], "BLOCK_D": cfg["block_d"],
                    "WRITE_CACHE": write, "QK_NORM": qk_norm},
        num_warps=cfg["num_warps"],
    )


def aot_specs(models=AOT_MODELS, dtypes=FLOAT_DTYPES, qk_norm_models=AOT_QK_NORM_MODELS) -> list[AotSpec]:
    """The launch configurations `apply_rotary` / `rotary_write_kv_cache` pick for real models (int64 indices;
    int32 for fp32), and `rotary_write_kv_cache` with the q/k norm for Qwen3's shapes."""
    specs = [_aot_spec(n_q, n_kv, head_dim, dtype, write, False)
             for n_q, n_kv, head_dim in models for dtype in dtypes for write in (False, True)]
    specs += [_aot_spec(n_q, n_kv, head_dim, dtype, True, True)
              for n_q, n_kv, head_dim in qk_norm_models for dtype in dtypes]
    return specs
