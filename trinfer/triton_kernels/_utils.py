"""Shared helpers for the host wrappers: input validation, launch configuration, AOT compile specs.

Nothing here holds state. Every validation error is a ValueError or TypeError whose message names the
argument, what was expected and what was given.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# torch dtype -> the Triton signature type used by ahead-of-time compile specs.
TRITON_DTYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: Any,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    min_ndim: int | None = None,
    device: torch.device | None = None,
    last_dim_contiguous: bool = False,
    contiguous: bool = False,
) -> torch.Tensor:
    """Validate one tensor argument; raise TypeError/ValueError naming `name` on the first mismatch."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got {t.dim()} (shape {tuple(t.shape)})")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got {t.dim()} (shape {tuple(t.shape)})")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())} for shape {tuple(t.shape)}")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected the last dim to be contiguous (stride 1), got stride {t.stride(-1)}")
    return t


def check_same(name: str, value: Any, expected: Any, what: str) -> None:
    """Raise ValueError `name: expected <what> <expected>, got <value>` when value != expected."""
    if value != expected:
        raise ValueError(f"{name}: expected {what} {expected}, got {value}")


def check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float > 0, got {type(value).__name__}")
    if not value > 0:  # also catches NaN
        raise ValueError(f"{name}: expected a float > 0, got {value}")
    return float(value)


def rows_as_2d(name: str, t: torch.Tensor) -> torch.Tensor:
    """View `[..., n]` as `[rows, n]` with a row stride, without copying. Raises if no single row stride exists."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"{name}: expected leading dims that flatten to rows of one stride (a slice of the last dim is fine), "
            f"got shape {tuple(t.shape)} with strides {tuple(t.stride())}"
        ) from None


def row_launch_config(n_cols: int, *, max_block: int = 65536) -> tuple[int, int]:
    """Block size and warps for a row-wise kernel that keeps one row of `n_cols` elements in registers.

    BLOCK is the next power of two >= n_cols; warps grow with the row so each thread holds <= ~16 values.
    """
    block = triton.next_power_of_2(max(int(n_cols), 1))
    if block > max_block:
        raise ValueError(f"n_cols: expected at most {max_block} elements per row, got {n_cols}")
    num_warps = min(max(block // 512, 1), 16)
    return block, num_warps


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class AotSpec:
    """One kernel launch configuration to compile ahead of time (see tests/test_compile_check.py).

    `signature` maps every non-constexpr argument to its Triton type ("*fp16", "i32", "fp32", ...); as the JIT
    does at run time, pointers are taken as 16-byte aligned ("*fp16:1" opts out) and an integer typed
    "i32:16" as a multiple of 16 (strides and sizes that are so at the real shapes);
    `constexprs` gives every tl.constexpr argument its value. The wrapper's own launch-config helper must
    produce these values, so that the check compiles what really runs.
    """

    name: str
    fn: Callable
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    expect_wgmma: bool = False  # on sm_90 the PTX must contain wgmma (tensor-core kernels)
    extra: dict[str, Any] = field(default_factory=dict)
