"""Prefix cache bookkeeping, plain Python: block keys, the block pool (reference counts, LRU free queue, eviction)
and the block manager's hits and publishing, in scripted scenarios whose counts and pool contents are worked out
by hand."""
import hashlib
from array import array

import pytest

from trinfer.runtime.block_manager import BlockManager
from trinfer.runtime.prefix_cache import BlockPool, block_key, root_key
from trinfer.runtime.sampling_params import SamplingParams
from trinfer.runtime.sequence import Sequence


def seq(tokens, rid=0):
    return Sequence(rid, list(tokens), SamplingParams(max_new_tokens=8))


def test_block_key_chains_parent_and_tokens():
    root = root_key("model-a")
    assert root == hashlib.blake2b(b"model-a", digest_size=32).digest()
    k0 = block_key(root, [1, 2, 3, 4])
    assert k0 == hashlib.blake2b(root + array("q", [1, 2, 3, 4]).tobytes(), digest_size=32).digest()
    assert block_key(root, [1, 2, 3, 4]) == k0                      # a function of its inputs
    assert block_key(root, [1, 2, 3, 5]) != k0                      # any token
    assert block_key(root, [4, 3, 2, 1]) != k0                      # their order
    assert block_key(root_key("model-b"), [1, 2, 3, 4]) != k0       # the identity (model, dtype, ...)
    assert block_key(k0, [5, 6, 7, 8]) != block_key(block_key(root, [9, 9, 9, 9]), [5, 6, 7, 8])  # the prefix
    assert block_key(root, [2**40, 1]) != block_key(root, [0, 1])   # ids wider than 32 bits


def test_block_pool_counts_lru_and_eviction():
    pool = BlockPool(5)
    assert list(pool.free) == [0, 1, 2, 3, 4] and pool.num_free == 5
    a = pool.take(3)
    assert a == [0, 1, 2] and pool.ref_count == [1, 1, 1, 0, 0]
    assert pool.publish(0, b"k0") and pool.publish(1, b"k1")
    assert not pool.publish(2, b"k1")                      # another block holds these contents: stays private
    with pytest.raises(RuntimeError, match="cannot be published"):
        pool.publish(0, b"k9")                             # already holds contents
    with pytest.raises(RuntimeError, match="cannot be published"):
        pool.publish(4, b"k4")                             # nobody holds it
    assert pool.lookup([b"k0", b"k1", b"k2"]) == [0, 1] and pool.lookup([b"k1"]) == [1]
    pool.acquire([0, 1])                                   # a second sequence shares the chain
    assert pool.ref_count == [2, 2, 1, 0, 0]
    pool.release(a)                                        # first owner done: block 2 (no key) goes to the front
    assert pool.ref_count == [1, 1, 0, 0, 0] and list(pool.free) == [2, 3, 4]
    pool.release([0, 1])                                   # cached: to the back, the chain's tail first
    assert list(pool.free) == [2, 3, 4, 1, 0] and pool.num_free == 5
    assert pool.lookup([b"k0", b"k1"]) == [0, 1]           # still cached while free
    pool.acquire([0])                                      # a hit on a free cached block leaves the queue
    assert list(pool.free) == [2, 3, 4, 1] and pool.ref_count[0] == 1
    pool.release([0])
    assert list(pool.free) == [2, 3, 4, 1, 0]              # most recently used at the back
    assert pool.take(3) == [2, 3, 4] and pool.num_evictions == 0  # blocks without a key go first
    assert pool.take(1) == [1] and pool.num_evictions == 1        # then the least recently used cached one
    assert pool.lookup([b"k0", b"k1"]) == [0] and b"k1" not in pool.cached and pool.key[1] is None
    with pytest.raises(RuntimeError, match="2 blocks requested, 1 free"):
        pool.take(2)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([0])


def test_block_manager_hits_publishing_and_stats():
    """Block size 4, 8 blocks. A: 10 tokens. B shares A's first 8 tokens. C is A's first 8 tokens exactly (a
    hit ending at a block edge: only the first block is reused, the last token must be computed). D is A's
    first 9 tokens (one token past the edge: both blocks reused, one token left, which decodes)."""
    bm = BlockManager(8, 4, enable_prefix_caching=True, cache_identity="m")
    pool = bm.pool
    toks = list(range(100, 110))
    a = seq(toks, "a")
    assert bm.cached_prefix(a) == []
    bm.allocate(a)
    assert a.block_table == [0, 1, 2] and a.num_computed_tokens == 0 and a.prefix_hit_tokens == 0
    a.num_computed_tokens = 6  # a chunk of 6 tokens ran: block 0 is full
    bm.publish(a)
    assert a.num_published_blocks == 1 and pool.cached == {a.block_hashes[0]: 0}
    a.num_computed_tokens = 10
    bm.publish(a)  # block 1 full now; block 2 (2 tokens) is partial: never published
    k0, k1 = a.block_hashes
    assert a.block_hashes == [block_key(root_key("m|block_size=4"), toks[:4]), block_key(k0, toks[4:8])]
    assert pool.cached == {k0: 0, k1: 1} and pool.key[2] is None

    b = seq(toks[:8] + [7, 7, 7], "b")
    hits = bm.cached_prefix(b)
    assert hits == [0, 1]
    assert bm.can_allocate(b, 11, hits)
    bm.allocate(b, 11, hits)
    assert b.block_table == [0, 1, 3] and b.num_computed_tokens == 8 and b.prefix_hit_tokens == 8
    assert pool.ref_count[:4] == [2, 2, 1, 1] and b.num_published_blocks == 2

    c = seq(toks[:8], "c")
    assert bm.cached_prefix(c) == [0]  # (8 - 1) // 4 = 1 block: token 7 is computed into a block of c's own
    bm.allocate(c, None, bm.cached_prefix(c))
    assert c.block_table == [0, 4] and c.num_computed_tokens == 4 and c.num_uncomputed_tokens == 4
    c.num_computed_tokens = 8
    bm.publish(c)  # its block 4 holds what block 1 holds: the first copy stays the cached one
    assert pool.cached[k1] == 1 and pool.key[4] is None and c.num_published_blocks == 2

    d = seq(toks[:9], "d")
    assert bm.cached_prefix(d) == [0, 1]
    bm.allocate(d, None, [0, 1])
    assert d.block_table == [0, 1, 5] and d.num_uncomputed_tokens == 1
    assert pool.ref_count[:6] == [4, 3, 1, 1, 1, 1] and bm.num_free_blocks == 2

    st = bm.stats
    assert (st.requests, st.prompt_tokens, st.hit_tokens) == (4, 10 + 11 + 8 + 9, 0 + 8 + 4 + 8)
    assert st.hit_rate == pytest.approx(20 / 38)

    for s in (a, b, c, d):
        bm.free(s)
    assert pool.ref_count == [0] * 8 and bm.num_free_blocks == 8
    # Each sequence releases its blocks last first: one left without references and without a key goes to the
    # front (a: 2, b: 3, c: 4, d: 5, each before the previous), a cached one to the back (d releases 1, then 0:
    # the chain's tail is evicted before its head). 6 and 7 were never used.
    assert list(pool.free) == [5, 4, 3, 2, 6, 7, 1, 0]
    assert a.block_table == [] and a.num_computed_tokens == 0 and a.num_published_blocks == 0

    # Readmission after a preemption: the chain is still cached; counted apart from first admissions.
    bm.allocate(a, None, bm.cached_prefix(a))
    assert a.block_table == [0, 1, 5] and a.num_computed_tokens == 8 and list(pool.free) == [4, 3, 2, 6, 7]
    assert (bm.stats.readmissions, bm.stats.readmitted_tokens, bm.stats.readmitted_hit_tokens) == (1, 10, 8)
    assert bm.stats.requests == 4


def test_block_manager_without_caching_shares_nothing():
    bm = BlockManager(6, 4)
    a = seq(range(10), "a")
    bm.allocate(a)
    a.num_computed_tokens = 10
    bm.publish(a)
    b = seq(range(10), "b")
    assert bm.cached_prefix(b) == [] and not bm.pool.cached
    bm.allocate(b)
    assert not set(a.block_table) & set(b.block_table)
    assert bm.stats.hit_tokens == 0 and bm.stats.prompt_tokens == 20


def test_publish_only_host_known_tokens():
    """A token the device is still producing (num_pending) is counted as computed once fed, but it is not in
    token_ids: the block it completes is published only when its id reaches the host."""
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    s = seq([1, 2, 3], "s")
    bm.allocate(s)
    s.num_computed_tokens = 3
    s.append_token(9, 0.0, 0.0)      # 4 tokens on the host; the 4th is fed at the next decode step
    s.num_computed_tokens = 4        # ... fed: its K/V written; block 0 full of host tokens
    s.num_pending = 1                # and the step's own token (position 4) is still on the device
    bm.publish(s)
    assert s.num_published_blocks == 1
    bm.grow(s, 8)
    s.num_computed_tokens = 8        # as if 4 more were computed, 3 of them pending on the device:
    s.num_pending = 4                # only the host's 4 tokens may be in keys
    bm.publish(s)
    assert s.num_published_blocks == 1 and len(bm.pool.cached) == 1


def test_allocation_errors():
    bm = BlockManager(3, 4, enable_prefix_caching=True)
    a = seq(range(9), "a")
    with pytest.raises(RuntimeError, match="must leave a token"):
        bm.allocate(a, 8, [0, 1])  # a hit must leave a token to compute
    bm.allocate(a)
    with pytest.raises(RuntimeError, match="already holds"):
        bm.allocate(a)
    with pytest.raises(RuntimeError, match="needs 1 new blocks, 0 free"):
        bm.allocate(seq([1], "b"))
    with pytest.raises(TypeError, match="enable_prefix_caching"):
        BlockManager(3, 4, enable_prefix_caching="yes")
