"""Allocation of the paged KV cache: per layer, K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].

All layers share one allocation ([num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]); each
layer's K and V are contiguous views into it. The number of blocks is given, or derived from a memory
budget in bytes, or by default from the free device memory (CUDA) or a fixed CPU budget, and never
more than `max_num_seqs` full-context sequences need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .block_manager import blocks_needed

DEFAULT_CUDA_MEMORY_FRACTION = 0.85  # of the memory free after the weights, kept for activations otherwise
DEFAULT_CPU_KV_MEMORY = 512 << 20    # 512 MiB


@dataclass(frozen=True, slots=True)
class KVCache:
    k: list[torch.Tensor]  # per layer [num_blocks, block_size, num_kv_heads, head_dim]
    v: list[torch.Tensor]
    num_blocks: int
    block_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize


def num_blocks_for_memory(config, block_size: int, dtype: torch.dtype, memory_bytes: int, draft_config=None) -> int:
    """Blocks that fit in `memory_bytes`; with a draft model, each block also takes the draft's K/V (its cache
    mirrors the target's blocks)."""
    per = bytes_per_block(config, block_size, dtype)
    if draft_config is not None:
        per += bytes_per_block(draft_config, block_size, dtype)
    return int(memory_bytes) // per


def choose_num_blocks(config, *, block_size: int, dtype: torch.dtype, device: torch.device, max_num_seqs: int,
                      max_model_len: int, num_blocks: int | None = None, memory_bytes: int | None = None,
                      draft_config=None) -> int:
    """Number of KV blocks: `num_blocks` if given, else from `memory_bytes`, else from a device default (the
    memory shared with a draft model's cache of as many blocks, when `draft_config` is given)."""
    if num_blocks is not None and memory_bytes is not None:
        raise ValueError("num_kv_blocks and kv_cache_memory: give at most one of them")
    if num_blocks is not None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_kv_blocks: expected an int >= 1, got {num_blocks!r}")
        return num_blocks
    useful = max_num_seqs * blocks_needed(max_model_len, block_size)
    if memory_bytes is None:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            memory_bytes = int(free * DEFAULT_CUDA_MEMORY_FRACTION)
        else:
            memory_bytes = DEFAULT_CPU_KV_MEMORY
        n = min(num_blocks_for_memory(config, block_size, dtype, memory_bytes, draft_config), useful)
    else:
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, (int, float)) \
                or not math.isfinite(memory_bytes) or memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory: expected a finite number of bytes > 0, got {memory_bytes!r}")
        n = num_blocks_for_memory(config, block_size, dtype, memory_bytes, draft_config)
    if n < 1:
        per = bytes_per_block(config, block_size, dtype)
        raise ValueError(f"kv_cache_memory: {memory_bytes} bytes hold no KV block (one block of {block_size} "
                         f"tokens takes {per} bytes for this model)")
    return n


def allocate_kv_cache(config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> KVCache:
    """Zero-filled caches (never-written slots are masked by the kernels; zeros keep 0 * garbage from being NaN)."""
    shape = (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    try:
        buf = torch.zeros(shape, dtype=dtype, device=device)
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:  # the CPU allocator raises RuntimeError
        per = bytes_per_block(config, block_size, dtype)
        raise MemoryError(f"KV cache of {num_blocks} blocks ({num_blocks * per / 2**20:.0f} MiB) does not fit on "
                          f"{device}; pass a smaller num_kv_blocks or kv_cache_memory") from e
    return KVCache(k=[buf[i, 0] for i in range(config.num_layers)], v=[buf[i, 1] for i in range(config.num_layers)],
                   num_blocks=num_blocks, block_size=block_size)
