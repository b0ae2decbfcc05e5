"""Host wrapper for SiLU-and-multiply (the gated activation of a Llama MLP).

`silu_and_mul` validates its inputs, allocates the output when `out` is not given, and calls the torch custom
op `torch.ops.trinfer.silu_and_mul`, which launches `kernels/activation.py` and mutates only `out`, so callers
compile with `torch.compile(fullgraph=True)` and are CUDA-graph capturable.
"""
from __future__ import annotations

import torch
import triton

from ._utils import FLOAT_DTYPES, TRITON_DTYPE, AotSpec, check_same, check_tensor, rows_as_2d
from .kernels.activation import silu_and_mul_kernel

# Columns per program: 1024 (8 per thread at 4 warps; one 16-byte load of gate and of up in fp16/bf16).
_MAX_BLOCK = 1024


def silu_and_mul_launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for an intermediate size `n_cols`."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(max(n_cols, 1)))
    return block, max(1, min(4, block // 256))


def _launch(x2d: torch.Tensor, out2d: torch.Tensor) -> None:
    rows, n_cols = out2d.shape
    block, num_warps = silu_and_mul_launch_config(n_cols)
    silu_and_mul_kernel[(rows, triton.cdiv(n_cols, block))](
        x2d, x2d.stride(0), out2d, out2d.stride(0), n_cols, BLOCK=block, num_warps=num_warps,
    )


@torch.library.custom_op("trinfer::silu_and_mul", mutates_args=("out",))
def _silu_and_mul_op(x: torch.Tensor, out: torch.Tensor) -> None:
    _launch(x, out)


@_silu_and_mul_op.register_fake
def _(x, out):
    return None


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """`silu(gate) * up` where x = [gate | up] along the last dim (a fused gate_up projection output).

    Args:
        x: `[..., 2 * I]` fp32/fp16/bf16, gate in the first I columns and up in the last I; last dim
            contiguous, leading dims flattenable to rows of one stride (a slice of a wider tensor is fine).
        out: optional `[..., I]` output of x's dtype and device, last dim contiguous; written and returned.
    Returns:
        `[..., I]` in x's dtype, with the casts of Hugging Face's LlamaMLP (`act_fn(gate) * up`: silu rounded
        to the dtype, then the product rounded). Reference: `trinfer.triton_kernels.references.silu_and_mul_ref`.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, last_dim_contiguous=True)
    if x.shape[-1] % 2:
        raise ValueError(f"x: expected an even last dim (gate then up, 2 * intermediate size), got {x.shape[-1]}")
    out_shape = (*x.shape[:-1], x.shape[-1] // 2)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, dtypes=(x.dtype,), device=x.device, last_dim_contiguous=True)
        check_same("out", tuple(out.shape), out_shape, "shape")
    if out.numel() == 0:
        return out
    _silu_and_mul_op(rows_as_2d("x", x), rows_as_2d("out", out))
    return out


def _i32(value: int) -> str:
    """AOT type of an i32 argument: "i32:16" when the JIT would mark it divisible by 16."""
    return "i32:16" if value % 16 == 0 else "i32"


def aot_specs(intermediate_sizes=(1536, 8192, 14336), dtypes=FLOAT_DTYPES) -> list[AotSpec]:
    """The launch configurations `silu_and_mul` picks for SmolLM2-135M, Llama-3.2-1B and Llama-3-8B."""
    specs = []
    for inter in intermediate_sizes:
        block, num_warps = silu_and_mul_launch_config(inter)
        for dtype in dtypes:
            t = "*" + TRITON_DTYPE[dtype]
            specs.append(AotSpec(
                name=f"silu_and_mul[i={inter},{TRITON_DTYPE[dtype]}]",
                fn=silu_and_mul_kernel,
                # Strides and sizes are multiples of 16 at these sizes, as the JIT then specializes them.
                signature={"x_ptr": t, "x_row_stride": _i32(2 * inter), "out_ptr": t, "out_row_stride": _i32(inter),
                           "n_cols": _i32(inter)},
                constexprs={"BLOCK": block},
                num_warps=num_warps,
            ))
    return specs
