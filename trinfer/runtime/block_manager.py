"""Paged KV-cache bookkeeping: which fixed-size blocks of the cache each sequence owns.

Token t of a sequence lives in block `block_table[t // block_size]` at offset `t % block_size`, i.e. at slot
`block_table[t // block_size] * block_size + t % block_size` of every layer's cache. Blocks are handed out
from a free list and returned the moment a sequence finishes or is preempted. No prefix sharing: a block
belongs to one sequence, which keeps results independent of what else is running.
"""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks: expected an int >= 1, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether all of the sequence's current tokens (prompt, plus outputs when recomputing) fit now."""
        return blocks_needed(seq.num_tokens, self.block_size) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Give a sequence without blocks enough blocks for all its current tokens."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already holds blocks")
        n = blocks_needed(seq.num_tokens, self.block_size)
        if n > len(self._free):
            raise RuntimeError(f"{seq!r} needs {n} blocks, {len(self._free)} free")
        seq.block_table = [self._free.popleft() for _ in range(n)]

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's newest token (fed at the next decode step) has a slot, or one block is free."""
        return len(seq.block_table) * self.block_size >= seq.num_tokens or len(self._free) >= 1

    def append(self, seq: Sequence) -> None:
        """Make room for the newest token: take one more block when it starts a new one."""
        if len(seq.block_table) * self.block_size < seq.num_tokens:
            if not self._free:
                raise RuntimeError(f"no free block for {seq!r}")
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        """Return all blocks of the sequence (finished, aborted or preempted) to the free list."""
        self._free.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0
