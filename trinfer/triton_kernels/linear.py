"""Host wrappers for the decode matrix products (`linear`) and weight dequantization (`dequantize`).

`linear(x, weight, bias)` is `F.linear` for decode-sized batches on a dense weight (x's dtype) or a
`QuantizedWeight` (int8, int4, GGUF Q8_0/Q4_0/Q4_1; layouts in `weight_formats.py`). Each program owns a slice
of output columns and streams that slice of the weight once; the launch configuration (tile sizes, warps)
depends on the weight's shape, format and dtype, never on the number of rows, and rows run in fixed tiles of
16, so a row's result is bitwise the same alone or in any batch, at any position (kernels/linear.py).

Up to MAX_ROWS rows run in one launch (one accumulator per 16 rows); more rows run as consecutive chunks of
MAX_ROWS, each streaming the weight again, with the same per-row arithmetic (still batch-invariant). For
prefill-sized products, `dequantize` then a library matmul is the faster path.
"""
from __future__ import annotations

import torch
import triton

from ._utils import FLOAT_DTYPES, TRITON_DTYPE, AotSpec, check_same, check_tensor, interpreting
from .kernels.linear import dequantize_kernel, linear_kernel
from .weight_formats import QuantizedWeight

MAX_ROWS = 64   # rows per launch: 4 accumulators of 16 rows
ROW_TILE = 16
FORMAT_IDS = {"dense": 0, "int8": 1, "int4": 2, "q8_0": 3, "q4_0": 4, "q4_1": 5}


def linear_launch_config(n: int, k: int, fmt: str, dtype: torch.dtype, *, interpreter: bool | None = None
                         ) -> dict[str, int]:
    """Tiles and warps of `linear` for a `[n, k]` weight in format `fmt` with activations of `dtype`.

    Independent of the number of rows (batch invariance). On a GPU: BLOCK_N is the widest of 64/32/16 that still
    gives >= 256 programs (two per SM of a 132-SM H100/H200), so small layers spread over the whole chip;
    BLOCK_K is 128, or 256 for dense and int8 weights in 16/32-column programs (the formats decoded in fp32
    registers keep 128 there: at 256 and four row tiles the compiler spills), halved for fp32 activations
    and at most K rounded up to a power of two.
    Under the Triton interpreter (`interpreter`, default: whether it is on), whose cost is per operation far more
    than per element, tiles are as large as it allows: up to 1024 x 1024 (its limit is 2^20 elements).
    """
    if interpreter is None:
        interpreter = interpreting()
    kp2 = max(32, triton.next_power_of_2(k))
    if interpreter:
        block_k = min(kp2, 1024)
        return dict(block_n=min(max(16, triton.next_power_of_2(n)), 2**20 // block_k, 1024), block_k=block_k,
                    num_warps=4)
    block_n = next((b for b in (64, 32) if triton.cdiv(n, b) >= 256), 16)
    block_k = 256 if block_n < 64 and fmt in ("dense", "int8") else 128
    if dtype == torch.float32:
        block_k //= 2
    return dict(block_n=block_n, block_k=max(32, min(block_k, kp2)), num_warps=4)


def linear_num_stages(m_tiles: int) -> int:
    """Software-pipelining depth: more row tiles keep more x tiles in shared memory per stage. The pipeline
    never changes the arithmetic, so it may depend on the rows."""
    return {1: 4, 2: 3}.get(m_tiles, 2)


def kernel_weight_args(fmt: str, data: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None):
    """(w, w_stride_n, s, s_stride_n, z, z_stride_n) as the kernels take them (unused pointers: `data`)."""
    if fmt == "dense":
        return data, data.stride(0), data, 0, data, 0
    if fmt == "int8":
        return data, data.stride(0), scales, 0, data, 0
    if fmt == "int4":
        return data, data.stride(0), scales, scales.stride(0), zeros, zeros.stride(0)
    w = data.view(torch.int8) if fmt == "q8_0" else data  # GGUF: the block bytes, and the same bytes as fp16
    return w, data.stride(0), data.view(torch.float16), data.stride(0) // 2, data, 0


def _launch_linear(x2d, data, scales, zeros, bias, out2d, fmt: str, group: int, n: int, k: int) -> None:
    cfg = linear_launch_config(n, k, fmt, x2d.dtype)
    w, w_sn, s, s_sn, z, z_sn = kernel_weight_args(fmt, data, scales, zeros)
    grid = (triton.cdiv(n, cfg["block_n"]),)
    for r0 in range(0, x2d.shape[0], MAX_ROWS):
        xs, ys = x2d[r0:r0 + MAX_ROWS], out2d[r0:r0 + MAX_ROWS]
        m_tiles = triton.cdiv(xs.shape[0], ROW_TILE)
        linear_kernel[grid](
            xs, xs.stride(0), xs.stride(1), xs.shape[0], n, k,
            w, w_sn, s, s_sn, z, z_sn,
            bias if bias is not None else xs, ys, ys.stride(0),
            FORMAT=FORMAT_IDS[fmt], GROUP=group, HAS_BIAS=bias is not None, M_TILES=m_tiles,
            BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], IEEE_FP32=x2d.dtype == torch.float32,
            num_warps=cfg["num_warps"], num_stages=linear_num_stages(m_tiles),
        )


@torch.library.custom_op("trinfer::linear", mutates_args=("out",))
def _linear_op(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
               bias: torch.Tensor | None, out: torch.Tensor, fmt: str, group: int, n: int, k: int) -> None:
    _launch_linear(x, data, scales, zeros, bias, out, fmt, group, n, k)


@_linear_op.register_fake
def _(x, data, scales, zeros, bias, out, fmt, group, n, k):
    return None


def weight_parts(weight) -> tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    if isinstance(weight, QuantizedWeight):
        return weight.format, weight.data, weight.scales, weight.zeros, weight.group_size
    return "dense", weight, None, None, 0


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """`y = x @ W^T + bias`, batch-invariant, streaming W once per MAX_ROWS rows.

    Args:
        x: `[..., K]` fp32/fp16/bf16 activations; a 2-D x may have any strides.
        weight: `[N, K]` tensor in x's dtype (last dim contiguous), or a `QuantizedWeight` of in_features K on
            x's device.
        bias: optional `[N]` in x's dtype.
        out: optional `[..., N]` output in x's dtype (last dim contiguous; leading dims as x's).
    Returns:
        `[..., N]` in x's dtype (fp32 accumulation, one rounding). Reference: `references.linear_ref`.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if isinstance(weight, QuantizedWeight):
        if weight.device != x.device:
            raise ValueError(f"weight: expected device {x.device} (x's), got {weight.device}")
    else:
        check_tensor("weight", weight, dtypes=(x.dtype,), ndim=2, device=x.device, last_dim_contiguous=True)
    n, k = tuple(weight.shape)
    check_same("weight", k, x.shape[-1], "in_features (dim 1) equal to x's last dim")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(x.dtype,), ndim=1, device=x.device, contiguous=True)
        check_same("bias", tuple(bias.shape), (n,), "shape")
    lead = tuple(x.shape[:-1])
    x2d = x if x.dim() == 2 else x.reshape(-1, k)
    if out is None:
        out = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, dtypes=(x.dtype,), device=x.device, last_dim_contiguous=True)
        check_same("out", tuple(out.shape), lead + (n,), "shape")
    out2d = out if out.dim() == 2 else out.view(-1, n)
    if x2d.shape[0] and n:
        fmt, data, scales, zeros, group = weight_parts(weight)
        _linear_op(x2d, data, scales, zeros, bias, out2d, fmt, group, n, k)
    return out


# ---------------------------------------------------------------------------------------------- dequantize

DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 32, 256  # on a GPU: 8192 weights per program


def dequantize_launch_config(n: int, k: int, *, interpreter: bool | None = None) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of the dequantize kernel; under the interpreter, tiles as large as it allows."""
    if interpreter if interpreter is not None else interpreting():
        block_k = min(max(32, triton.next_power_of_2(k)), 1024)
        return min(max(16, triton.next_power_of_2(n)), 2**20 // block_k, 1024), block_k
    return DEQUANT_BLOCK_N, DEQUANT_BLOCK_K


@torch.library.custom_op("trinfer::dequantize", mutates_args=("out",))
def _dequantize_op(data: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None, out: torch.Tensor,
                   fmt: str, group: int) -> None:
    n, k = out.shape
    w, w_sn, s, s_sn, z, z_sn = kernel_weight_args(fmt, data, scales, zeros)
    block_n, block_k = dequantize_launch_config(n, k)
    dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        w, w_sn, s, s_sn, z, z_sn, n, k, out, out.stride(0),
        FORMAT=FORMAT_IDS[fmt], GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )


@_dequantize_op.register_fake
def _(data, scales, zeros, out, fmt, group):
    return None


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float32, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense `[N, K]` matrix of a quantized weight, in `dtype` (fp32 math, one rounding).
    Reference: `references.dequantize_ref`."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight: expected a QuantizedWeight, got {type(weight).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32/float16/bfloat16, got {dtype}")
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    else:
        check_tensor("out", out, dtypes=(dtype,), ndim=2, device=weight.device, last_dim_contiguous=True)
        check_same("out", tuple(out.shape), weight.shape, "shape")
    _dequantize_op(weight.data, weight.scales, weight.zeros, out, weight.format, weight.group_size)
    return out


# ---------------------------------------------------------------------------------------------- AOT specs

def _linear_spec(fmt: str, group: int, dtype: torch.dtype, n: int, k: int, m_tiles: int) -> AotSpec:
    cfg = linear_launch_config(n, k, fmt, dtype)
    t = TRITON_DTYPE[dtype]
    w_type, s_type, z_type = {
        "dense": (t, t, t), "int8": ("i8", "fp32", "i8"), "int4": ("i32", "fp16", "u8"),
        "q8_0": ("i8", "fp16", "u8"), "q4_0": ("u8", "fp16", "u8"), "q4_1": ("u8", "fp16", "u8"),
    }[fmt]
    return AotSpec(
        name=f"linear[{fmt}{group if fmt == 'int4' else ''},{t},n={n},k={k},tiles={m_tiles}]",
        fn=linear_kernel,
        signature={"x_ptr": "*" + t, "x_stride_m": "i32:16", "x_stride_k": "i32", "M": "i32", "N": "i32:16",
                   "K": "i32:16", "w_ptr": "*" + w_type, "w_stride_n": "i32:16", "s_ptr": "*" + s_type,
                   "s_stride_n": "i32", "z_ptr": "*" + z_type, "z_stride_n": "i32", "b_ptr": "*" + t,
                   "y_ptr": "*" + t, "y_stride_m": "i32:16"},
        constexprs={"FORMAT": FORMAT_IDS[fmt], "GROUP": group, "HAS_BIAS": True, "M_TILES": m_tiles,
                    "BLOCK_N": cfg["block_n"], "BLOCK_K": cfg["block_k"], "IEEE_FP32": dtype == torch.float32,
                    # x is contiguous in the model: the JIT specializes a unit stride to a constant
                    "x_stride_k": 1},
        num_warps=cfg["num_warps"], num_stages=linear_num_stages(m_tiles),
    )


def aot_specs() -> list[AotSpec]:
    """linear for every format in bf16 at Llama-3.2-1B's o_proj shape (BLOCK_N 16, where registers are tightest:
    1 and 4 row tiles, int4 also 2 and 3) and Llama-3-8B's gate/up shape (BLOCK_N 64, 4 row tiles); BLOCK_N 32;
    int4 in fp16 and dense/int4 in fp32; and the dequantize kernel of every quantized format."""
    specs = []
    formats = [("dense", 0), ("int8", 0), ("int4", 128), ("int4", 32), ("q8_0", 32), ("q4_0", 32), ("q4_1", 32)]
    for fmt, group in formats:
        for m_tiles in ((1, 2, 3, 4) if (fmt, group) == ("int4", 128) else (1, 4)):
            specs.append(_linear_spec(fmt, group, torch.bfloat16, 2048, 2048, m_tiles))
        specs.append(_linear_spec(fmt, group, torch.bfloat16, 28672, 4096, 4))
    for dtype, fmt, group in ((torch.float16, "int4", 64), (torch.float32, "dense", 0), (torch.float32, "int4", 64)):
        specs.append(_linear_spec(fmt, group, dtype, 4096, 4096, 4))
    for fmt, group in (("dense", 0), ("int4", 128), ("q4_1", 32)):
        specs.append(_linear_spec(fmt, group, torch.bfloat16, 8192, 2048, 4))  # BLOCK_N 32
    for fmt, group in formats[1:]:
        s_type = {"int8": "fp32", "int4": "fp16"}.get(fmt, "fp16")
        w_type = {"int8": "i8", "int4": "i32", "q8_0": "i8"}.get(fmt, "u8")
        specs.append(AotSpec(
            name=f"dequantize[{fmt}{group if fmt == 'int4' else ''},bf16]", fn=dequantize_kernel,
            signature={"w_ptr": "*" + w_type, "w_stride_n": "i32:16", "s_ptr": "*" + s_type, "s_stride_n": "i32",
                       "z_ptr": "*u8", "z_stride_n": "i32", "N": "i32", "K": "i32", "out_ptr": "*bf16",
                       "out_stride_n": "i32:16"},
            constexprs={"FORMAT": FORMAT_IDS[fmt], "GROUP": group, "BLOCK_N": DEQUANT_BLOCK_N,
                        "BLOCK_K": DEQUANT_BLOCK_K},
            num_warps=4, num_stages=1,
        ))
    return specs
