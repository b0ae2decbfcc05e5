"""Counters of speculative decoding, per request (`RequestOutput.spec_stats`) and per engine (`Engine.spec_stats`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class SpecDecodeStats:
    """num_verify_steps: (sequence, step) pairs whose proposals the target checked (a sequence without a proposal
        in a step rides as a plain decode row and counts nothing).
    num_proposed / num_accepted: proposed tokens, and those the target confirmed (num_accepted.accept; counted
        as verified, even when the output then stops inside the accepted run: EOS, a stop string, a length).
    Each verify step also emits one token of the target's own, so it yields num_accepted / num_verify_steps + 1
    tokens on average."""

    num_verify_steps: int = 0
    num_proposed: int = 0
    num_accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed tokens (0.0 before any proposal)."""
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Proposed tokens accepted per verify step (0.0 before any)."""
        return self.num_accepted / self.num_verify_steps if self.num_verify_steps else 0.0

    def add(self, proposed: int, accepted: int) -> None:
        self.num_verify_steps += 1
        self.num_proposed += proposed
        self.num_accepted += accepted

    def copy(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_verify_steps, self.num_proposed, self.num_accepted)

    def as_dict(self) -> dict[str, Any]:
        return {"verify_steps": self.num_verify_steps, "proposed": self.num_proposed, "accepted": self.num_accepted,
                "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length}

    def summary(self) -> str:
        """One line, e.g. for the CLI's timings."""
        return (f"{self.num_accepted}/{self.num_proposed} proposed tokens accepted "
                f"({100 * self.acceptance_rate:.1f}%), {self.mean_accepted_length:.2f} per verify step "
                f"({self.num_verify_steps} verify steps)")


@dataclass(slots=True)
class SpecState:
    """A sequence's speculative-decoding state (`Sequence.spec`; None in an engine without speculation).

    skip / backoff: adaptive proposing (SpeculativeConfig.adaptive): steps left without a proposal, and the
        length of the last such pause (doubled on each proposal rejected at its first token, reset by an accept).
    p_accept: the estimated chance that a proposed token is accepted (given the ones before it were): an
        exponential moving average over the verified tokens, starting at `PRIOR_ACCEPT`.
    proposer: the proposer's own per-sequence state (the n-gram index; the draft model's cache progress).
    """

    stats: SpecDecodeStats = field(default_factory=SpecDecodeStats)
    skip: int = 0
    backoff: int = 0
    p_accept: float = 0.6
    proposer: Any = None
