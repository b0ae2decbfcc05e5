"""Scheduler: continuous batching and preemption, with a fake model step (no tensors)."""
import pytest

from trinfer.runtime.block_manager import BlockManager
from trinfer.runtime.sampling_params import SamplingParams
from trinfer.runtime.scheduler import Scheduler
from trinfer.runtime.sequence import Sequence, SequenceStatus


def make(num_blocks=16, block_size=4, max_num_seqs=8, max_tokens=1000):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_tokens)


def seq(rid, n):
    return Sequence(rid, [1] * n, SamplingParams(max_new_tokens=100))


def fake_run(step):
    """What the engine does after the model runs: every scheduled sequence gets one token."""
    for s in step.prefill + step.decode:
        s.num_cached_tokens = s.num_tokens
        s.append_token(5, 0.0, 0.0)


def check_invariants(sched):
    bm = sched.block_manager
    owned = [b for s in sched.running for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert len(owned) + bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    for s in sched.running:
        assert len(s.block_table) * bm.block_size >= s.num_tokens - 1
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
    assert step.prefill == [seqs[0]]  # 5 + 5 > 8 tokens: the second waits
    fake_run(step)
    step = sched.schedule()
    assert step.prefill == [seqs[1]] and step.decode == [seqs[0]]
    fake_run(step)
    step = sched.schedule()
    assert step.prefill == [] and len(sched.running) == 2  # max_num_seqs
    # a prompt longer than the token budget still runs, alone
    big = make(max_tokens=4)
    s = seq("big", 10)
    big.add(s)
    assert big.schedule().prefill == [s]


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
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_cached_tokens == 0
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


def test_random_workload_keeps_invariants():
    import random

    rng = random.Random(0)
    sched = make(num_blocks=10, block_size=4, max_num_seqs=4, max_tokens=32)
    pending = [seq(i, rng.randint(1, 14)) for i in range(30)]
    done = 0
    for _ in range(500):
        if pending and rng.random() < 0.3:
            sched.add(pending.pop())
        step = sched.schedule()
        fake_run(step)
        for s in list(sched.running):
            if s.num_output_tokens >= 12:
                sched.finish(s)
                done += 1
        check_invariants(sched)
        if not pending and not sched.has_unfinished():
            break
    assert done == 30 and sched.num_preemptions > 0


def test_bad_limits():
    with pytest.raises(ValueError, match="max_num_seqs"):
        make(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make(max_tokens=0)
