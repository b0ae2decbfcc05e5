"""Continuous batching: every step decodes all running sequences and admits waiting ones for prefill.

Policy, in order, at each step:
1. Decode: every running sequence (oldest first) gets a slot for its newest token. When no block is
   free, the newest running sequence is preempted: its blocks are freed and it goes back to the front of
   the waiting queue, to be recomputed later by a prefill of its prompt + generated tokens.
2. Prefill: waiting sequences are admitted in arrival order while there is room (sequence count, tokens
   per prefill batch, free blocks). Admission stops at the first one that does not fit, so nobody is
   overtaken (first come, first served), and a preempted sequence is readmitted first.
A step may hold a prefill batch and a decode batch; the model runner runs them as separate passes.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager, blocks_needed
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledStep:
    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: expected an int >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: expected an int >= 1, got {max_num_batched_tokens}")
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
        bm = self.block_manager

        # 1. Decode every running sequence, preempting the newest ones while blocks are short.
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while not bm.can_append(seq):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.append(seq)
                step.decode.append(seq)

        # 2. Admit waiting sequences for prefill, in order, while they fit.
        num_tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if step.prefill and num_tokens + seq.num_tokens > self.max_num_batched_tokens:
                break
            if not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.prefill.append(seq)
            num_tokens += seq.num_tokens
        return step

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished (or aborted) sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
