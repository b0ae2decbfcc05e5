"""Reference for lm_head_greedy: the LM-head matmul in the activation dtype, then greedy sampling."""
from __future__ import annotations

import torch

from .sampling import greedy_sample_ref


def lm_head_greedy_ref(hidden: torch.Tensor, weight: torch.Tensor, return_logprobs: bool = False):
    """`greedy_sample_ref(hidden @ weight.T)`: logits computed in fp32 and rounded to hidden's dtype."""
    logits = (hidden.float() @ weight.float().T).to(hidden.dtype)
    return greedy_sample_ref(logits, return_logprobs)
