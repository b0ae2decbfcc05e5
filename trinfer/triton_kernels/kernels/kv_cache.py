"""Scatter new keys and values into the paged KV cache (layout: `trinfer.triton_kernels.kv_cache_layout`).

    k_cache[slot // block_size, slot % block_size, h, :] = k[t, h, :]      (same for v)

for every token `t` with `slot = slot_mapping[t] >= 0`; tokens with slot -1 are skipped. A pure copy in the
cache dtype (k, v and the caches share one dtype), so the result is bit-exact.
Reference: `trinfer.triton_kernels.references.write_kv_cache_ref`.
"""
import triton
import triton.language as tl


@triton.jit
def write_kv_cache_kernel(
    k_ptr,              # [tokens, kv_heads, head_dim] new keys, last dim contiguous (may be a view of fused qkv)
    stride_kt, stride_kh,
    v_ptr,              # [tokens, kv_heads, head_dim] new values, last dim contiguous
    stride_vt, stride_vh,
    k_cache_ptr,        # [num_blocks, block_size, kv_heads, head_dim] K cache, last dim contiguous; written
    stride_kcb, stride_kcs, stride_kch,
    v_cache_ptr,        # [num_blocks, block_size, kv_heads, head_dim] V cache, last dim contiguous; written
    stride_vcb, stride_vcs, stride_vch,
    slot_ptr,           # [tokens] int32/int64 slot of each token, -1 = skip
    num_kv_heads,
    block_size,         # tokens per cache block (power of two)
    HEAD_DIM: tl.constexpr,   # model constant; sets the tile width
    BLOCK_D: tl.constexpr,    # next power of two >= HEAD_DIM
    BLOCK_H: tl.constexpr,    # KV heads per program (power of two)
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    in_block = slot % block_size
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = k_cache_ptr + block * stride_kcb + in_block * stride_kcs
    vc = v_cache_ptr + block * stride_vcb + in_block * stride_vcs
    tl.store(kc + heads[:, None] * stride_kch + offs_d[None, :], k, mask=mask)
    tl.store(vc + heads[:, None] * stride_vch + offs_d[None, :], v, mask=mask)
