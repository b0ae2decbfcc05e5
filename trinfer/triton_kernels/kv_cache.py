"""Host wrapper for `write_kv_cache`: scatter new K/V rows into the paged KV cache.

The cache layout is defined in `trinfer.triton_kernels.kv_cache_layout`.
"""
from __future__ import annotations

import torch
import triton

from ._utils import FLOAT_DTYPES, TRITON_DTYPE, AotSpec, check_same, check_tensor
from .kernels.kv_cache import write_kv_cache_kernel
from .kv_cache_layout import check_kv_caches

SLOT_DTYPES = (torch.int32, torch.int64)


def _write_config(num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_H, num_warps): up to 4096 elements (8 KB in fp16) per program, 1-4 warps."""
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // block_d))
    num_warps = max(1, min(4, block_h * block_d // 1024))
    return block_d, block_h, num_warps


def _launch(k, v, k_cache, v_cache, slot_mapping) -> None:
    tokens, num_kv_heads, head_dim = k.shape
    block_d, block_h, num_warps = _write_config(num_kv_heads, head_dim)
    write_kv_cache_kernel[(tokens, triton.cdiv(num_kv_heads, block_h))](
        k, k.stride(0), k.stride(1),
        v, v.stride(0), v.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        slot_mapping, num_kv_heads, k_cache.shape[1],
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_H=block_h, num_warps=num_warps,
    )


@torch.library.custom_op("trinfer::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def _write_kv_cache_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    _launch(k, v, k_cache, v_cache, slot_mapping)


@_write_kv_cache_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


def _validate_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Device-memory checks (one sync): every slot in [-1, num_slots), no slot written twice."""
    s = slot_mapping.long()
    bad = (s < -1) | (s >= num_slots)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"slot_mapping: expected slots in [-1, {num_slots}) (num_blocks * block_size), "
                         f"got {int(s[i])} at token {i}")
    used, counts = torch.unique(s[s >= 0], return_counts=True)
    if bool((counts > 1).any()):
        dup = int(used[counts > 1][0])
        raise ValueError(f"slot_mapping: expected each slot at most once (two tokens would race), "
                         f"got slot {dup} {int(counts[used == dup][0])} times")


def check_write_kv_cache_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor, validate: bool) -> None:
    """`write_kv_cache`'s checks (shared with the CUDA backend): every call, plus the slot checks if `validate`."""
    num_blocks, block_size, num_kv_heads, head_dim = check_kv_caches(k_cache, v_cache)
    dev = k_cache.device
    check_tensor("k", k, dtypes=(k_cache.dtype,), ndim=3, device=dev, last_dim_contiguous=True)
    check_tensor("v", v, dtypes=(k_cache.dtype,), ndim=3, device=dev, last_dim_contiguous=True)
    check_same("k", tuple(k.shape[1:]), (num_kv_heads, head_dim), "[num_kv_heads, head_dim] of the cache")
    check_same("v", tuple(v.shape), tuple(k.shape), "the shape of k")
    check_tensor("slot_mapping", slot_mapping, dtypes=SLOT_DTYPES, ndim=1, device=dev, contiguous=True)
    check_same("slot_mapping", slot_mapping.shape[0], k.shape[0], "one slot per token:")
    if validate:
        _validate_slots(slot_mapping, num_blocks * block_size)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, validate: bool = False) -> None:
    """Write new keys/values into their cache slots: `k_cache[slot] = k[t]`, `v_cache[slot] = v[t]` (in place).

    Args:
        k, v: `[tokens, num_kv_heads, head_dim]`, the caches' dtype and device; last dim contiguous, other
            strides free (views into a fused qkv projection output are fine).
        k_cache, v_cache: `[num_blocks, block_size, num_kv_heads, head_dim]` (see `kv_cache_layout`).
        slot_mapping: `[tokens]` int32/int64, the flat slot of each token (`kv_cache_layout.slot_mapping`);
            -1 skips the token (padding rows of a captured CUDA graph).
        validate: also run the checks that read device memory (one host sync): each slot in
            [-1, num_blocks * block_size) and no slot written twice. Off in the hot path.
    Checked on every call (no sync): types, dtypes, devices, shapes, contiguity of the last dims.
    Reference: `trinfer.triton_kernels.references.write_kv_cache_ref`.
    """
    check_write_kv_cache_args(k, v, k_cache, v_cache, slot_mapping, validate)
    if k.shape[0] == 0:
        return
    _write_kv_cache_op(k, v, k_cache, v_cache, slot_mapping)


def aot_specs(head_dims=(64, 80, 96, 128, 256), dtypes=FLOAT_DTYPES, num_kv_heads=8) -> list[AotSpec]:
    """The launch configurations `write_kv_cache` picks (8 KV heads; int64 slots, int32 for fp32)."""
    specs = []
    for head_dim in head_dims:
        block_d, block_h, num_warps = _write_config(num_kv_heads, head_dim)
        for dtype in dtypes:
            t = "*" + TRITON_DTYPE[dtype]
            slot_t = "*i32" if dtype == torch.float32 else "*i64"
            specs.append(AotSpec(
                name=f"write_kv_cache[d={head_dim},{TRITON_DTYPE[dtype]},hkv={num_kv_heads},slot={slot_t[1:]}]",
                fn=write_kv_cache_kernel,
                signature={"k_ptr": t, "stride_kt": "i32", "stride_kh": "i32",
                           "v_ptr": t, "stride_vt": "i32", "stride_vh": "i32",
                           "k_cache_ptr": t, "stride_kcb": "i32", "stride_kcs": "i32", "stride_kch": "i32",
                           "v_cache_ptr": t, "stride_vcb": "i32", "stride_vcs": "i32", "stride_vch": "i32",
                           "slot_ptr": slot_t, "num_kv_heads": "i32", "block_size": "i32"},
                constexprs={"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_H": block_h},
                num_warps=num_warps,
                # What the JIT sees in real use: allocator pointers, strides that are multiples of head_dim.
                extra={"divisible_by_16": ("stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_kcb",
                                           "stride_kcs", "stride_kch", "stride_vcb", "stride_vcs", "stride_vch")},
            ))
    return specs
