"""The engine's side of speculative decoding: who proposes how much each step, and what the verdicts mean."""
from __future__ import annotations

import math

from ..sequence import Sequence
from .config import DEFAULT_ROW_COST, SpeculativeConfig
from .stats import SpecDecodeStats, SpecState

MAX_BACKOFF = 16  # most steps a sequence pauses proposing after a rejected proposal (adaptive)
EMA_WEIGHT = 0.2  # weight of each verified token in a sequence's acceptance estimate (adaptive)


def adaptive_length(p_accept: float, row_cost: float, num_tokens: int) -> int:
    """Tokens to propose: the largest k <= num_tokens with p_accept**k >= row_cost (the k-th token is accepted
    with chance p^k, if each is with chance p given the ones before: it earns its row while that chance covers what
    the row costs, in tokens of a decode step), and at least 1 (a sequence whose proposals fail backs off instead).
    """
    if p_accept <= row_cost:
        return 1
    if p_accept >= 1.0:
        return num_tokens
    return max(1, min(num_tokens, int(math.log(row_cost) / math.log(p_accept))))


class Speculator:
    """One proposer (n-gram or draft model) behind `propose(seqs, limits) -> token ids per sequence`, plus the
    per-sequence adaptation (SpeculativeConfig.adaptive) and the statistics.

    Each step, before scheduling, every decoding sequence asks for `num_spec_tokens` proposed tokens: at most
    `num_tokens`, and never more than could be emitted (max_new_tokens, the context: a verify pass's rows then
    never pass the last position plain decoding would feed), none while it backs off. The scheduler cuts the
    counts to the slots it gives (budget, free blocks); the proposals are made before scheduling (n-gram) or after
    it, in those slots (a draft model); the engine verifies them and calls `verified` with the outcome."""

    def __init__(self, config: SpeculativeConfig, proposer, device_type: str = "cpu"):
        self.config = config
        self.proposer = proposer
        self.row_cost = config.row_cost if config.row_cost is not None else DEFAULT_ROW_COST.get(device_type, 0.05)
        self.stats = SpecDecodeStats()  # the engine's totals

    @staticmethod
    def state(seq: Sequence) -> SpecState:
        if seq.spec is None:
            seq.spec = SpecState()
        return seq.spec

    def paused(self, seq: Sequence) -> bool:
        """Whether the sequence will not propose at its next step (adaptive back-off)."""
        return seq.spec is not None and seq.spec.skip > 0

    def before_schedule(self, seqs: list[Sequence], max_model_len: int) -> None:
        """Each of `seqs` (the decoding sequences, all of whose tokens are on the host) asks for proposed tokens:
        sets `num_spec_tokens`. A proposer that needs no cache slots (n-gram) proposes now, so a sequence asks for
        exactly the tokens it got (`spec_token_ids`); one that writes its own K/V into the sequence's blocks (a
        draft model) proposes in `after_schedule`, in the slots the scheduler gave."""
        asking, limits = [], []
        k = self.config.num_tokens
        for seq in seqs:
            st = self.state(seq)
            seq.spec_token_ids = []
            seq.num_spec_tokens = 0
            if st.skip > 0:
                st.skip -= 1
                continue
            if seq.num_pending:
                raise RuntimeError(f"{seq!r}: proposing needs every token on the host ({seq.num_pending} pending)")
            n = len(seq.token_ids)
            # Emitted tokens: the accepted proposals and one more; plain decoding stops at max_new_tokens or once the
            # context is full, so nothing past that is worth proposing.
            if self.config.adaptive:
                k = adaptive_length(st.p_accept, self.row_cost, self.config.num_tokens)
            limit = min(k, seq.params.max_new_tokens - seq.num_output_tokens - 1, max_model_len - 1 - n)
            if limit >= 1:
                asking.append(seq)
                limits.append(limit)
        if not asking:
            return
        if self.proposer.writes_cache:
            for seq, limit in zip(asking, limits):
                seq.num_spec_tokens = limit
        else:
            self._propose(asking, limits)

    def after_schedule(self, seqs: list[Sequence]) -> None:
        """`seqs`: the step's decoding sequences, `num_spec_tokens` cut to the slots each got. Leaves each with
        `spec_token_ids` of that length (or shorter, for a draft-model proposer that proposed less)."""
        if self.proposer.writes_cache:
            asking = [s for s in seqs if s.num_spec_tokens > 0]
            if asking:
                self._propose(asking, [s.num_spec_tokens for s in asking])
        else:
            for seq in seqs:
                del seq.spec_token_ids[seq.num_spec_tokens:]

    def _propose(self, seqs: list[Sequence], limits: list[int]) -> None:
        for seq, proposal, limit in zip(seqs, self.proposer.propose(seqs, limits), limits):
            if len(proposal) > limit:
                raise RuntimeError(f"{self.proposer.name} proposer: {len(proposal)} tokens for {seq!r}, "
                                   f"at most {limit} asked")
            seq.spec_token_ids = list(proposal)
            seq.num_spec_tokens = len(proposal)

    def verified(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """Record a verify step's outcome for `seq`; adapt its proposing."""
        st = self.state(seq)
        st.stats.add(proposed, accepted)
        self.stats.add(proposed, accepted)
        if self.config.adaptive:
            p = st.p_accept
            for _ in range(accepted):
                p += EMA_WEIGHT * (1.0 - p)
            if accepted < proposed:
                p -= EMA_WEIGHT * p
            st.p_accept = p
            if accepted == 0:
                st.backoff = min(max(1, 2 * st.backoff), MAX_BACKOFF)
                st.skip = st.backoff
            else:
                st.backoff = 0

    def prefill(self, seqs: list[Sequence], num_tokens: list[int]) -> None:
        """The target is about to prefill these chunks (from each sequence's num_computed_tokens on)."""
        self.proposer.prefill(seqs, num_tokens)

    def kv_limit(self, seq: Sequence) -> int | None:
        """Tokens of `seq` below which the proposer's own cache (if any) holds valid K/V: the prefix cache publishes
        no block past it (a hit must find the draft's K/V too). None: no limit."""
        return self.proposer.kv_limit(seq)

    def summary(self) -> str:
        return f"speculative {self.config.describe()}: {self.stats.summary()}"
