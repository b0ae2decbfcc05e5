"""The `torch` backend's operations: the kernels' PyTorch references, with leaner equivalents on the hot path.

The references (`trinfer.triton_kernels.references`) are written for clarity: every cast Hugging Face makes,
a Python loop over sequences, a gather per sequence. On a CPU each PyTorch call costs microseconds of dispatch,
and a decode step of a small model (SmolLM2-135M: 30 layers) is mostly such calls besides its matrix products,
so the `torch` backend runs these instead where they apply:

    rms_norm, fused_add_rms_norm, silu_and_mul, rotary_write_kv_cache (with or without the q/k norm)
        fp32 inputs: the reference's arithmetic without its casts (no-ops in fp32), with fewer temporaries,
        in place where the reference copies back, q and k rotated as one view when they are adjacent (as in
        the model's fused q/k/v output); the same operations on the same values in the same order, so the
        results are bit for bit the reference's. Other dtypes: the reference itself.
    paged_decode_attention, paged_prefill_attention
        fp32 math as in the reference, without its per-sequence Python gather: a sequence whose blocks are
        consecutive (a lone sequence's usually are) is read as a view of the cache, else gathered once;
        one decoding sequence, and each prefilling one, runs torch's scaled_dot_product_attention (GQA by
        `enable_gqa`, causal by `is_causal` or an explicit mask when a cached prefix precedes the queries);
        a decode batch of several runs batched matrix products with a length mask only when lengths
        differ; a verify pass (speculative decoding) reads each sequence's K/V once for all its rows, as one
        causal block (`paged_verify_attention`). Equal to the reference up to summation order
        (tests/test_torch_backend.py).
    prepare_matrix
        fp32 weight matrices on the CPU whose output dim is at least their input dim (q/k/v, o_proj,
        gate/up, the LM head) stored column-major: the same `[out, in]` tensor with transposed strides,
        so `F.linear` hands MKL a non-transposed operand. Measured on an AMD EPYC (AVX-512, MKL 2024.2,
        weights streaming from memory, one row: a decode step of one sequence), interleaved, medians:
        SmolLM2-135M's q/k/v 1.4x, gate/up 1.8x, LM head 1.85x, o_proj 1.1x faster; its down_proj
        (out < in) 0.8x, so it stays row-major. Two rows: 1.7x faster; 4-8 rows: 5-10% slower;
        prefill-sized products are the same. Other dtypes (fp16 on the CPU is 10x slower column-major),
        devices and BLAS libraries keep the row-major layout.
    prepare_matrix_two_layouts, linear (speculative decoding)
        a verify pass multiplies a few rows (2-5 for k = 1-4) by each matrix, which MKL does slowly from the
        column-major layout (a 5-row product of the LM head: 4.5x the 1-row one) and 1.4-2.6x faster as `W @ x^T`
        from the row-major one (2 rows: about the cost of 1). With speculation on, the matrices stored
        column-major are kept in both layouts (`TwoLayouts`, twice their memory) and `linear` picks by rows.

The LM head's argmax is the reference. Every function takes the kernels' signature and ignores their
launch/validation keywords.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trinfer.triton_kernels import references as R

from . import quantization as Q

__all__ = ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_write_kv_cache", "paged_prefill_attention",
           "paged_decode_attention", "paged_verify_attention", "prepare_matrix", "prepare_matrix_two_layouts", "linear",
           "TwoLayouts"]

_F32 = torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, **_kwargs) -> torch.Tensor:
    """`rms_norm_ref`: `weight * (x * rsqrt(mean(x^2) + eps))`."""
    if x.dtype != _F32 or weight.dtype != _F32:
        return R.rms_norm_ref(x, weight, eps)
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
    return h.mul_(weight)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       **_kwargs) -> torch.Tensor:
    """`fused_add_rms_norm_ref`: `residual += x` in place, then `rms_norm(residual)`."""
    if x.dtype != _F32 or residual.dtype != _F32 or weight.dtype != _F32:
        return R.fused_add_rms_norm_ref(x, residual, weight, eps)
    return rms_norm(residual.add_(x), weight, eps)


def silu_and_mul(x: torch.Tensor, **_kwargs) -> torch.Tensor:
    """`silu_and_mul_ref`: `silu(gate) * up` for x = [gate | up]."""
    if x.dtype != _F32:
        return R.silu_and_mul_ref(x)
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]).mul_(x[..., half:])


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x `[T, H, D]` fp32 in place: `[x1 * cos - x2 * sin, x2 * cos + x1 * sin]` (the reference's
    `x1 * cos + (-x2) * sin`: negating a factor or subtracting instead of adding a negated term is exact)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    o1 = (x1 * cos).sub_(x2 * sin)
    x2.mul_(cos).add_(x1 * sin)
    x1.copy_(o1)


def _joint_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q `[T, Hq, D]` and k `[T, Hk, D]` as one `[T, Hq + Hk, D]` view when k's heads follow q's in every row
    (the model's views into its fused q/k/v projection output), so that one rotation covers both; else None."""
    t, hq, d = q.shape
    if (k.dtype == q.dtype and k.shape[0] == t and k.shape[2] == d and q.stride() == k.stride()
            and q.stride()[1:] == (d, 1) and k.data_ptr() == q.data_ptr() + hq * d * q.element_size()):
        return q.as_strided((t, hq + k.shape[1], d), q.stride())
    return None


def _head_norm_(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """x `[T, H, D]` fp32 in place: `rms_norm_ref` over each head (the reference's fp32 ops in its order)."""
    x.mul_(torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))).mul_(weight)


def rotary_write_kv_cache(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, *,
                          q_norm_weight=None, k_norm_weight=None, norm_eps=None, **_kwargs):
    """`rotary_write_kv_cache_ref`: (with q/k norm weights, RMS-normalize every q and k head first), rotate q and
    k in place, then store k and v at their slots (-1: skipped)."""
    norm = q_norm_weight is not None
    if (q.dtype != _F32 or k.dtype != _F32 or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or (norm and (q_norm_weight.dtype != _F32 or k_norm_weight.dtype != _F32))):
        return R.rotary_write_kv_cache_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                           q_norm_weight, k_norm_weight, norm_eps)
    if norm:
        _head_norm_(q, q_norm_weight, norm_eps)
        _head_norm_(k, k_norm_weight, norm_eps)
    half = q.shape[-1] // 2
    rows = cos_sin_cache.index_select(0, positions)[:, None, :]  # [T, 1, D] fp32: cos | sin
    cos, sin = rows[..., :half], rows[..., half:]
    qk = _joint_heads(q, k)
    if qk is not None:
        _rotate_(qk, cos, sin)
    else:
        _rotate_(q, cos, sin)
        _rotate_(k, cos, sin)
    slots = slot_mapping
    if slots.numel() and int(slots.min()) < 0:  # padding rows write nothing
        keep = (slots >= 0).nonzero().squeeze(1)
        slots, k, v = slots[keep], k[keep], v[keep]
    heads, dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, heads, dim).index_copy_(0, slots, k)
    v_cache.view(-1, heads, dim).index_copy_(0, slots, v)
    return q, k


def _tokens(cache: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    """The first n cached tokens of one sequence, `[n, kv_heads, head_dim]`: a view of the cache when its blocks
    are consecutive (as a lone sequence's usually are), else a gather through its block-table row."""
    block_size, heads, dim = cache.shape[1:]
    nb = -(-n // block_size)
    blocks = table_row[:nb].tolist()
    first = blocks[0]
    if cache.is_contiguous() and blocks == list(range(first, first + nb)):
        return cache.view(-1, heads, dim)[first * block_size: first * block_size + n]
    # index_select, not cache[idx]: the same copy, ~5x faster on the CPU (a 129-block gather: 0.04 vs 0.24 ms)
    return cache.index_select(0, table_row[:nb].long()).view(nb * block_size, heads, dim)[:n]


def _causal_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table_row: torch.Tensor, kv_len: int,
                 scale: float, *, decode_like: bool = False) -> torch.Tensor:
    """m query rows `[m, q_heads, D]` of one sequence, row i at position `kv_len - m + i` seeing keys 0 .. that
    position, by torch's `scaled_dot_product_attention` (fp32) over the sequence's cached K/V read once.
    decode_like: a single row runs without a mask, as `paged_decode_attention` runs a lone sequence.
    Returns `[m, q_heads, D]` fp32."""
    m = q.shape[0]
    k = _tokens(k_cache, table_row, kv_len).transpose(0, 1)[None].float()  # [1, Hkv, kv_len, D]
    v = _tokens(v_cache, table_row, kv_len).transpose(0, 1)[None].float()
    qs = q.transpose(0, 1)[None].float()  # [1, Hq, m, D]
    if m == kv_len:
        o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)
    elif m == 1 and decode_like:
        o = F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)
    else:
        visible = (torch.arange(kv_len, device=q.device)[None, :]
                   <= (kv_len - m + torch.arange(m, device=q.device))[:, None])
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor,
                            scale: float, **_kwargs) -> torch.Tensor:
    """`paged_prefill_attention_ref` with torch's `scaled_dot_product_attention` (fp32) per sequence: query i of a
    sequence sits at position `kv_len - q_len + i` and sees keys 0 .. that position. Returns `[T, q_heads, D]` in
    q's dtype."""
    out = torch.zeros(q.shape, dtype=_F32, device=q.device)
    cu = cu_seqlens_q.tolist()
    for s, kv_len in enumerate(kv_lens.tolist()):
        q0, q1 = cu[s], cu[s + 1]
        if q1 > q0:
            out[q0:q1] = _causal_rows(q[q0:q1], k_cache, v_cache, block_tables[s], kv_len, scale)
    return out.to(q.dtype)


def paged_verify_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, *, seq_starts: list[int], **_kwargs) -> torch.Tensor:
    """A verify pass's attention (speculative decoding): `paged_decode_attention_ref` row by row, where the rows
    `seq_starts[s]:seq_starts[s+1]` belong to one sequence, share its block-table row and have consecutive lengths
    (row i of m sees the first `kv_len - m + 1 + i` keys, kv_len its last row's length): computed per sequence
    as one causal block over its K/V, read once (`_causal_rows`), instead of a gather per row. Padding rows past
    the last sequence give zeros. Returns `[rows, q_heads, D]` in q's dtype; fp32 math."""
    out = torch.zeros(q.shape, dtype=_F32, device=q.device)
    lens = seq_lens.tolist()
    for r0, r1 in zip(seq_starts, seq_starts[1:]):
        out[r0:r1] = _causal_rows(q[r0:r1], k_cache, v_cache, block_tables[r0], lens[r1 - 1], scale,
                                    decode_like=True)
    return out.to(q.dtype)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, **_kwargs) -> torch.Tensor:
    """`paged_decode_attention_ref` for the whole batch at once: q `[B, q_heads, D]` attends to the first
    `seq_lens[b]` cached tokens of its sequence; a length of 0 gives zeros. Returns `[B, q_heads, D]` in q's
    dtype; fp32 math.

    Rows are gathered up to the longest length of their group: rows whose lengths differ by more than 2x go in
    separate groups (sorted by length), so one long sequence does not make every short one read and mask its
    length (4 streams of 100 tokens beside an 8000-token one: one gather of 8000 tokens, not five)."""
    lens = seq_lens.tolist()  # host values: which tokens to read and whether a mask is needed
    groups = _length_groups(lens)
    if len(groups) <= 1:  # one row, rows of like lengths, or none
        return _decode_rows(q, k_cache, v_cache, block_tables, seq_lens, lens, scale)
    out = torch.empty_like(q)
    for rows in groups:
        idx = torch.tensor(rows, device=q.device)
        out[idx] = _decode_rows(q[idx], k_cache, v_cache, block_tables[idx], seq_lens[idx], [lens[r] for r in rows],
                                scale)
    return out


def _length_groups(lens: list[int], ratio: int = 2) -> list[list[int]]:
    """Row indices grouped by length (ascending): a group's longest row is at most `ratio` times its shortest
    (zero-length rows join the shortest group)."""
    order = sorted(range(len(lens)), key=lens.__getitem__)
    groups: list[list[int]] = []
    low = None
    for r in order:
        n = lens[r]
        if groups and (low == 0 or n <= ratio * low):
            groups[-1].append(r)
            if low == 0:
                low = n
        else:
            groups.append([r])
            low = n
    return groups


def _decode_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, lens: list[int], scale: float) -> torch.Tensor:
    """`paged_decode_attention` over rows gathered to their longest length `n` (one row: torch's fused attention
    over a view of its cached tokens where it can)."""
    batch, q_heads, dim = q.shape
    n = max(lens, default=0)
    if n == 0:
        return torch.zeros_like(q)
    kv_heads = k_cache.shape[2]
    if batch == 1:  # one sequence: torch's fused attention over its cached tokens (a view when it can)
        k = _tokens(k_cache, block_tables[0], n).transpose(0, 1)[None].float()  # [1, Hkv, n, D]
        v = _tokens(v_cache, block_tables[0], n).transpose(0, 1)[None].float()
        o = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, scale=scale, enable_gqa=True)
        return o.view(batch, q_heads, dim).to(q.dtype)
    ragged = any(length != n for length in lens)
    # Several sequences: one gather of the blocks holding every sequence's first n tokens.
    block_size = k_cache.shape[1]
    nb = -(-n // block_size)
    table = block_tables[:, :nb]
    if ragged:  # table entries past a sequence's own blocks may hold anything: read block 0 there instead
        owned = torch.arange(nb, device=q.device)[None, :] * block_size < seq_lens[:, None]
        table = torch.where(owned, table, 0)
    table = table.long()
    flat = table.reshape(-1)
    k = k_cache.index_select(0, flat).view(batch, nb * block_size, kv_heads, dim)[:, :n]
    v = v_cache.index_select(0, flat).view(batch, nb * block_size, kv_heads, dim)[:, :n]
    if ragged:
        visible = torch.arange(n, device=q.device)[None, :] < seq_lens[:, None]  # [B, n]
        v = v.masked_fill(~visible[:, :, None, None], 0.0)  # slots past a sequence's end: no 0 * inf = NaN
    k, v = k.transpose(1, 2).float(), v.transpose(1, 2).float()  # [B, Hkv, n, D]
    qg = q.float().view(batch, kv_heads, q_heads // kv_heads, dim)  # query head h reads KV head h // group
    scores = torch.matmul(qg, k.transpose(2, 3)).mul_(scale)  # [B, Hkv, group, n]
    if ragged:
        scores.masked_fill_(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if 0 in lens:
        probs = probs.nan_to_num_(0.0)  # no key visible: zeros, as the reference
    return torch.matmul(probs, v).view(batch, q_heads, dim).to(q.dtype)


class TwoLayouts:
    """A weight matrix `[out, in]` kept twice (speculative decoding on the CPU): `cols`, column-major, for products of
    one row (decode steps) and of many (prefill), and `rows`, row-major, for products of a few rows (a verify
    pass: 2 to `FEW_ROWS`), which MKL runs as `rows @ x^T` 1.5-2.6x faster than from either layout with x as the
    left operand (measured, `prepare_matrix`). Same values; twice the memory."""

    __slots__ = ("cols", "rows")

    def __init__(self, cols: torch.Tensor, rows: torch.Tensor):
        self.cols, self.rows = cols, rows

    @property
    def shape(self) -> torch.Size:
        return self.rows.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device


FEW_ROWS = 16  # products of 2..FEW_ROWS rows run on TwoLayouts.rows


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *, decode: bool = False) -> torch.Tensor:
    """The torch backend's `linear` (`quantization.torch_linear`), taking a `TwoLayouts` matrix too: `x @ W^T + b`
    as `(W x^T)^T` on its row-major copy for 2..FEW_ROWS rows, else on its column-major one."""
    if isinstance(weight, TwoLayouts):
        if 2 <= x.shape[0] <= FEW_ROWS and x.dim() == 2:
            y = torch.mm(weight.rows, x.t()).t().contiguous()
            return y if bias is None else y.add_(bias)
        weight = weight.cols
    return Q.torch_linear(x, weight, bias, decode=decode)


def prepare_matrix_two_layouts(w: torch.Tensor) -> torch.Tensor | TwoLayouts:
    """`prepare_matrix`, keeping the row-major original beside a column-major copy (TwoLayouts) for the products
    of a few rows that speculative decoding's verify passes run."""
    cols = prepare_matrix(w)
    return cols if cols is w else TwoLayouts(cols, w)


def prepare_matrix(w: torch.Tensor) -> torch.Tensor:
    """A weight matrix `[out, in]` in the layout the CPU's BLAS multiplies one row by fastest: with MKL, fp32
    on the CPU with out >= in is stored column-major (a copy: the same values, shape and dtype; only the
    strides differ); anything else is returned as it is."""
    if (w.device.type != "cpu" or w.dtype != _F32 or w.dim() != 2 or w.shape[0] < w.shape[1]
            or not torch.backends.mkl.is_available()):
        return w
    return w.t().contiguous().t()
