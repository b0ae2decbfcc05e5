"""References for rms_norm and fused_add_rms_norm (Hugging Face LlamaRMSNorm casts)."""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x_fp32 * rsqrt(mean(x_fp32^2, -1) + eps)).to(x.dtype)`, shape and dtype of x."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h.to(x.dtype).float()).to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`residual += x` in place (in residual's dtype), then `rms_norm_ref(residual)`."""
    residual.copy_((residual.float() + x.float()).to(residual.dtype))
    return rms_norm_ref(residual, weight, eps)
