"""What an engine will allocate, sized and checked against the memory available before anything is allocated.

The engine's allocations beyond the weights: the KV cache (num_blocks blocks), and what is sized by the
served context and the batch: the RoPE table ([context, head_dim] fp32), the decode buffers (a block-table
row per sequence) and the decode-attention workspace. Two sound clamps keep the last ones proportional to
what can actually run, whatever the model declares or the caller asks:

- no sequence can grow past the whole cache (`Scheduler.fits_alone` refuses such a request), so positions
  stop at `num_blocks * block_size`: the table and the buffers are sized by
  `served_len = min(max_model_len, num_blocks * block_size)`;
- a running sequence holds at least one block, so at most `num_blocks` sequences run at once: the buffers
  are sized for `min(max_num_seqs, num_blocks)` sequences.

Then the total is compared with the memory available on the device (free CUDA memory; the host's
MemAvailable on the CPU), and a plan that cannot fit is refused with a ValueError naming the argument or
model field that asked for it, before any allocation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .block_manager import blocks_needed
from .kv_cache import bytes_per_block

__all__ = ["MemoryPlan", "plan_memory", "available_memory_bytes"]

_DECODE_BYTES_PER_SEQ = 256  # packed per-sequence fields on the device, their two pinned staging copies, outputs


def available_memory_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (None when the platform does not say)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """served_len: rows of the RoPE table and the longest sequence the decode buffers hold.
    runner_seqs: sequences the decode buffers hold. The byte counts are those allocated for each part."""

    served_len: int
    runner_seqs: int
    kv_cache_bytes: int
    context_bytes: int  # RoPE table + decode buffers + decode workspace


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def plan_memory(config, *, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                max_num_seqs: int, max_model_len: int, workspace: bool, blocks_from: str,
                context_from: str, available: int | None = None, rows_per_seq: int = 1,
                draft_config=None) -> MemoryPlan:
    """Size the engine's allocations and refuse (ValueError) a plan larger than the memory available.

    workspace: the backend uses the split decode-attention workspace (the Triton and CUDA kernels do).
    blocks_from: what set the cache size, for the message ("num_kv_blocks=...", "kv_cache_memory=...", ...).
    context_from: what set max_model_len ("max_model_len=..." or the model's field).
    available: bytes available (default: `available_memory_bytes(device)`; None skips the check).
    rows_per_seq: decode rows per sequence (speculative decoding: a verify pass has 1 + k rows per sequence).
    draft_config: a draft model's config (speculative decoding): its cache of as many blocks, its RoPE table,
        decode buffers and workspace (one row per sequence) come on top.
    """
    from trinfer.triton_kernels.attention import decode_workspace_numel

    served = min(max_model_len, num_blocks * block_size)
    seqs = min(max_num_seqs, num_blocks)
    kv, context = 0, 0
    for cfg, rows in ((config, seqs * rows_per_seq), (draft_config, seqs)):
        if cfg is None:
            continue
        kv += num_blocks * bytes_per_block(cfg, block_size, dtype)
        rope = served * cfg.head_dim * 4
        buffers = rows * (_DECODE_BYTES_PER_SEQ + 8 * blocks_needed(served, block_size))
        scratch = 4 * decode_workspace_numel(rows, cfg.num_heads, cfg.head_dim, served) if workspace else 0
        context += rope + buffers + scratch
    plan = MemoryPlan(served_len=served, runner_seqs=seqs, kv_cache_bytes=kv, context_bytes=context)
    if available is None:
        available = available_memory_bytes(device)
    if available is None:
        return plan
    if kv > available:
        raise ValueError(f"{blocks_from}: a KV cache of {num_blocks} blocks of {block_size} tokens takes {_gib(kv)}, "
                         f"more than the {_gib(available)} available on {device}; give fewer blocks or bytes")
    if kv + context > available:
        raise ValueError(
            f"{context_from}: serving {served} tokens of context to {seqs} sequences at once needs "
            f"{_gib(context)} (RoPE table, decode block tables and workspace) besides the {_gib(kv)} KV cache, more "
            f"than the {_gib(available)} available on {device}; lower max_model_len or max_num_seqs")
    return plan
