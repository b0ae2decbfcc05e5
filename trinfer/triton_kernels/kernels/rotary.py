"""Rotary position embedding (Hugging Face half-split `rotate_half` convention), in place on q and k.

For each token t at position p = positions[t], with c = cos_sin[p, :D/2] and s = cos_sin[p, D/2:] (fp32,
cast to the activation dtype as HF does) and every head of q and k, x = [x1 | x2] (halves of head_dim D):

    x1' = rnd(x1 * c) + rnd(-x2 * s)          x2' = rnd(x2 * c) + rnd(x1 * s)

where rnd() rounds to the activation dtype: the casts of HF's `q * cos + rotate_half(q) * sin` in that
dtype (each product, then the sum, rounded). With QK_NORM each head x of q (of k) is first RMS-normalized over
its head_dim D with the weight w = q_norm[D] (k_norm[D]), as Qwen3's q_norm / k_norm (Qwen3RMSNorm) compute it:

    x <- rnd(w * rnd(x * rsqrt(sum(x^2) / D + eps)))

and the normalized head is what gets rotated (and, for k, stored). With WRITE_CACHE the rotated k and the
untouched v of token t are also stored into the paged KV cache at slot = slot_mapping[t] (skipped when the
slot is -1):
`k_cache[slot // block_size, slot % block_size] = k'[t]`. Reference: `references.apply_rotary_ref` /
`references.rotary_write_kv_cache_ref`.

Grid `(tokens, 2)`: program (t, 0) rotates the q heads of token t, program (t, 1) its k heads (and writes
k and v to the cache), so the cos/sin row is read once per program and q and k proceed in parallel. The
norm, the rotation and the cache write are one pass: each head is loaded once and stored once (twice for k:
in place and to the cache).
"""
import triton
import triton.language as tl


@triton.jit
def _rope_heads(
    x_ptr, head_stride, n_heads, h0, half, d, d_mask, cos, sin, w1, w2, eps,
    BLOCK_H: tl.constexpr, QK_NORM: tl.constexpr,
):
    """Rotate heads [h0, h0 + BLOCK_H) of one token in place (RMS-normalized first with the weight halves w1, w2
    when QK_NORM); return both rotated halves (in the activation dtype) and the mask."""
    heads = h0 + tl.arange(0, BLOCK_H)
    mask = (heads < n_heads)[:, None] & d_mask[None, :]
    p1 = x_ptr + heads[:, None] * head_stride + d[None, :]
    dt = x_ptr.dtype.element_ty
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:  # masked lanes hold 0 and add nothing to the sum of squares
        mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half)
        rstd = (1.0 / tl.sqrt(mean_sq + eps))[:, None]
        # Qwen3RMSNorm's casts: the normalized head rounded to the dtype, times the weight, rounded again.
        x1 = ((x1 * rstd).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
        x2 = ((x2 * rstd).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
    o1 = ((x1 * cos).to(dt).to(tl.float32) + (-x2 * sin).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * cos).to(dt).to(tl.float32) + (x1 * sin).to(dt).to(tl.float32)).to(dt)
    tl.store(p1, o1, mask=mask)
    tl.store(p1 + half, o2, mask=mask)
    return o1, o2, heads, mask


@triton.jit
def rotary_kernel(
    q_ptr,              # [tokens, q_heads, head_dim] queries (fp32/fp16/bf16), last dim contiguous; rotated in place
    q_tok_stride, q_head_stride, n_q_heads,
    k_ptr,              # [tokens, kv_heads, head_dim] keys, q's dtype, last dim contiguous; rotated in place
    k_tok_stride, k_head_stride, n_kv_heads,
    pos_ptr,            # [tokens] int32/int64 position of each token
    cos_sin_ptr,        # [max_positions, head_dim] fp32 table: cos in the first half, sin in the second
    cos_sin_stride,     # elements between rows of the table
    half,               # head_dim // 2
    v_ptr,              # [tokens, kv_heads, head_dim] values, q's dtype (WRITE_CACHE only)
    v_tok_stride, v_head_stride,
    slot_ptr,           # [tokens] int32/int64 cache slot of each token, -1 = skip (WRITE_CACHE only)
    k_cache_ptr,        # [num_blocks, block_size, kv_heads, head_dim] K cache, q's dtype (WRITE_CACHE only)
    v_cache_ptr,        # [num_blocks, block_size, kv_heads, head_dim] V cache, q's dtype (WRITE_CACHE only)
    kc_block_stride, kc_slot_stride, kc_head_stride,   # K cache strides (blocks, in-block slots, heads)
    vc_block_stride, vc_slot_stride, vc_head_stride,   # V cache strides
    block_size,         # tokens per cache block
    q_norm_ptr,         # [head_dim] RMSNorm weight of every q head, q's dtype (QK_NORM only)
    k_norm_ptr,         # [head_dim] RMSNorm weight of every k head, q's dtype (QK_NORM only)
    eps,                # fp32 epsilon of the q/k RMSNorm (QK_NORM only)
    BLOCK_HQ: tl.constexpr,      # q heads per loop step (power of two)
    BLOCK_HK: tl.constexpr,      # kv heads per loop step (power of two)
    BLOCK_D: tl.constexpr,       # power of two >= head_dim // 2
    WRITE_CACHE: tl.constexpr,   # fused KV-cache write: rotated k and v stored in one launch with the rotation
    QK_NORM: tl.constexpr,       # per-head q/k RMSNorm before the rotation (Qwen3); off: no weights read
):
    tok = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    dt = q_ptr.dtype.element_ty
    row = cos_sin_ptr + pos * cos_sin_stride
    # HF casts cos/sin to the activation dtype before multiplying.
    cos = tl.load(row + d, mask=d_mask, other=0.0).to(dt).to(tl.float32)[None, :]
    sin = tl.load(row + half + d, mask=d_mask, other=0.0).to(dt).to(tl.float32)[None, :]
    w1 = cos  # placeholders without QK_NORM (never read)
    w2 = cos
    if which == 0:
        if QK_NORM:
            w1 = tl.load(q_norm_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            w2 = tl.load(q_norm_ptr + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        for h0 in range(0, n_q_heads, BLOCK_HQ):
            _rope_heads(q_ptr + tok * q_tok_stride, q_head_stride, n_q_heads, h0, half, d, d_mask, cos, sin,
                        w1, w2, eps, BLOCK_H=BLOCK_HQ, QK_NORM=QK_NORM)
    else:
        if QK_NORM:
            w1 = tl.load(k_norm_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            w2 = tl.load(k_norm_ptr + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        if WRITE_CACHE:
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            keep = slot >= 0
            slot = tl.where(keep, slot, 0)
            kc = k_cache_ptr + (slot // block_size) * kc_block_stride + (slot % block_size) * kc_slot_stride
            vc = v_cache_ptr + (slot // block_size) * vc_block_stride + (slot % block_size) * vc_slot_stride
        for h0 in range(0, n_kv_heads, BLOCK_HK):
            o1, o2, heads, mask = _rope_heads(k_ptr + tok * k_tok_stride, k_head_stride, n_kv_heads, h0, half, d,
                                              d_mask, cos, sin, w1, w2, eps, BLOCK_H=BLOCK_HK, QK_NORM=QK_NORM)
            if WRITE_CACHE:
                cmask = mask & keep
                kp = kc + heads[:, None] * kc_head_stride + d[None, :]
                tl.store(kp, o1, mask=cmask)
                tl.store(kp + half, o2, mask=cmask)
                vsrc = v_ptr + tok * v_tok_stride + heads[:, None] * v_head_stride + d[None, :]
                vdst = vc + heads[:, None] * vc_head_stride + d[None, :]
                tl.store(vdst, tl.load(vsrc, mask=cmask), mask=cmask)
                tl.store(vdst + half, tl.load(vsrc + half, mask=cmask), mask=cmask)
