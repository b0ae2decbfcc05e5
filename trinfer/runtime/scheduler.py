"""Continuous batching with chunked prefill: a token budget per step, decode first, prefix-cache-aware admission.

A sequence is "how many of its tokens are computed" (`num_computed_tokens`, the tokens whose K/V is in the
cache): a step gives each scheduled sequence a run of its next uncomputed tokens. A running sequence with exactly
one uncomputed token (its newest) decodes; one with more, or one just admitted, prefills a chunk. Each step
computes at most
`max_num_batched_tokens` tokens, decode tokens included (one each), handed out in this order:

1. Decode: every running sequence with one uncomputed token, oldest first, gets a slot for it. Decode is never
   deferred for the budget, so running streams advance at every step. With speculative decoding, a decoding
   sequence that asks for `num_spec_tokens` proposed tokens gets slots for them too, as far as the budget left
   after every decode token and the free blocks allow (the count is cut to what fits; a proposal never preempts
   anyone). That count is all the scheduler knows of speculation: this step has 1 + k query tokens for it.
2. Continuing prefills: running sequences with more (a long prompt part-way through, or a recompute after a
   preemption), oldest first, get the next chunk: as many of their tokens as the budget has left.
3. New prompts: waiting sequences in arrival order (a preempted one first) while the budget, `max_num_seqs` and
   the free blocks allow. Each starts from the longest chain of cached blocks matching its tokens (prefix
   caching: at most all but its last token) and gets a first chunk. Admission stops at the first sequence that
   does not fit, so nobody is overtaken (first come, first served).

When a sequence needs a block and none is free, the newest running sequence not yet scheduled in this step is
preempted (possibly the sequence itself; a prefill part-way through as well): its blocks are released (the
published ones stay cached) and it goes back to the front of the waiting queue, to be recomputed later. A
continuing prefill short of blocks first shrinks its chunk to the blocks it can get.

So a long prompt is prefilled a budget's worth per step while the running streams keep decoding. The model
runner runs a step's decode sequences as one decode pass (static buffers, CUDA graphs) and its chunks as one
prefill pass; a chunk that reaches its sequence's last token yields the next token. The general unit is
"k query tokens for that sequence this step" (`ScheduledStep.prefill_tokens`); decode is its k = 1 case.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager, blocks_needed
from .sequence import Sequence, SequenceStatus

# Tokens computed per step unless the engine is told otherwise, per device type (README, "Prefix caching and
# chunked prefill"). CPU: measured (bench/results/cpu/prefix_chunk.md): of 2048/512/128/64, 128 and 64 keep 4
# streams' max inter-token latency under 3x their median while an 8K prompt is prefilled (1.9x both; 512: 6.2x);
# 128 costs that prompt's TTFT alone less (1.17-1.20x against 64's 1.25-1.36x). CUDA: not measured yet; 512 from the FLOP count (a 512-token
# chunk of a 1B model ~2 ms on an H100-class GPU, ~3x its ~0.6 ms decode step); the GPU check's serving rows will
# tell.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 128, "cuda": 512}


@dataclass(slots=True)
class ScheduledStep:
    """What one step computes. prefill_tokens[i]: the tokens prefill[i] computes (its chunk, starting at its
    num_computed_tokens); each decode sequence computes its newest token and `num_spec_tokens` tokens proposed after
    it (speculative decoding: as many as were given a slot)."""

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[Sequence] = field(default_factory=list)
    prefill_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def num_tokens(self) -> int:
        return sum(1 + s.num_spec_tokens for s in self.decode) + sum(self.prefill_tokens)


def check_max_num_batched_tokens(value) -> int:
    """ValueError unless `value` is an int >= 1 (the per-step token budget)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_num_batched_tokens: expected an int >= 1 (tokens computed per step), got {value!r}")
    return value


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: expected an int >= 1, got {max_num_seqs!r}")
        check_max_num_batched_tokens(max_num_batched_tokens)
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def fits_alone(self, num_tokens: int) -> bool:
        """Whether a sequence that grows to `num_tokens` tokens fits in the whole cache on its own."""
        return blocks_needed(num_tokens, self.block_manager.block_size) <= self.block_manager.num_blocks

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        bm, bs = self.block_manager, self.block_manager.block_size
        budget = self.max_num_batched_tokens
        running = SequenceStatus.RUNNING

        # 1-2. Running sequences: the decoding ones, then the prefills part-way through; oldest first in each.
        decoding, prefilling = [], []
        for seq in self.running:
            (decoding if seq.num_uncomputed_tokens == 1 else prefilling).append(seq)
        scheduled: set[int] = set()
        spare = budget - len(decoding)  # what the decoding sequences' proposals may take, oldest first
        for seq in decoding + prefilling:
            if seq.status is not running:  # preempted earlier in this step
                continue
            left = seq.num_uncomputed_tokens
            if left == 1:  # decode: its newest token, and the tokens proposed after it (speculative decoding)
                n = 1 + min(seq.num_spec_tokens, max(spare, 0))
            else:
                n = min(left, budget)
                if n <= 0:  # no budget left for this chunk: it waits for the next step, keeping its blocks
                    continue
            while not bm.can_grow(seq, seq.num_computed_tokens + n):
                fit = (len(seq.block_table) + bm.num_free_blocks) * bs - seq.num_computed_tokens
                if n > 1 and fit >= 1:  # a chunk (or a proposal) takes what the free blocks hold
                    n = fit
                    break
                victim = self._newest_unscheduled(scheduled)
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not running:
                continue
            bm.grow(seq, seq.num_computed_tokens + n)
            scheduled.add(id(seq))
            budget -= n
            if left == 1:
                seq.num_spec_tokens = n - 1  # what did not fit is not proposed (or not verified)
                spare -= n - 1
                step.decode.append(seq)
            else:
                step.prefill.append(seq)
                step.prefill_tokens.append(n)

        # 3. Admit waiting sequences, in order, from their cached prefix, while they fit.
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            hits = bm.cached_prefix(seq)
            start = len(hits) * bs
            n = min(seq.num_tokens - start, budget)
            if not bm.can_allocate(seq, start + n, hits):
                break
            self.waiting.popleft()
            bm.allocate(seq, start + n, hits)
            seq.status = running
            self.running.append(seq)
            scheduled.add(id(seq))
            budget -= n
            step.prefill.append(seq)  # its first step is a prefill, even of one token (a 1-token prompt, or a hit
            step.prefill_tokens.append(n)  # on all but its last token)
        return step

    def _newest_unscheduled(self, scheduled: set[int]) -> Sequence:
        for seq in reversed(self.running):
            if id(seq) not in scheduled:
                return seq
        raise RuntimeError("scheduler: no running sequence left to preempt")  # the caller itself is unscheduled

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.num_spec_tokens, seq.spec_token_ids = 0, []  # it does not decode this step
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished (or aborted) sequence and release its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq)
        seq.num_spec_tokens, seq.spec_token_ids = 0, []
        seq.status = SequenceStatus.FINISHED
