"""N-gram proposals (prompt lookup): what followed the most recent earlier occurrence of the sequence's last n tokens.

For n from `max_ngram` down to `min_ngram`, the last n tokens of the sequence (prompt and output) are looked up
among its earlier tokens; at the most recent earlier occurrence (one followed by at least one token), the tokens
that followed it are proposed, up to k. The copy may run into the tokens it is proposing (a pattern of period p
proposes its continuation beyond its last period: each proposed token i is token `start + i` of the sequence
extended by the proposal itself), so a repeating list or loop gets full k-token proposals. No match: no proposal.

`ngram_propose` is the definition (a plain scan); `NgramProposer` computes the same from an index kept per
sequence (each n-gram -> where its most recent occurrence ended), updated with the tokens added since its last
call, so a step costs O(max_ngram) per new token and per lookup, not a scan of the sequence.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

from ..sequence import Sequence


def _copy(tokens: Seq[int], start: int, k: int) -> list[int]:
    """k tokens copied from `start` on, reading the proposal itself once the copy passes the sequence's end."""
    out: list[int] = []
    n = len(tokens)
    for i in range(k):
        j = start + i
        out.append(tokens[j] if j < n else out[j - n])
    return out


def ngram_propose(tokens: Seq[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The proposal for a sequence of `tokens` (module docstring): k tokens, or [] when no suffix of length
    min_ngram..max_ngram occurred before."""
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = list(tokens[length - n:])
        for j in range(length - n - 1, -1, -1):  # an occurrence starting at j, followed by token j + n
            if list(tokens[j: j + n]) == suffix:
                return _copy(tokens, j + n, k)
    return []


class _Index:
    """Per sequence: n-gram (tuple) -> the position right after its most recent occurrence, over the n-grams
    ending at positions < `upto` (each then followed by a token)."""

    __slots__ = ("last", "upto")

    def __init__(self):
        self.last: dict[tuple[int, ...], int] = {}
        self.upto = 0


class NgramProposer:
    """Prompt-lookup proposals (module docstring); no model, nothing on the device."""

    name = "ngram"
    writes_cache = False  # proposes before scheduling: its sequences ask for exactly what it proposed

    def __init__(self, max_ngram: int, min_ngram: int):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Up to limits[i] tokens for seqs[i] (all of whose tokens are on the host)."""
        return [self._propose(seq, k) for seq, k in zip(seqs, limits)]

    def _propose(self, seq: Sequence, k: int) -> list[int]:
        st = seq.spec
        index = st.proposer
        if index is None:
            index = st.proposer = _Index()
        tokens, lo, hi = seq.token_ids, self.min_ngram, self.max_ngram
        length = len(tokens)
        last = index.last
        for end in range(index.upto, length - 1):  # n-grams ending at `end`, followed by token end + 1
            for n in range(lo, min(hi, end + 1) + 1):
                last[tuple(tokens[end - n + 1: end + 1])] = end + 1
        index.upto = max(index.upto, length - 1)
        for n in range(min(hi, length - 1), lo - 1, -1):
            start = last.get(tuple(tokens[length - n:]))
            if start is not None:
                return _copy(tokens, start, k)
        return []

    def prefill(self, seqs: list[Sequence], num_tokens: list[int]) -> None:
        """Nothing to compute alongside the target's prefill."""

    def kv_limit(self, seq: Sequence) -> int | None:
        """No cache of its own: the prefix cache may publish whatever the target computed."""
        return None
