"""Paged KV-cache bookkeeping: which fixed-size blocks of the cache each sequence holds, and which it shares.

Token t of a sequence lives in block `block_table[t // block_size]` at offset `t % block_size`, i.e. at slot
`block_table[t // block_size] * block_size + t % block_size` of every layer's cache. Blocks come from a
`prefix_cache.BlockPool` (reference counts, free queue) and go back to it the moment a sequence finishes, is
aborted or is preempted.

With prefix caching (`enable_prefix_caching=True`), a sequence's full blocks are published under their chained
keys once their K/V is written (`publish`), and a sequence being admitted starts from the longest chain of
cached blocks matching its tokens (`cached_prefix`, then `allocate(..., hits)`): those blocks are shared (one
more reference each) and their tokens are not computed again. A hit covers at most all but the sequence's last
token, so the sequence computes at least that token (it needs its logits), into a block of its own: a sequence
never writes into a block it shares. A released block keeps its contents until the pool needs it (LRU).
Without prefix caching nothing is published or looked up, and every block belongs to one sequence.
"""
from __future__ import annotations

from .prefix_cache import BlockPool, PrefixCacheStats, block_key, root_key
from .sequence import Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def check_enable_prefix_caching(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"enable_prefix_caching: expected a bool, got {type(value).__name__} {value!r}")
    return value


class BlockManager:
    """Args: num_blocks, block_size; enable_prefix_caching; cache_identity: what besides the tokens determines a
    block's K/V (model, dtype, ...), folded into the root of every key."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False,
                 cache_identity: str = ""):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks: expected an int >= 1, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected an int >= 1, got {block_size!r}")
        check_enable_prefix_caching(enable_prefix_caching)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._root = root_key(f"{cache_identity}|block_size={block_size}")
        self._stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached evictable ones included)."""
        return self.pool.num_free

    @property
    def stats(self) -> PrefixCacheStats:
        self._stats.evictions = self.pool.num_evictions
        return self._stats

    # ------------------------------------------------------------------ prefix cache
    def _keys(self, seq: Sequence, n_full: int) -> list[bytes]:
        """The keys of the sequence's first n_full full blocks (host token ids), computed once and kept."""
        keys, bs = seq.block_hashes, self.block_size
        for j in range(len(keys), n_full):
            keys.append(block_key(keys[j - 1] if j else self._root, seq.token_ids[j * bs: (j + 1) * bs]))
        return keys

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the longest cached chain matching the sequence's tokens, at most all but its last token
        (so at most `(num_tokens - 1) // block_size` blocks); [] without prefix caching. Changes no count."""
        if not self.enable_prefix_caching:
            return []
        n_full = (len(seq.token_ids) - 1) // self.block_size
        if n_full <= 0:
            return []
        return self.pool.lookup(self._keys(seq, n_full))

    def publish(self, seq: Sequence, limit: int | None = None) -> None:
        """Publish the sequence's full blocks whose K/V is written (`num_computed_tokens`) and whose tokens the
        host knows (`token_ids`: a token still on the device, or a proposed one not yet verified, is never part
        of a key), and, when `limit` is given, that lie below it (a draft model's own cache, mirrored on the same
        blocks, holds valid K/V only up to there). A block whose contents another block already holds stays
        private."""
        if not self.enable_prefix_caching:
            return
        n = min(seq.num_computed_tokens, len(seq.token_ids))
        n_full = (n if limit is None else min(n, limit)) // self.block_size
        start = seq.num_published_blocks
        if n_full <= start:
            return
        keys = self._keys(seq, n_full)
        table, pool = seq.block_table, self.pool
        for j in range(start, n_full):
            pool.publish(table[j], keys[j])
        seq.num_published_blocks = n_full

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, seq: Sequence, num_tokens: int | None = None, hits: list[int] = ()) -> bool:
        """Whether a sequence holding no blocks can get blocks for its first `num_tokens` tokens (default: all
        its tokens) now, starting from the cached blocks `hits` (`cached_prefix`)."""
        n = seq.num_tokens if num_tokens is None else num_tokens
        new = blocks_needed(n, self.block_size) - len(hits)
        return new <= self.pool.num_free - self.pool.num_free_among(hits)

    def allocate(self, seq: Sequence, num_tokens: int | None = None, hits: list[int] = ()) -> None:
        """Give a sequence holding no blocks the cached blocks `hits` (shared: their tokens count as computed)
        then new blocks up to its first `num_tokens` tokens (default: all its tokens). Records the hit in the
        stats (a first admission, or a readmission after preemption)."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already holds blocks")
        n = seq.num_tokens if num_tokens is None else num_tokens
        hit_tokens = len(hits) * self.block_size
        if hit_tokens >= max(n, 1) or hit_tokens >= seq.num_tokens:
            raise RuntimeError(f"{seq!r}: a hit of {hit_tokens} tokens must leave a token to compute of {n}")
        if not self.can_allocate(seq, n, hits):
            raise RuntimeError(f"{seq!r} needs {blocks_needed(n, self.block_size) - len(hits)} new blocks, "
                               f"{self.pool.num_free - self.pool.num_free_among(hits)} free")
        self.pool.acquire(hits)
        seq.block_table = list(hits) + self.pool.take(blocks_needed(n, self.block_size) - len(hits))
        seq.num_computed_tokens = hit_tokens
        seq.num_published_blocks = len(hits)
        st = self._stats
        if seq.prefix_hit_tokens is None:
            seq.prefix_hit_tokens = hit_tokens
            st.requests += 1
            st.prompt_tokens += seq.num_tokens
            st.hit_tokens += hit_tokens
        else:
            st.readmissions += 1
            st.readmitted_tokens += seq.num_tokens
            st.readmitted_hit_tokens += hit_tokens

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the sequence's blocks can be extended to hold `num_tokens` tokens now."""
        return blocks_needed(num_tokens, self.block_size) - len(seq.block_table) <= self.pool.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend the sequence's blocks (new ones, never shared) to hold its first `num_tokens` tokens."""
        more = blocks_needed(num_tokens, self.block_size) - len(seq.block_table)
        if more > 0:
            if more > self.pool.num_free:
                raise RuntimeError(f"no free block for {seq!r}")
            seq.block_table.extend(self.pool.take(more))

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release the sequence's blocks past the first `num_tokens` tokens' (after a verify pass: the slots of
        rejected proposals). They were taken by `grow` for this step, never shared nor published; they return to
        the front of the free queue in the order they were taken, so the pool is as if they had never been. The
        sequence gets a new block-table list (a mirror that tracks the list object, such as `DecodeBuffers`, then
        rewrites its row instead of missing a block replaced at the same index)."""
        keep = blocks_needed(num_tokens, self.block_size)
        table = seq.block_table
        if len(table) > keep:
            if keep < seq.num_published_blocks or num_tokens < seq.num_computed_tokens:
                raise RuntimeError(f"{seq!r}: cannot trim to {num_tokens} tokens below its computed or published ones")
            seq.block_table = table[:keep]  # a new list: whoever mirrors the old one (DecodeBuffers) sees a change
            self.pool.release(table[keep:])

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's newest token (fed at the next decode step) has a slot, or one block is free."""
        return len(seq.block_table) * self.block_size >= seq.num_tokens or self.pool.num_free >= 1

    def append(self, seq: Sequence) -> None:
        """Make room for the newest token: take one more block when it starts a new one."""
        self.grow(seq, seq.num_tokens)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (finished, aborted or preempted); published ones stay cached until
        evicted. Its computed tokens drop to 0 (a preempted sequence is recomputed, from the cache if it can)."""
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_published_blocks = 0
