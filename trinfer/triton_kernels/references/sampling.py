"""Reference for greedy_sample: torch.argmax and an fp32 log-softmax."""
from __future__ import annotations

import torch


def greedy_sample_ref(logits: torch.Tensor, return_logprobs: bool = False):
    """`torch.argmax(logits, -1)` (int64; ties -> lowest index, the first NaN wins).

    With `return_logprobs=True` also the fp32 log-probability of each chosen token,
    `logit - logsumexp(row)`, taken from `log_softmax` (which subtracts the row max first, so large logits
    keep their precision). It is NaN for rows holding a NaN or +inf, or made only of -inf.
    """
    ids = torch.argmax(logits, dim=-1)
    if not return_logprobs:
        return ids
    return ids, torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
