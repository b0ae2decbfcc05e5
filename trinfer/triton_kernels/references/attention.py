"""References for the paged KV cache write and paged attention (fp32 math, output in q's dtype).

Layout of the caches and block tables: `trinfer.triton_kernels.kv_cache_layout`. Each reference gathers a
sequence's keys and values token by token through its block table, then runs ordinary softmax attention in
fp32 with query heads mapped to KV heads by `h // (q_heads // kv_heads)` (GQA).
"""
from __future__ import annotations

import torch


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """`k_cache[slot // bs, slot % bs] = k[t]` (same for v) for every token t with slot >= 0; in place."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots // block_size, slots % block_size] = k[keep]
    v_cache[slots // block_size, slots % block_size] = v[keep]


def _gather(cache: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    """The first n tokens of one sequence, `[n, kv_heads, head_dim]` in fp32, through its block-table row."""
    block_size = cache.shape[1]
    t = torch.arange(n, device=cache.device)
    return cache[table_row[t // block_size].long(), t % block_size].float()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[m, q_heads, d]`, k/v `[n, kv_heads, d]` (fp32), query i sees keys j <= q_pos[i]. Returns fp32 `[m, q_heads, d]`.

    A query that sees no key gets zeros.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q.float(), k) * scale
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hmn,nhd->mhd", probs, v)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor,
                                scale: float) -> torch.Tensor:
    """Causal attention of each sequence's `q_len` packed queries to its `kv_len` cached keys.

    Query i of a sequence sits at position `kv_len - q_len + i` and sees keys 0 .. that position.
    Returns `[total_q, q_heads, head_dim]` in q's dtype.
    """
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    cu = cu_seqlens_q.tolist()
    for s, kv_len in enumerate(kv_lens.tolist()):
        q_len = cu[s + 1] - cu[s]
        if q_len == 0:
            continue
        k = _gather(k_cache, block_tables[s], kv_len)
        v = _gather(v_cache, block_tables[s], kv_len)
        q_pos = kv_len - q_len + torch.arange(q_len, device=q.device)
        out[cu[s]:cu[s + 1]] = _attend(q[cu[s]:cu[s + 1]], k, v, q_pos, scale)
    return out.to(q.dtype)


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence (`q [batch, q_heads, head_dim]`) attends to all `seq_lens[s]` keys of its sequence.

    A sequence of length 0 gives zeros. Returns `[batch, q_heads, head_dim]` in q's dtype.
    """
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for s, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        k = _gather(k_cache, block_tables[s], n)
        v = _gather(v_cache, block_tables[s], n)
        out[s] = _attend(q[s:s + 1], k, v, torch.tensor([n - 1], device=q.device), scale)[0]
    return out.to(q.dtype)
