"""Host wrapper for the fused LM head + greedy sampling (`lm_head_greedy`).

The decode step's last three operations, final norm -> LM head -> argmax, normally write a
`[batch, vocab]` logits tensor only to read it back. Here the LM-head kernel reduces each tile of logits
in registers to the partials of the sampling kernels, and `greedy_sample_reduce_kernel` finishes the job:
the logits never touch memory. The weight may be quantized (`QuantizedWeight`: int8, int4, GGUF Q8_0/Q4_0/Q4_1,
as a GGUF's tied Q8_0 embedding is); each tile is then decoded in registers as `linear` decodes it.
"""
from __future__ import annotations

import torch
import triton

from ._utils import FLOAT_DTYPES, TRITON_DTYPE, AotSpec, check_same, check_tensor
from .kernels.lm_head import lm_head_greedy_partial_kernel
from .kernels.sampling import greedy_sample_reduce_kernel
from .linear import FORMAT_IDS, kernel_weight_args, weight_parts
from .weight_formats import QuantizedWeight

BLOCK_B = 16  # fixed: the row tile never depends on the batch, so results are batch-invariant


def lm_head_launch_config(vocab: int, dtype: torch.dtype, fmt: str = "dense") -> dict[str, int]:
    """Tile sizes for a vocabulary, dtype and weight format (independent of the batch size). Quantized weights
    take K steps of 64: their tile is decoded in fp32 registers."""
    block_v = 128
    block_k = 64 if dtype == torch.float32 or fmt != "dense" else 128
    n_chunks = triton.cdiv(vocab, block_v)
    block_c = triton.next_power_of_2(n_chunks)
    return dict(block_b=BLOCK_B, block_v=block_v, block_k=block_k, n_chunks=n_chunks, num_warps=4, num_stages=3,
                block_c=block_c, reduce_warps=1 if block_c <= 256 else 4)


def _launch(hidden, data, scales, zeros, fmt: str, group: int, vocab: int, out_ids, out_logprobs,
            round_logits: bool) -> None:
    batch, dim = hidden.shape
    cfg = lm_head_launch_config(vocab, hidden.dtype, fmt)
    w, w_sn, s, s_sn, z, z_sn = kernel_weight_args(fmt, data, scales, zeros)
    n_chunks = cfg["n_chunks"]
    with_lp = out_logprobs is not None
    part = torch.empty((2 if with_lp else 1, batch, n_chunks), dtype=torch.float32, device=hidden.device)
    part_idx = torch.empty((batch, n_chunks), dtype=torch.int32, device=hidden.device)
    part_sum = part[1] if with_lp else part[0]
    lm_head_greedy_partial_kernel[(triton.cdiv(batch, BLOCK_B), n_chunks)](
        hidden, hidden.stride(0), w, w_sn, s, s_sn, z, z_sn, batch, vocab, dim,
        part[0], part_idx, part_sum, n_chunks,
        BLOCK_B=BLOCK_B, BLOCK_V=cfg["block_v"], BLOCK_K=cfg["block_k"],
        ROUND_LOGITS=round_logits, WITH_LOGPROBS=with_lp, IEEE_FP32=hidden.dtype == torch.float32,
        FORMAT=FORMAT_IDS[fmt], GROUP=group,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    lp = out_logprobs if with_lp else part[0]
    greedy_sample_reduce_kernel[(batch,)](
        part[0], part_idx, part_sum, n_chunks,
        out_ids, out_ids.stride(0), lp, lp.stride(0),
        BLOCK_C=cfg["block_c"], WITH_LOGPROBS=with_lp, num_warps=cfg["reduce_warps"],
    )


@torch.library.custom_op("trinfer::lm_head_greedy", mutates_args=("out_ids",))
def _lm_head_greedy_op(hidden: torch.Tensor, data: torch.Tensor, scales: torch.Tensor | None,
                       zeros: torch.Tensor | None, fmt: str, group: int, vocab: int, out_ids: torch.Tensor,
                       round_logits: bool) -> None:
    _launch(hidden, data, scales, zeros, fmt, group, vocab, out_ids, None, round_logits)


@_lm_head_greedy_op.register_fake
def _(hidden, data, scales, zeros, fmt, group, vocab, out_ids, round_logits):
    return None


@torch.library.custom_op("trinfer::lm_head_greedy_logprobs", mutates_args=("out_ids", "out_logprobs"))
def _lm_head_greedy_logprobs_op(hidden: torch.Tensor, data: torch.Tensor, scales: torch.Tensor | None,
                                zeros: torch.Tensor | None, fmt: str, group: int, vocab: int, out_ids: torch.Tensor,
                                out_logprobs: torch.Tensor, round_logits: bool) -> None:
    _launch(hidden, data, scales, zeros, fmt, group, vocab, out_ids, out_logprobs, round_logits)


@_lm_head_greedy_logprobs_op.register_fake
def _(hidden, data, scales, zeros, fmt, group, vocab, out_ids, out_logprobs, round_logits):
    return None


def lm_head_greedy(
    hidden: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    *,
    return_logprobs: bool = False,
    round_logits: bool = True,
    out: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens of `hidden @ weight.T` without writing the logits.

    Args:
        hidden: `[batch, hidden]` fp32/fp16/bf16 final-normed hidden states, last dim contiguous.
        weight: `[vocab, hidden]` LM-head (or tied embedding) weight, same dtype/device, last dim contiguous; or a
            `QuantizedWeight` of that shape on hidden's device (reference: the decoded matrix in hidden's dtype).
        return_logprobs: also return the fp32 log-probability of each chosen token (`logit - logsumexp`).
        round_logits: round each fp32-accumulated logit to hidden's dtype before the argmax (default), as a
            matmul writing logits in that dtype would; then results equal `greedy_sample(hidden @ weight.T)`
            up to the matmul's summation order. False keeps full fp32 logits.
        out: static outputs for CUDA graphs: int64 ids `[batch]`, or `(ids, fp32 logprobs)`.
    Returns:
        int64 ids `[batch]` (ties -> lowest index, NaN as torch.argmax), or `(ids, logprobs)`.
        Reference: `trinfer.triton_kernels.references.lm_head_greedy_ref`.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    if isinstance(weight, QuantizedWeight):
        if weight.device != hidden.device:
            raise ValueError(f"weight: expected device {hidden.device} (hidden's), got {weight.device}")
    else:
        check_tensor("weight", weight, dtypes=(hidden.dtype,), ndim=2, device=hidden.device, last_dim_contiguous=True)
    check_same("weight", weight.shape[1], hidden.shape[1], "hidden size (dim 1) equal to hidden's")
    if weight.shape[0] < 1:
        raise ValueError(f"weight: expected a vocab size (dim 0) >= 1, got {weight.shape[0]}")
    batch = hidden.shape[0]
    specs = [("out", torch.int64)] if not return_logprobs else [("out[0] (ids)", torch.int64),
                                                               ("out[1] (logprobs)", torch.float32)]
    if out is None:
        outs = [torch.empty(batch, dtype=dt, device=hidden.device) for _, dt in specs]
    else:
        outs = list(out) if isinstance(out, tuple) else [out]
        if len(outs) != len(specs) or (return_logprobs and not isinstance(out, tuple)):
            raise TypeError(f"out: expected {'a tuple (ids, logprobs)' if return_logprobs else 'an int64 tensor'}, "
                            f"got {type(out).__name__}")
        for (name, dt), t in zip(specs, outs):
            check_tensor(name, t, dtypes=(dt,), ndim=1, device=hidden.device)
            check_same(name, tuple(t.shape), (batch,), "shape")
    if batch:
        fmt, data, scales, zeros, group = weight_parts(weight)
        args = (hidden, data, scales, zeros, fmt, group, weight.shape[0])
        if return_logprobs:
            _lm_head_greedy_logprobs_op(*args, outs[0], outs[1], round_logits)
        else:
            _lm_head_greedy_op(*args, outs[0], round_logits)
    return tuple(outs) if return_logprobs else outs[0]


def _partial_signature(h_type: str, w_type: str, s_type: str | None = None) -> dict[str, str]:
    return {"h_ptr": h_type, "h_row_stride": "i32:16", "w_ptr": w_type, "w_row_stride": "i32:16",
            "s_ptr": s_type or w_type, "s_row_stride": "i32", "z_ptr": "*u8" if s_type else w_type,
            "z_row_stride": "i32", "batch": "i32", "vocab": "i32", "hidden": "i32:16", "part_max_ptr": "*fp32",
            "part_idx_ptr": "*i32", "part_sum_ptr": "*fp32", "n_chunks": "i32"}


def aot_specs(shapes=((576, 49152), (2048, 128256), (4096, 128256), (3584, 152064)),
              dtypes=FLOAT_DTYPES) -> list[AotSpec]:
    """The partial kernel at real (hidden, vocab) shapes; the reduce pass is covered by sampling.aot_specs."""
    specs = []
    for hidden, vocab in shapes[:1]:  # tiles depend on dtype only; one shape per dtype suffices
        for dtype in dtypes:
            cfg = lm_head_launch_config(vocab, dtype)
            t = "*" + TRITON_DTYPE[dtype]
            for with_lp in (False, True):
                specs.append(AotSpec(
                    name=f"lm_head_greedy_partial[{TRITON_DTYPE[dtype]},lp={int(with_lp)}]",
                    fn=lm_head_greedy_partial_kernel,
                    signature=_partial_signature(t, t),
                    constexprs={"BLOCK_B": cfg["block_b"], "BLOCK_V": cfg["block_v"], "BLOCK_K": cfg["block_k"],
                                "ROUND_LOGITS": dtype != torch.float32, "WITH_LOGPROBS": with_lp,
                                "IEEE_FP32": dtype == torch.float32, "FORMAT": 0, "GROUP": 0},
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    expect_wgmma=dtype != torch.float32,
                ))
    for fmt, group, w_type, s_type in (("int8", 0, "*i8", "*fp32"), ("int4", 128, "*i32", "*fp16"),
                                       ("q8_0", 32, "*i8", "*fp16"), ("q4_0", 32, "*u8", "*fp16"),
                                       ("q4_1", 32, "*u8", "*fp16")):
        cfg = lm_head_launch_config(shapes[0][1], torch.bfloat16, fmt)
        specs.append(AotSpec(
            name=f"lm_head_greedy_partial[bf16,{fmt}{group if fmt == 'int4' else ''},lp=1]",
            fn=lm_head_greedy_partial_kernel, signature=_partial_signature("*bf16", w_type, s_type),
            constexprs={"BLOCK_B": cfg["block_b"], "BLOCK_V": cfg["block_v"], "BLOCK_K": cfg["block_k"],
                        "ROUND_LOGITS": True, "WITH_LOGPROBS": True, "IEEE_FP32": False,
                        "FORMAT": FORMAT_IDS[fmt], "GROUP": group},
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], expect_wgmma=True,
        ))
    for hidden, vocab in shapes:
        cfg = lm_head_launch_config(vocab, torch.bfloat16)
        if cfg["block_c"] > 1024:  # the sampling specs cover reduce widths up to 1024
            for with_lp in (False, True):
                specs.append(AotSpec(
                    name=f"lm_head_greedy_reduce[v={vocab},lp={int(with_lp)}]",
                    fn=greedy_sample_reduce_kernel,
                    signature={"part_max_ptr": "*fp32", "part_idx_ptr": "*i32", "part_sum_ptr": "*fp32",
                               "n_chunks": "i32", "ids_ptr": "*i64", "ids_stride": "i32", "logprobs_ptr": "*fp32",
                               "logprobs_stride": "i32"},
                    constexprs={"BLOCK_C": cfg["block_c"], "WITH_LOGPROBS": with_lp},
                    num_warps=cfg["reduce_warps"],
                ))
    return specs
