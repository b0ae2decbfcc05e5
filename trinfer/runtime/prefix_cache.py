"""Automatic prefix caching: content-addressed KV blocks, shared by reference count, evicted least recently used.

Keys. A full block (block_size tokens) is named by a key that chains its whole prefix:

    key_0 = H(root || tokens of block 0),   key_j = H(key_{j-1} || tokens of block j),   root = H(identity)

with H = BLAKE2b-256 and token ids as little-endian int64. The identity names everything else that changes the
K/V a block holds (the model, its dtype, the block size; later a LoRA or a draft model): two blocks have the same
key exactly when the same model computed them from the same tokens at the same positions. A partial block has
no key and is never shared.

`BlockPool` owns the KV cache's block ids. Each block has a reference count (how many sequences' block tables
hold it) and at most one key (set when its contents are published, cleared when it is evicted). Blocks whose
count is 0 sit in the free queue, which is also the LRU list of evictable cached blocks:

    front ->  [ free blocks without a key ... | cached blocks, least recently released first ... ]  <- back

`take` hands out blocks from the front, so a cached block is evicted (its key forgotten) only once no block
without a key is left. A hit on a cached block with count 0 takes it out of the queue. Releasing a block with a
key appends it at the back; a sequence releases its blocks last first, so a chain's tail is evicted before its
head (a tail without its head could never be hit again).

The rules that keep cached contents right (enforced by `block_manager.BlockManager`): a block is published only
after its K/V is written and only from token ids known on the host (never from a token still on the device, nor
from unverified speculative tokens), and a sequence never writes into a block it shares: a hit covers at most
all but the last token of a sequence, which is then computed into a block of its own.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass


def root_key(identity: str) -> bytes:
    """The parent key of every sequence's first block, for one cache identity (model, dtype, block size, ...)."""
    return hashlib.blake2b(identity.encode(), digest_size=32).digest()


def block_key(parent: bytes, token_ids) -> bytes:
    """The key of a full block: BLAKE2b-256 of the parent block's key and this block's token ids (int64)."""
    h = hashlib.blake2b(parent, digest_size=32)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockPool:
    """Reference-counted KV blocks with a key -> block map of published contents and an LRU free queue."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks  # the published contents of each block, if any
        self.cached: dict[bytes, int] = {}                   # key -> the block holding it
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks with no reference: never used, released, or cached and evictable."""
        return len(self.free)

    def lookup(self, keys) -> list[int]:
        """The blocks holding the longest prefix of `keys` (a chain, first block first); no count changes."""
        blocks = []
        for key in keys:
            b = self.cached.get(key)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def num_free_among(self, blocks) -> int:
        """How many of `blocks` have count 0 (a hit on them takes them out of the free queue)."""
        return sum(1 for b in blocks if self.ref_count[b] == 0)

    def acquire(self, blocks) -> None:
        """One more reference to each of `blocks` (cached blocks found by `lookup`)."""
        for b in blocks:
            if self.ref_count[b] == 0:
                del self.free[b]
            self.ref_count[b] += 1

    def take(self, n: int) -> list[int]:
        """n blocks from the front of the free queue, count 1 each; a cached one is evicted (its key dropped)."""
        if n > len(self.free):
            raise RuntimeError(f"block pool: {n} blocks requested, {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            key = self.key[b]
            if key is not None:
                self.key[b] = None
                del self.cached[key]
                self.num_evictions += 1
            self.ref_count[b] = 1
            out.append(b)
        return out

    def release(self, blocks) -> None:
        """Drop one reference to each of `blocks`, last first; a block left with none joins the free queue (at
        the back if it holds published contents, still to be hit; at the front otherwise)."""
        for b in reversed(blocks):
            c = self.ref_count[b] - 1
            if c < 0:
                raise RuntimeError(f"block pool: block {b} released more often than taken")
            self.ref_count[b] = c
            if c == 0:
                self.free[b] = None
                if self.key[b] is None:
                    self.free.move_to_end(b, last=False)

    def publish(self, block: int, key: bytes) -> bool:
        """Record that `block` (referenced, its K/V written) holds the contents named `key`. False when another
        block already holds them (the first one stays the cached copy; this one stays private)."""
        if self.ref_count[block] < 1 or self.key[block] is not None:
            raise RuntimeError(f"block pool: block {block} cannot be published (count {self.ref_count[block]}, "
                               f"key {'set' if self.key[block] is not None else 'unset'})")
        if key in self.cached:
            return False
        self.key[block] = key
        self.cached[key] = block
        return True


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache hits of an engine, counted when requests are admitted.

    requests / prompt_tokens / hit_tokens: first admissions only: how many requests, their prompt tokens, and
        how many of those came from the cache (a hit is whole blocks, at most all but a prompt's last token).
    readmissions / readmitted_tokens / readmitted_hit_tokens: the same for sequences readmitted after a
        preemption (prompt + generated tokens to recompute, and how many of them the cache still held).
    evictions: cached blocks whose contents were dropped to make room.
    """

    requests: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    readmissions: int = 0
    readmitted_tokens: int = 0
    readmitted_hit_tokens: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of the admitted prompt tokens served from the cache (0.0 before any request)."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens, "hit_tokens": self.hit_tokens,
                "hit_rate": self.hit_rate, "readmissions": self.readmissions,
                "readmitted_tokens": self.readmitted_tokens, "readmitted_hit_tokens": self.readmitted_hit_tokens,
                "evictions": self.evictions}

    def summary(self) -> str:
        """One line, e.g. for the CLI's timings."""
        return (f"prefix cache {self.hit_tokens}/{self.prompt_tokens} prompt tokens reused "
                f"({100 * self.hit_rate:.1f}%)")
