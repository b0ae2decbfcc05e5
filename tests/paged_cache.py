"""Test helper: a batch of sequences in a paged KV cache whose every slot not owned by a sequence is poisoned.

Blocks are handed out in a shuffled order (tables are not consecutive), unused table entries point at a
poisoned block, and the tail of each sequence's last block is poisoned too, with NaN, +inf and -inf in turn:
a kernel that reads any slot outside a sequence's first `kv_len` tokens produces NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

POISON = (float("nan"), float("inf"), float("-inf"))


@dataclass
class PagedBatch:
    k_cache: torch.Tensor      # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [batch, max_blocks] int32
    kv_lens: torch.Tensor       # [batch] int32
    owned: torch.Tensor         # [num_blocks * block_size] bool: slots holding a sequence's token

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]


def poison_(cache: torch.Tensor) -> torch.Tensor:
    """Fill every slot with NaN / +inf / -inf by slot index (in place)."""
    flat = cache.view(-1, *cache.shape[2:])
    for i, value in enumerate(POISON):
        flat[i::3] = value
    return cache


def make_paged_batch(kv_lens, num_kv_heads: int, head_dim: int, dtype, device, *, block_size: int = 16,
                     spare_blocks: int = 3, extra_table_cols: int = 1, generator=None) -> PagedBatch:
    """Random K/V for sequences of `kv_lens` tokens, scattered over shuffled blocks of a poisoned cache."""
    blocks_per_seq = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    poison_block = perm[-1]  # never owned: table padding points here
    width = max(blocks_per_seq + [1]) + extra_table_cols
    table = torch.full((len(kv_lens), width), poison_block, dtype=torch.int32)
    k_cache = poison_(torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype))
    v_cache = poison_(torch.empty_like(k_cache))
    owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    nxt = 0
    for s, n in enumerate(kv_lens):
        for j in range(blocks_per_seq[s]):
            table[s, j] = perm[nxt]
            nxt += 1
        t = torch.arange(n)
        slots = table[s, t // block_size].long() * block_size + t % block_size
        owned[slots] = True
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(n, num_kv_heads, head_dim, generator=generator).to(dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(n, num_kv_heads, head_dim, generator=generator).to(dtype)
    return PagedBatch(k_cache.to(device), v_cache.to(device), table.to(device),
                      torch.tensor(list(kv_lens), dtype=torch.int32, device=device), owned.to(device))


def cu_seqlens(q_lens, device) -> torch.Tensor:
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(list(q_lens), dtype=torch.int64), 0)
    return cu.to(device)
