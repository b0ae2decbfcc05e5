"""Speculative decoding's parts, worked by hand: the acceptance rule, n-gram proposals (the definition and the
incremental index against it), the `speculative=` option and its CLI flags, the scheduler's reserved query tokens
and the block manager's rollback."""
import random

import pytest
import torch

from trinfer.cli import main
from trinfer.runtime import Engine, SamplingParams
from trinfer.runtime.block_manager import BlockManager
from trinfer.runtime.scheduler import Scheduler
from trinfer.runtime.sequence import Sequence, SequenceStatus
from trinfer.runtime.spec import (NgramProposer, SpeculativeConfig, Speculator, SpecState, ngram_propose, num_accepted,
                                  parse_speculative)
from trinfer.runtime.spec.speculator import adaptive_length

# ---------------------------------------------------------------------------------------------------------
# Acceptance


@pytest.mark.parametrize("proposed, verdicts, expected", [
    ([5, 6, 7], [5, 6, 9, 1], 2),   # the third proposal differs from the target's argmax after 5, 6
    ([5, 6, 7], [4, 6, 7, 1], 0),   # rejected at once: only the target's own token (4) is emitted
    ([5, 6, 7], [5, 6, 7, 8], 3),   # all accepted, and the target's token after them
    ([5, 5, 5], [5, 5, 2, 5], 2),   # equal tokens: the first mismatch counts, not what follows
    ([], [3], 0),                   # no proposal: a plain decode row
])
def test_num_accepted_hand_worked(proposed, verdicts, expected):
    assert num_accepted(proposed, verdicts) == expected


def test_num_accepted_refuses_misaligned_verdicts():
    with pytest.raises(ValueError, match="verdicts: expected 3"):
        num_accepted([1, 2], [1, 2])


# ---------------------------------------------------------------------------------------------------------
# N-gram proposals


@pytest.mark.parametrize("tokens, k, max_n, min_n, expected", [
    ([1, 2, 3, 4, 1, 2, 3], 3, 3, 1, [4, 1, 2]),         # [1 2 3] occurred at 0: what followed it
    ([5, 6, 5, 6, 5], 4, 2, 1, [6, 5, 6, 5]),             # period 2: the copy runs on into its own proposal
    ([1, 2, 3, 4], 3, 3, 1, []),                          # 4 never occurred before
    ([7, 8, 9, 8], 3, 3, 2, []),                          # only a 1-gram matches, below min_ngram
    ([7, 8, 9, 8], 3, 3, 1, [9, 8, 9]),                   # ... which min_ngram 1 takes
    ([1, 2, 3, 5, 2, 4, 1, 2], 2, 2, 1, [3, 5]),          # the longest suffix wins over a more recent 1-gram
    ([1, 2, 3, 1, 2, 4, 1, 2], 2, 2, 1, [4, 1]),          # two occurrences of [1 2]: the most recent one
    ([3, 3, 3], 2, 4, 1, [3, 3]),                         # [3 3] overlaps the suffix itself: still earlier
    ([9], 2, 3, 1, []),                                   # one token: nothing before it
])
def test_ngram_propose_hand_worked(tokens, k, max_n, min_n, expected):
    assert ngram_propose(tokens, k, max_n, min_n) == expected


def _seq(tokens, rid=0):
    return Sequence(rid, list(tokens), SamplingParams(max_new_tokens=1000, ignore_eos=True))


@pytest.mark.parametrize("max_n, min_n", [(4, 1), (3, 2), (1, 1)])
def test_ngram_index_equals_the_definition_as_sequences_grow(max_n, min_n):
    """The proposer's incremental index gives `ngram_propose`'s answer at every length of growing sequences over
    small alphabets (many repeats), tokens added one or several at a time."""
    rng = random.Random(max_n * 10 + min_n)
    proposer = NgramProposer(max_n, min_n)
    for trial in range(6):
        seq = _seq([rng.randrange(4) for _ in range(3)], trial)
        seq.spec = SpecState()
        hits = 0
        while len(seq.token_ids) < 120:
            k = rng.randint(1, 6)
            got = proposer.propose([seq], [k])[0]
            assert got == ngram_propose(seq.token_ids, k, max_n, min_n), (seq.token_ids, k)
            hits += bool(got)
            seq.token_ids += [rng.randrange(4 + trial) for _ in range(rng.randint(1, 3))]
        assert hits > 10


# ---------------------------------------------------------------------------------------------------------
# The option and the flags


@pytest.mark.parametrize("value, error, message", [
    ("ngram", TypeError, "expected a dict"),
    ({"num_tokens": 4}, ValueError, "'method' is required"),
    ({"method": "beam"}, ValueError, "unknown method 'beam'; expected one of ngram, draft"),
    ({"method": "ngram", "num_tokens": 0}, ValueError, "num_tokens expected an int in 1..16, got 0"),
    ({"method": "ngram", "num_tokens": 17}, ValueError, "num_tokens expected an int in 1..16, got 17"),
    ({"method": "ngram", "num_tokens": True}, ValueError, "num_tokens expected an int"),
    ({"method": "ngram", "num_tokens": 2.0}, ValueError, "num_tokens expected an int"),
    ({"method": "ngram", "k": 4}, ValueError, "unknown key 'k'"),
    ({"method": "ngram", "min_ngram": 3, "max_ngram": 2}, ValueError, "min_ngram (3) must be <= max_ngram (2)"),
    ({"method": "ngram", "model": "x"}, ValueError, "method 'ngram' takes none"),
    ({"method": "draft"}, ValueError, "method 'draft' needs 'model'"),
    ({"method": "draft", "model": 3}, TypeError, "model expected a path"),
    ({"method": "ngram", "adaptive": "yes"}, TypeError, "adaptive expected a bool"),
])
def test_bad_speculative_options_are_refused(value, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_speculative(value)
    with pytest.raises(error, match="speculative"):  # before the model is looked for
        Engine("/no/such/model", speculative=value)


def test_good_options():
    c = parse_speculative({"method": "ngram", "num_tokens": 8})
    assert (c.method, c.num_tokens, c.max_ngram, c.min_ngram, c.adaptive) == ("ngram", 8, 4, 1, True)
    assert parse_speculative(None) is None and parse_speculative(c) is c
    assert parse_speculative({"method": "draft", "model": "/m"}).describe() == "draft k=4 (/m)"


def test_draft_with_tensor_parallelism_is_refused():
    with pytest.raises(ValueError, match="'draft' is not supported with tensor parallelism"):
        Engine("/no/such/model", speculative={"method": "draft", "model": "/d"}, tensor_parallel_size=2)


@pytest.mark.parametrize("argv, message", [
    (["--speculative-tokens", "3"], "--speculative-tokens: given without --speculative"),
    (["--draft-model", "/d"], "--draft-model: given without --speculative"),
    (["--speculative", "ngram", "--draft-model", "/d"], "--draft-model: only with --speculative draft"),
    (["--speculative", "draft"], "--speculative draft: needs --draft-model PATH"),
    (["--speculative", "ngram", "--speculative-tokens", "0"], "num_tokens expected an int in 1..16, got 0"),
])
def test_cli_flags_refused_in_one_line(argv, message, capsys):
    assert main(["generate", "hi", "--model", "/no/such/model"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("trinfer: error: ") and message in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# Scheduling and rollback


def _decoding(bm, rid, n_tokens, computed):
    """A running sequence of n_tokens whose first `computed` are in the cache (blocks for them taken)."""
    s = _seq(range(10 * rid, 10 * rid + n_tokens), rid)
    bm.allocate(s, computed)
    s.num_computed_tokens = computed
    s.status = SequenceStatus.RUNNING
    return s


def test_scheduler_gives_proposals_slots_within_blocks_and_budget():
    """Block size 4; A holds 8 tokens (7 computed: 2 blocks), B 5 (4 computed: 1 block), worked by hand.
    1. 6 blocks (3 free): A's newest token and 6 proposals reach position 13 (4 blocks, 2 more), B's and 2 reach
       position 6 (2 blocks, 1 more): both fit, using the whole pool.
    2. 4 blocks, B with 4 tokens (3 computed): 1 free. A can have (2 + 1) * 4 - 7 = 5 query tokens (4 proposals);
       then none is free and B's newest token already has its slot: B runs without a proposal. Nobody is
       preempted for a proposal.
    3. A budget of 4 tokens for 2 decoding sequences: 2 spare for proposals, handed out oldest first."""
    def scheduled(num_blocks, budget, *specs):
        """Decoding sequences (tokens, computed, proposals asked) on a fresh pool, scheduled once."""
        bm = BlockManager(num_blocks, 4)
        sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=budget)
        seqs = [_decoding(bm, i, n, c) for i, (n, c, _) in enumerate(specs)]
        for seq, (_, _, asked) in zip(seqs, specs):
            seq.num_spec_tokens = asked
        sched.running = list(seqs)
        return sched.schedule(), bm, sched, seqs

    # 1. A: positions 7..13 (7 tokens) -> 4 blocks; B: positions 4..6 -> 2 blocks. 6 blocks: exactly the pool.
    step, bm, _, (a, b) = scheduled(6, 64, (8, 7, 6), (5, 4, 2))
    assert step.decode == [a, b] and (a.num_spec_tokens, b.num_spec_tokens) == (6, 2) and step.num_tokens == 10
    assert len(a.block_table) == 4 and len(b.block_table) == 2 and bm.num_free_blocks == 0
    # 2. Blocks short: A takes the free one for 1 + 4 tokens; B's newest token has its slot, its proposal none.
    step, bm, sched, (a, b) = scheduled(4, 64, (8, 7, 6), (4, 3, 3))
    assert step.decode == [a, b] and (a.num_spec_tokens, b.num_spec_tokens) == (4, 0)
    assert sched.num_preemptions == 0 and bm.num_free_blocks == 0
    # 3. Budget 4 for 2 decoding sequences: 2 spare tokens, oldest first.
    step, _, _, (a, b) = scheduled(16, 4, (8, 7, 1), (5, 4, 5))
    assert (a.num_spec_tokens, b.num_spec_tokens) == (1, 1) and step.num_tokens == 4


def test_trim_returns_the_pool_to_its_state_before_the_step():
    """A verify pass's blocks beyond the accepted tokens go back to the front of the free queue in the order they
    were taken: the pool (free queue order, counts) is as it was, and the next takes get the same blocks."""
    bm = BlockManager(10, 4, enable_prefix_caching=True)
    s = _decoding(bm, 0, 6, 5)
    free_before = list(bm.pool.free)
    counts_before = list(bm.pool.ref_count)
    table_before = list(s.block_table)
    bm.grow(s, 5 + 1 + 8)  # the newest token and 8 proposals: positions 5..13 -> 4 blocks
    assert len(s.block_table) == 4
    s.num_computed_tokens = 7  # 1 proposal accepted: positions 5, 6 computed
    bm.trim(s, 7)
    assert s.block_table == table_before and list(bm.pool.free) == free_before
    assert list(bm.pool.ref_count) == counts_before
    with pytest.raises(RuntimeError, match="cannot trim"):
        bm.trim(s, 3)


# ---------------------------------------------------------------------------------------------------------
# Adaptation


@pytest.mark.parametrize("p, row_cost, cap, expected", [
    (0.6, 0.17, 4, 3),    # 0.6^3 = 0.216 >= 0.17 > 0.6^4 = 0.130
    (0.9, 0.17, 8, 8),    # 0.9^8 = 0.43: the cap
    (0.3, 0.17, 4, 1),    # 0.3^2 = 0.09 < 0.17: one token (the floor)
    (0.1, 0.17, 4, 1),    # below the row cost: still one (back-off, not the length, stops a failing sequence)
    (1.0, 0.17, 5, 5),
    (0.8, 0.05, 16, 13),  # 0.8^13 = 0.055, 0.8^14 = 0.044
])
def test_adaptive_length_hand_worked(p, row_cost, cap, expected):
    assert adaptive_length(p, row_cost, cap) == expected


class _Fixed:
    """A proposer that proposes `tokens` (cut to the limit) for every sequence."""
    name, writes_cache = "fixed", False

    def __init__(self, tokens):
        self.tokens = tokens

    def propose(self, seqs, limits):
        return [self.tokens[:k] for k in limits]


def test_speculator_adapts_length_and_backs_off():
    """Worked by hand with row cost 0.17 and a cap of 8 tokens: the estimate starts at 0.6 (3 tokens); 2 accepted
    of 3 move it to 0.6 -> 0.68 -> 0.744 -> 0.5952 (3 tokens); a rejection at the first token: 0.476 (2 tokens)
    and a pause of 1 step, then of 2 after the next one; an accept ends the pauses."""
    spec = Speculator(SpeculativeConfig("ngram", num_tokens=8), _Fixed(list(range(100, 120))), "cpu")
    s = _seq([1, 2, 3])
    spec.before_schedule([s], max_model_len=1000)
    assert s.spec_token_ids == [100, 101, 102] and s.num_spec_tokens == 3
    spec.verified(s, 3, 2)
    assert s.spec.p_accept == pytest.approx(0.5952) and s.spec.skip == 0
    spec.before_schedule([s], 1000)
    assert s.num_spec_tokens == 3
    spec.verified(s, 3, 0)
    assert s.spec.p_accept == pytest.approx(0.47616) and (s.spec.skip, s.spec.backoff) == (1, 1)
    spec.before_schedule([s], 1000)  # paused
    assert s.num_spec_tokens == 0 and s.spec.skip == 0 and spec.paused(s) is False
    spec.before_schedule([s], 1000)
    assert s.num_spec_tokens == 2
    spec.verified(s, 2, 0)
    assert (s.spec.skip, s.spec.backoff) == (2, 2)
    spec.before_schedule([s], 1000)
    spec.before_schedule([s], 1000)
    spec.before_schedule([s], 1000)
    assert s.num_spec_tokens == 1  # 0.381: one token
    spec.verified(s, 1, 1)
    assert s.spec.backoff == 0 and spec.stats.as_dict() == {
        "verify_steps": 4, "proposed": 9, "accepted": 3, "acceptance_rate": 3 / 9, "mean_accepted_length": 0.75}
    spec.before_schedule([s], 1000)
    assert s.num_spec_tokens == 2  # 0.505 after the accept
    # Never more than can be emitted: with a context of 5, the 3 tokens leave room for 1 proposal (and the
    # target's own token); with max_new_tokens 1, none.
    spec.before_schedule([s], max_model_len=5)
    assert s.num_spec_tokens == 1
    short = _seq([1, 2, 3], 1)
    short.params = SamplingParams(max_new_tokens=1)
    spec.before_schedule([short], 1000)
    assert short.num_spec_tokens == 0
    fixed = Speculator(SpeculativeConfig("ngram", num_tokens=5, adaptive=False), _Fixed(list(range(10))), "cpu")
    fixed.before_schedule([s], 1000)
    fixed.verified(s, 5, 0)
    fixed.before_schedule([s], 1000)
    assert s.num_spec_tokens == 5  # no back-off, no length adaptation


def test_serve_and_profile_take_the_speculative_flags():
    from trinfer.cli import _engine_kwargs, build_parser, speculative_option

    parser = build_parser()
    args = parser.parse_args(["serve", "--speculative", "ngram", "--speculative-tokens", "3"])
    assert _engine_kwargs(args)["speculative"] == {"method": "ngram", "num_tokens": 3}
    args = parser.parse_args(["profile", "--speculative", "draft", "--draft-model", "/d"])
    assert speculative_option(args) == {"method": "draft", "model": "/d"}
    assert _engine_kwargs(parser.parse_args(["generate", "x"]))["speculative"] is None


def test_verify_rows_in_the_decode_buffers():
    """A verify pass's rows, worked by hand (block size 4): A has 6 tokens (blocks [3, 7]) and proposes 2, B has 3
    (block [5]) and proposes none. Rows: A's newest token and its proposals at positions 5, 6, 7 (lengths 6, 7, 8;
    block 7 holds positions 4-7), then B's newest at position 2. Then A is rolled back to its first block and grows
    into block 9 at the same table index: the next fill must send block 9 (a mirror keyed on the table's length
    alone would keep block 7)."""
    from trinfer.runtime.attention_metadata import DecodeBuffers

    a, b = _seq([1, 2, 3, 4, 5, 6], 0), _seq([7, 8, 9], 1)
    a.block_table, b.block_table = [3, 7], [5]
    buf = DecodeBuffers(8, 4, torch.device("cpu"))
    ids, meta = buf.fill([a, b], 4, spec=[[40, 41], []])
    assert ids.tolist() == [6, 40, 41, 9]
    assert meta.positions.tolist() == [5, 6, 7, 2] and meta.seq_lens.tolist() == [6, 7, 8, 3]
    assert meta.slot_mapping.tolist() == [7 * 4 + 1, 7 * 4 + 2, 7 * 4 + 3, 5 * 4 + 2]
    assert [meta.block_tables[r, :2].tolist() for r in range(3)] == [[3, 7]] * 3 and meta.block_tables[3, 0] == 5
    assert meta.seq_starts == [0, 3, 4] and meta.max_seq_len == 8
    a.block_table = a.block_table[:1]  # as BlockManager.trim does it: a new list
    a.block_table.append(9)
    ids, meta = buf.fill([a, b], 4, spec=[[50], []])
    assert meta.positions.tolist() == [5, 6, 2] and meta.slot_mapping.tolist() == [9 * 4 + 1, 9 * 4 + 2, 5 * 4 + 2]
    assert [meta.block_tables[r, :2].tolist() for r in range(2)] == [[3, 9]] * 2 and meta.seq_starts == [0, 2, 3]
    with pytest.raises(ValueError, match="ids_on_device=False"):
        buf.fill([a, b], 4, spec=[[1], []], ids_on_device=True)
