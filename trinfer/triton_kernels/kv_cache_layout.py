"""The paged KV cache layout. This module is the one place it is defined; every kernel and the block manager use it.

Layout
------
Per layer there are two tensors, a K cache and a V cache, each of shape

    [num_blocks, block_size, num_kv_heads, head_dim]        (dtype fp32/fp16/bf16, last dim contiguous)

- A *block* (page) holds `block_size` consecutive tokens of ONE sequence, all KV heads of each token.
  `block_size` is a power of two from 1 to 256 (default 16); it is read from `k_cache.shape[1]`.
- A sequence owns an ordered list of blocks: its row of `block_tables [batch, max_blocks_per_seq]` (int32).
  Entries past the blocks a sequence uses are never read (they may hold anything, e.g. -1).
- The *slot* of token `t` of sequence `s` (its flat index in `[num_blocks * block_size]`) is

      slot = block_tables[s, t // block_size] * block_size + t % block_size

  and its K vector for KV head `h` lives at `k_cache[slot // block_size, slot % block_size, h, :]`.
  `write_kv_cache` takes these slots (`slot_mapping`, one per new token; -1 = skip the token).
- A sequence's *capacity* is `block_tables.shape[1] * block_size` tokens. No kernel reads a block-table entry
  at or past `ceil(len / block_size)` for a sequence of `len` cached tokens, nor a slot past `len`.

Strides: the kernels take every stride of the caches as a runtime argument and require only the last dim
to be contiguous, so a K cache may be a slice of a bigger tensor (e.g. `kv[0]` of one
`[2, num_blocks, block_size, num_kv_heads, head_dim]` allocation, or one layer of a stacked all-layer tensor).
Cache addresses are computed in int64 (a 4 GiB+ cache is normal).

Why this layout (NHD, as vLLM's flash-attention backend): writing one new token stores one contiguous
`num_kv_heads * head_dim` row; reading one KV head of a block loads `block_size` rows of `head_dim`
contiguous elements (128-512 bytes for the head dims served, whole 32-byte sectors), which is what a tile
of keys needs; and K and V as separate tensors keep each tile load a single stream.
"""
from __future__ import annotations

import torch

from ._utils import FLOAT_DTYPES, check_tensor

DEFAULT_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 256
BLOCK_TABLE_DTYPE = torch.int32


def check_block_size(block_size: int, name: str = "block_size") -> int:
    """Raise unless `block_size` is a power of two in [1, MAX_BLOCK_SIZE]; return it as an int."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name}: expected an int power of two in [1, {MAX_BLOCK_SIZE}], got {type(block_size).__name__}")
    if not (1 <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise ValueError(f"{name}: expected a power of two in [1, {MAX_BLOCK_SIZE}], got {block_size}")
    return block_size


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """Shape of ONE layer's K cache (the V cache has the same shape)."""
    check_block_size(block_size)
    for name, v in (("num_blocks", num_blocks), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    return (num_blocks, block_size, num_kv_heads, head_dim)


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                      dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (k_cache, v_cache), uninitialized: slots are defined only once written."""
    shape = kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks a sequence of `num_tokens` tokens occupies: ceil(num_tokens / block_size)."""
    return -(-int(num_tokens) // block_size)


def slot_mapping(block_tables: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """int64 slots of tokens at `positions` of sequences `seq_ids` (rows of block_tables); runs on the device.

    `slot = block_tables[seq, pos // block_size] * block_size + pos % block_size`, elementwise.
    """
    check_block_size(block_size)
    pos = positions.long()
    blocks = block_tables[seq_ids.long(), pos // block_size].long()
    return blocks * block_size + pos % block_size


def check_kv_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate a (k_cache, v_cache) pair against this layout (no device sync).

    Returns `(num_blocks, block_size, num_kv_heads, head_dim)`.
    """
    check_tensor("k_cache", k_cache, dtypes=FLOAT_DTYPES, ndim=4, last_dim_contiguous=True)
    check_tensor("v_cache", v_cache, dtypes=(k_cache.dtype,), ndim=4, device=k_cache.device, last_dim_contiguous=True)
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache: expected the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    check_block_size(block_size, "k_cache.shape[1] (block_size)")
    return num_blocks, block_size, num_kv_heads, head_dim
