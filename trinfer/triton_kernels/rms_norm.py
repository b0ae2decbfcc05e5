"""Host wrappers for RMSNorm and fused residual-add + RMSNorm.

Each public function validates its inputs, allocates the output when `out` is not given, and calls a
torch custom op (`torch.ops.trinfer.*`) whose body launches the Triton kernel. Custom ops mutate only
the tensors they name, so a caller compiles with `torch.compile(fullgraph=True)` and is graph-capturable.
"""
from __future__ import annotations

import torch

from ._utils import (
    FLOAT_DTYPES,
    TRITON_DTYPE,
    AotSpec,
    check_positive_float,
    check_same,
    check_tensor,
    row_launch_config,
    rows_as_2d,
)
from .kernels.rms_norm import rms_norm_kernel


def _launch(x2d, res2d, weight, out2d, eps: float) -> None:
    n_rows, n_cols = x2d.shape
    block, num_warps = row_launch_config(n_cols)
    has_res = res2d is not None
    rms_norm_kernel[(n_rows,)](
        x2d, x2d.stride(0),
        res2d if has_res else x2d, res2d.stride(0) if has_res else 0,
        weight, out2d, out2d.stride(0),
        n_cols, eps,
        BLOCK=block, HAS_RESIDUAL=has_res, num_warps=num_warps,
    )


@torch.library.custom_op("trinfer::rms_norm", mutates_args=("out",))
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    _launch(x, None, weight, out, eps)


@_rms_norm_op.register_fake
def _(x, weight, out, eps):
    return None


@torch.library.custom_op("trinfer::fused_add_rms_norm", mutates_args=("residual", "out"))
def _fused_add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float
) -> None:
    _launch(x, residual, weight, out, eps)


@_fused_add_rms_norm_op.register_fake
def _(x, residual, weight, out, eps):
    return None


def _check_common(x: torch.Tensor, weight: torch.Tensor, eps: float) -> float:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, last_dim_contiguous=True)
    check_tensor("weight", weight, dtypes=(x.dtype,), ndim=1, device=x.device, last_dim_contiguous=True)
    check_same("weight", weight.shape[0], x.shape[-1], "size equal to x's last dim")
    return check_positive_float("eps", eps)


def _out_like(out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`out` checked against x, or a new contiguous tensor like x when it is None."""
    if out is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    check_tensor("out", out, dtypes=(x.dtype,), device=x.device, last_dim_contiguous=True)
    check_same("out", tuple(out.shape), tuple(x.shape), "shape")
    return out


def prepare_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     out: torch.Tensor | None) -> tuple[float, torch.Tensor]:
    """`rms_norm`'s every-call checks and output (shared with the CUDA backend): returns (eps, out)."""
    eps = _check_common(x, weight, eps)
    return eps, _out_like(out, x)


def prepare_fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                               out: torch.Tensor | None) -> tuple[float, torch.Tensor]:
    """`fused_add_rms_norm`'s every-call checks and output (shared with the CUDA backend): returns (eps, out)."""
    eps = _check_common(x, weight, eps)
    check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device, last_dim_contiguous=True)
    check_same("residual", tuple(residual.shape), tuple(x.shape), "shape")
    return eps, _out_like(out, x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim: `weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)`.

    Args:
        x: `[..., hidden]` fp32/fp16/bf16; last dim contiguous, leading dims flattenable to rows
           (a slice of a wider tensor is fine).
        weight: `[hidden]`, same dtype and device as x.
        eps: > 0, added to the mean square in fp32.
        out: optional `[..., hidden]` output of x's dtype; written and returned.
    Returns:
        `[..., hidden]` in x's dtype, equal to Hugging Face's LlamaRMSNorm (same casts).
        Reference: `trinfer.triton_kernels.references.rms_norm_ref`.
    """
    eps, out = prepare_rms_norm(x, weight, eps, out)
    if x.numel() == 0:
        return out
    _rms_norm_op(rows_as_2d("x", x), weight, rows_as_2d("out", out), eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`residual += x` in place, then return `rms_norm(residual, weight, eps)`, in one pass over memory.

    Args:
        x: `[..., hidden]` fp32/fp16/bf16 (the sublayer output).
        residual: same shape, dtype and device as x (the residual stream); overwritten with x + residual,
            rounded to its dtype.
        weight: `[hidden]`, x's dtype.  eps: > 0.  out: optional output, as for `rms_norm`.
    Returns:
        The normalized sum, `[..., hidden]` in x's dtype. Reference: `references.fused_add_rms_norm_ref`.
    """
    eps, out = prepare_fused_add_rms_norm(x, residual, weight, eps, out)
    if x.numel() == 0:
        return out
    _fused_add_rms_norm_op(rows_as_2d("x", x), rows_as_2d("residual", residual), weight, rows_as_2d("out", out), eps)
    return out


def aot_specs(hidden_sizes=(576, 2048, 4096, 8192), dtypes=FLOAT_DTYPES) -> list[AotSpec]:
    """The launch configurations `rms_norm`/`fused_add_rms_norm` pick for real hidden sizes."""
    specs = []
    for hidden in hidden_sizes:
        block, num_warps = row_launch_config(hidden)
        for dtype in dtypes:
            t = "*" + TRITON_DTYPE[dtype]
            for has_res in (False, True):
                specs.append(AotSpec(
                    name=f"rms_norm[h={hidden},{TRITON_DTYPE[dtype]},res={int(has_res)}]",
                    fn=rms_norm_kernel,
                    signature={"x_ptr": t, "x_row_stride": "i32", "res_ptr": t, "res_row_stride": "i32",
                               "w_ptr": t, "out_ptr": t, "out_row_stride": "i32", "n_cols": "i32", "eps": "fp32"},
                    constexprs={"BLOCK": block, "HAS_RESIDUAL": has_res},
                    num_warps=num_warps,
                ))
    return specs
