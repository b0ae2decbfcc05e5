"""Scheduler: continuous batching, chunked prefill under a token budget, prefix-cache admission and preemption,
with a fake model step (no tensors)."""
import pytest

from trinfer.runtime.block_manager import BlockManager
from trinfer.runtime.sampling_params import SamplingParams
from trinfer.runtime.scheduler import Scheduler
from trinfer.runtime.sequence import Sequence, SequenceStatus


def make(num_blocks=16, block_size=4, max_num_seqs=8, max_tokens=1000, caching=False):
    return Scheduler(BlockManager(num_blocks, block_size, enable_prefix_caching=caching), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_tokens)


def seq(rid, n, tokens=None):
    return Sequence(rid, [1] * n if tokens is None else list(tokens), SamplingParams(max_new_tokens=100))


def fake_run(step, sched=None):
    """What the engine does after the model runs: each chunk's tokens are computed (and their full blocks
    published); a sequence whose run reached its last token gets one token (token id 5)."""
    for s, n in [(s, 1) for s in step.decode] + list(zip(step.prefill, step.prefill_tokens)):
        s.num_computed_tokens += n
        if sched is not None:
            sched.block_manager.publish(s)
        if s.num_computed_tokens == s.num_tokens:
            s.append_token(5, 0.0, 0.0)


def check_invariants(sched):
    """Each block's count is the number of running sequences holding it; free + held = all; a running sequence
    holds blocks for its computed tokens, a waiting one none; a cached block holds what its key says."""
    bm = sched.block_manager
    pool = bm.pool
    held = {}
    for s in sched.running:
        assert len(set(s.block_table)) == len(s.block_table), "a block twice in one table"
        for b in s.block_table:
            held[b] = held.get(b, 0) + 1
    assert all(pool.ref_count[b] == held.get(b, 0) for b in range(bm.num_blocks)), "reference counts wrong"
    assert len(held) + bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    assert set(pool.free) == {b for b in range(bm.num_blocks) if b not in held}
    for s in sched.running:
        assert len(s.block_table) * bm.block_size >= s.num_computed_tokens
        for j, b in enumerate(s.block_table[: s.num_published_blocks]):
            if pool.key[b] is not None:  # a shared block: the key of this sequence's own tokens
                assert pool.key[b] == s.block_hashes[j]
    for s in sched.waiting:
        assert s.block_table == [] and s.status is SequenceStatus.WAITING


def test_prefill_then_decode_continuous():
    sched = make()
    a, b = seq("a", 5), seq("b", 3)
    sched.add(a)
    step = sched.schedule()
    assert step.prefill == [a] and step.decode == []
    fake_run(step)
    sched.add(b)  # arrives while a decodes
    step = sched.schedule()
    assert step.decode == [a] and step.prefill == [b]
    fake_run(step)
    step = sched.schedule()
    assert step.decode == [a, b] and step.prefill == []
    check_invariants(sched)


def test_max_num_seqs_and_token_budget():
    sched = make(max_num_seqs=2, max_tokens=8)
    seqs = [seq(i, 5) for i in range(4)]
    for s in seqs:
        sched.add(s)
    step = sched.schedule()
    assert step.prefill == seqs[:2] and step.prefill_tokens == [5, 3]  # the second gets what is left: 3 tokens
    fake_run(step)
    assert seqs[0].num_output_tokens == 1 and seqs[1].num_output_tokens == 0  # a chunk short of the end: no token
    step = sched.schedule()
    assert step.decode == [seqs[0]] and step.prefill == [seqs[1]] and step.prefill_tokens == [2]
    fake_run(step)
    step = sched.schedule()
    assert step.decode == seqs[:2] and step.prefill == [] and len(sched.running) == 2  # max_num_seqs
    check_invariants(sched)


def test_long_prompt_is_chunked_while_streams_decode():
    """The step schedule of a scripted case, exactly: budget 8, two streams decoding, a 20-token prompt
    arrives: it is prefilled 6 tokens per step (8 minus the streams' 2 decode tokens) and both streams get a
    token at every step; the chunk reaching its last token yields its first token; then all three decode."""
    sched = make(num_blocks=32, block_size=4, max_tokens=8)
    a, b, c = seq("a", 3), seq("b", 2), seq("c", 20)
    sched.add(a)
    sched.add(b)
    fake_run(sched.schedule())  # a and b prefilled together (3 + 2 tokens)
    sched.add(c)
    schedule = []
    for _ in range(5):
        step = sched.schedule()
        schedule.append(([s.request_id for s in step.decode], [s.request_id for s in step.prefill],
                         step.prefill_tokens, step.num_tokens))
        fake_run(step)
        check_invariants(sched)
    assert schedule == [
        (["a", "b"], ["c"], [6], 8),
        (["a", "b"], ["c"], [6], 8),
        (["a", "b"], ["c"], [6], 8),
        (["a", "b"], ["c"], [2], 4),   # c's last 2 tokens: its first output token
        (["a", "b", "c"], [], [], 3),
    ]
    assert (a.num_output_tokens, b.num_output_tokens, c.num_output_tokens) == (6, 6, 2)
    # a prompt longer than the budget with nobody else: chunk after chunk
    big = make(max_tokens=4)
    s = seq("big", 10)
    big.add(s)
    chunks = []
    while s.num_output_tokens == 0:
        step = big.schedule()
        chunks.append(step.prefill_tokens)
        fake_run(step)
    assert chunks == [[4], [4], [2]]


def test_order_decode_then_continuing_chunks_then_new_prompts():
    sched = make(num_blocks=64, block_size=4, max_tokens=10)
    old, mid, new = seq("old", 2), seq("mid", 30), seq("new", 5)
    sched.add(old)
    fake_run(sched.schedule())
    sched.add(mid)
    fake_run(sched.schedule())  # old decodes; mid gets 9 tokens
    sched.add(new)
    step = sched.schedule()
    assert step.decode == [old] and step.prefill == [mid] and step.prefill_tokens == [9]  # new waits: no budget
    fake_run(step)
    step = sched.schedule()
    assert step.decode == [old] and step.prefill == [mid] and step.prefill_tokens == [9]
    fake_run(step)
    step = sched.schedule()
    assert step.decode == [old] and step.prefill == [mid, new] and step.prefill_tokens == [3, 5]
    check_invariants(sched)


def test_fcfs_admission_stops_at_first_misfit():
    sched = make(num_blocks=4, block_size=4)
    a, b, c = seq("a", 12), seq("b", 8), seq("c", 2)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()
    assert step.prefill == [a]  # b does not fit; c must not overtake it
    assert list(sched.waiting) == [b, c]


def test_preempts_newest_and_readmits_first():
    sched = make(num_blocks=4, block_size=4)
    a, b = seq("a", 7), seq("b", 8)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert step.prefill == [a, b] and sched.block_manager.num_free_blocks == 0
    fake_run(step)  # a: 8 tokens (fits 2 blocks); b: 9 tokens -> needs a third block
    step = sched.schedule()
    assert step.preempted == [b] and step.decode == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.num_tokens == 9 and b.num_preemptions == 1 and sched.num_preemptions == 1
    check_invariants(sched)
    fake_run(step)
    c = seq("c", 1)
    sched.add(c)  # arrived later: b (preempted) is readmitted first
    while b.status is SequenceStatus.WAITING:
        step = sched.schedule()
        if c in step.prefill:  # c never goes before b
            assert b in step.prefill and step.prefill.index(b) < step.prefill.index(c)
        fake_run(step)
        if a.num_tokens > 9:
            sched.finish(a)
        check_invariants(sched)
    check_invariants(sched)


def test_three_running_the_oldest_needs_a_block_the_newest_is_preempted():
    """a, b, c running (admitted in that order), no free block, a needs one: c (the newest) is preempted, not b
    and not a; c waits at the front of the queue (before a later arrival) and is readmitted, recomputing its
    prompt + generated tokens, at the first step whose free blocks hold it."""
    sched = make(num_blocks=6, block_size=4)
    a, b, c = seq("a", 8), seq("b", 5), seq("c", 6)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()
    assert step.prefill == [a, b, c] and sched.block_manager.num_free_blocks == 0
    fake_run(step)  # a: 9 tokens in 2 blocks (needs a 3rd); b: 6 and c: 7 tokens fit their 2 blocks
    step = sched.schedule()
    assert step.preempted == [c] and step.decode == [a, b] and step.prefill == []
    assert [s.num_preemptions for s in (a, b, c)] == [0, 0, 1] and sched.num_preemptions == 1
    assert sched.running == [a, b] and list(sched.waiting) == [c] and c.block_table == []
    assert sched.block_manager.num_free_blocks == 1  # c's 2 blocks freed, 1 taken by a; c (7 tokens) needs 2
    check_invariants(sched)
    fake_run(step)
    d = seq("d", 1)
    sched.add(d)  # arrives after c's preemption: waits behind c (no overtaking, though d alone would fit)
    step = sched.schedule()
    assert step.decode == [a, b] and step.prefill == [] and step.preempted == []
    assert list(sched.waiting) == [c, d]
    fake_run(step)  # a: 11 tokens, b: 8 tokens (both still fit)
    sched.finish(b)  # 2 blocks back: 3 free
    step = sched.schedule()
    assert step.decode == [a] and step.prefill == [c, d] and step.preempted == []
    assert c.num_tokens == 7 and c.num_output_tokens == 1 and len(c.block_table) == 2  # recomputed with its output
    assert sched.running == [a, c, d] and not sched.waiting
    check_invariants(sched)


def test_preempts_the_newest_ones_in_turn_and_keeps_their_order():
    """Four running sequences of one full block each, none free, all need a block: a's need preempts d, b's
    preempts c; both wait in arrival order (c before d) and come back in that order as blocks free up."""
    sched = make(num_blocks=4, block_size=4)
    a, b, c, d = (seq(r, 4) for r in "abcd")
    for s in (a, b, c, d):
        sched.add(s)
    fake_run(sched.schedule())  # every sequence: 5 tokens in 1 block
    step = sched.schedule()
    assert step.preempted == [d, c] and step.decode == [a, b]
    assert list(sched.waiting) == [c, d] and sched.num_preemptions == 2
    check_invariants(sched)
    fake_run(step)
    sched.finish(a)  # 2 blocks free: c (5 tokens, 2 blocks) fits, d must wait for it
    step = sched.schedule()
    assert step.prefill == [c] and step.decode == [b] and list(sched.waiting) == [d]
    fake_run(step)
    sched.finish(b)
    step = sched.schedule()
    assert step.prefill == [d] and step.decode == [c]
    check_invariants(sched)


def test_preempts_itself_when_alone_blocks_are_short():
    sched = make(num_blocks=3, block_size=2)
    a, b = seq("a", 2), seq("b", 4)
    sched.add(a)
    sched.add(b)
    fake_run(sched.schedule())  # a: 3 tokens / 1 block, b: 5 tokens / 2 blocks, no free block
    step = sched.schedule()  # a needs a block: b (newest) is preempted, then b's turn never comes
    assert step.decode == [a] and step.preempted == [b]
    check_invariants(sched)


def test_finish_frees_at_once():
    sched = make(num_blocks=4)
    a = seq("a", 6)
    sched.add(a)
    fake_run(sched.schedule())
    sched.finish(a)
    assert a.status is SequenceStatus.FINISHED and sched.block_manager.num_free_blocks == 4
    assert not sched.has_unfinished()
    w = seq("w", 3)  # finishing a waiting sequence removes it from the queue
    sched.add(w)
    sched.finish(w)
    assert not sched.has_unfinished()


def test_chunked_prefill_is_preempted_and_resumes_from_its_cached_blocks():
    """Budget 3, 6 blocks of 4. A stream decodes while a 16-token prompt is prefilled 2 tokens per step. When
    the stream needs a block and none is free, the prompt (part-way through, the newest) is preempted: its
    blocks are released, the 3 full ones stay cached, and the stream's new block evicts the least recently
    used one (the chain's tail). Readmitted, the prompt resumes from the 2 blocks still cached."""
    sched = make(num_blocks=6, block_size=4, max_tokens=3, caching=True)
    a = seq("a", 6, range(100, 106))
    sched.add(a)
    fake_run(sched.schedule(), sched)
    fake_run(sched.schedule(), sched)  # a prefilled in two chunks of 3: 7 tokens, 2 blocks
    c = seq("c", 16, range(200, 216))
    sched.add(c)
    schedule = []
    for _ in range(7):
        step = sched.schedule()
        schedule.append(([s.request_id for s in step.decode], step.prefill_tokens,
                         [s.request_id for s in step.preempted], sched.block_manager.num_free_blocks))
        fake_run(step, sched)
        check_invariants(sched)
    assert schedule == [
        (["a"], [2], [], 3), (["a"], [2], [], 3), (["a"], [2], [], 1), (["a"], [2], [], 1), (["a"], [2], [], 0),
        (["a"], [2], [], 0),
        (["a"], [], ["c"], 2),  # a's 13th token needs a 4th block: c (12 of 16 computed, 3 blocks) preempted
    ]
    assert c.status is SequenceStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert len(a.block_table) == 4 and sched.block_manager.stats.evictions == 1
    assert sched.block_manager.pool.lookup(c.block_hashes) == [2, 4]  # c's first two blocks, still cached
    sched.finish(a)
    step = sched.schedule()  # c readmitted from its 2 cached blocks (8 tokens); the next chunk: 3 tokens
    assert step.prefill == [c] and step.prefill_tokens == [3] and c.num_computed_tokens == 8
    assert c.block_table[:2] == [2, 4]
    st = sched.block_manager.stats
    assert (st.readmissions, st.readmitted_tokens, st.readmitted_hit_tokens) == (1, 16, 8)
    assert c.prefix_hit_tokens == 0  # its first admission found nothing
    check_invariants(sched)


@pytest.mark.parametrize("caching", [False, True])
def test_random_workload_keeps_invariants(caching):
    import random

    rng = random.Random(0)
    sched = make(num_blocks=10, block_size=4, max_num_seqs=4, max_tokens=9, caching=caching)
    # Prompts drawn from three shared stems, so that with caching blocks are shared, published and evicted.
    stems = [[rng.randint(1, 50) for _ in range(12)] for _ in range(3)]
    pending = [seq(i, 0, stems[i % 3][: rng.randint(1, 12)] + [rng.randint(1, 50)] * rng.randint(0, 2))
               for i in range(30)]
    done = 0
    for _ in range(800):
        if pending and rng.random() < 0.3:
            sched.add(pending.pop())
        step = sched.schedule()
        assert step.num_tokens <= 9 or not step.prefill  # the budget (decode is never deferred)
        fake_run(step, sched)
        for s in list(sched.running):
            if s.num_output_tokens >= 12:
                sched.finish(s)
                done += 1
        check_invariants(sched)
        if not pending and not sched.has_unfinished():
            break
    assert done == 30 and sched.num_preemptions > 0
    st = sched.block_manager.stats
    assert (st.hit_tokens > 0 and st.evictions > 0) == caching


def test_bad_limits():
    with pytest.raises(ValueError, match="max_num_seqs"):
        make(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make(max_tokens=0)
