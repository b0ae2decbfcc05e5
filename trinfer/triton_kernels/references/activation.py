"""Reference for silu_and_mul (Hugging Face LlamaMLP casts)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for x `[..., 2 * I]` = [gate | up], shape `[..., I]` in x's dtype.

    As HF's `act_fn(gate_proj(x)) * up_proj(x)`: silu in fp32 rounded to x's dtype (what torch's fp16/bf16
    silu does), then the product in fp32 rounded again.
    """
    gate, up = x.split(x.shape[-1] // 2, dim=-1)
    act = F.silu(gate.float()).to(x.dtype)
    return (act.float() * up.float()).to(x.dtype)
