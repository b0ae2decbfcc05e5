"""Greedy acceptance: how many proposed tokens the target's own argmax confirms."""
from __future__ import annotations

from collections.abc import Sequence


def num_accepted(proposed: Sequence[int], verdicts: Sequence[int]) -> int:
    """The length a of the longest prefix of `proposed` that the target decodes itself.

    A verify pass feeds a sequence's newest token and its k proposals p_1..p_k; verdicts[j] is the target's argmax
    after the newest token and p_1..p_j (k + 1 of them; verdicts[0] is what a plain decode step gives). Plain
    greedy decoding would emit verdicts[0]; it equals p_1 exactly when the proposal was right, in which case the
    row fed p_1 is the step plain decoding runs next, and so on. So the output is verdicts[0..a] (a accepted
    proposals and the target's own token after them), where a is the first j with p_{j+1} != verdicts[j] (k if
    none): exactly plain greedy decoding's next a + 1 tokens.
    """
    if len(verdicts) != len(proposed) + 1:
        raise ValueError(f"verdicts: expected {len(proposed) + 1} (one per proposal, plus one), got {len(verdicts)}")
    a = 0
    for p, v in zip(proposed, verdicts):
        if p != v:
            break
        a += 1
    return a
