"""Host wrapper for greedy sampling: argmax token ids, optionally with their log-probabilities.

`greedy_sample` validates its inputs, allocates the outputs when `out` is not given, and calls a torch
custom op (`torch.ops.trinfer.greedy_sample` / `greedy_sample_logprobs`) that launches the two passes of
`kernels/sampling.py`. The ops mutate only the outputs they name (plus a scratch buffer they allocate), so
callers compile with `torch.compile(fullgraph=True)` and the decode step is CUDA-graph capturable with
`out=` pointing at static buffers.
"""
from __future__ import annotations

import torch
import triton

from ._utils import FLOAT_DTYPES, TRITON_DTYPE, AotSpec, check_same, check_tensor
from .kernels.sampling import greedy_sample_partial_kernel, greedy_sample_reduce_kernel

# Logits per program of pass 1. Fixed (not batch-dependent) so results never depend on the batch size;
# 1024 splits a 128K-vocabulary row over ~128 programs, about one per SM of an H100/H200.
_CHUNK = 1024
# Pass 2 keeps all partials of a row in registers: past this many chunks, chunks grow instead.
_MAX_CHUNKS = 1024
# Indices are int32 in the scratch buffer and 2**31 - 1 means "none" in the kernels.
MAX_VOCAB = 1 << 24


def sample_launch_config(vocab: int) -> dict[str, int]:
    """Block sizes and warps of both passes for a vocabulary size (depends on nothing else)."""
    block = max(_CHUNK, triton.next_power_of_2(triton.cdiv(vocab, _MAX_CHUNKS)))
    n_chunks = triton.cdiv(vocab, block)
    block_c = triton.next_power_of_2(n_chunks)
    return dict(
        block=block,
        n_chunks=n_chunks,
        num_warps=min(max(block // 256, 1), 16),
        block_c=block_c,
        reduce_warps=1 if block_c <= 256 else 4,
    )


def _launch(logits: torch.Tensor, out_ids: torch.Tensor, out_logprobs: torch.Tensor | None) -> None:
    batch, vocab = logits.shape
    cfg = sample_launch_config(vocab)
    n_chunks = cfg["n_chunks"]
    with_lp = out_logprobs is not None
    part = torch.empty((2 if with_lp else 1, batch, n_chunks), dtype=torch.float32, device=logits.device)
    part_idx = torch.empty((batch, n_chunks), dtype=torch.int32, device=logits.device)
    part_sum = part[1] if with_lp else part[0]  # unused without logprobs
    greedy_sample_partial_kernel[(batch, n_chunks)](
        logits, logits.stride(0), vocab,
        part[0], part_idx, part_sum, n_chunks,
        BLOCK=cfg["block"], WITH_LOGPROBS=with_lp, num_warps=cfg["num_warps"],
    )
    lp = out_logprobs if with_lp else part[0]  # an fp32 placeholder, never written without logprobs
    greedy_sample_reduce_kernel[(batch,)](
        part[0], part_idx, part_sum, n_chunks,
        out_ids, out_ids.stride(0), lp, lp.stride(0),
        BLOCK_C=cfg["block_c"], WITH_LOGPROBS=with_lp, num_warps=cfg["reduce_warps"],
    )


@torch.library.custom_op("trinfer::greedy_sample", mutates_args=("out_ids",))
def _greedy_sample_op(logits: torch.Tensor, out_ids: torch.Tensor) -> None:
    _launch(logits, out_ids, None)


@_greedy_sample_op.register_fake
def _(logits, out_ids):
    return None


@torch.library.custom_op("trinfer::greedy_sample_logprobs", mutates_args=("out_ids", "out_logprobs"))
def _greedy_sample_logprobs_op(logits: torch.Tensor, out_ids: torch.Tensor, out_logprobs: torch.Tensor) -> None:
    _launch(logits, out_ids, out_logprobs)


@_greedy_sample_logprobs_op.register_fake
def _(logits, out_ids, out_logprobs):
    return None


def _check_out(name: str, t, dtype: torch.dtype, logits: torch.Tensor) -> None:
    check_tensor(name, t, dtypes=(dtype,), ndim=1, device=logits.device)
    check_same(name, tuple(t.shape), (logits.shape[0],), "shape")


def prepare_greedy_sample(
    logits: torch.Tensor, return_logprobs: bool, out: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`greedy_sample`'s every-call checks and outputs (shared with the CUDA backend).

    Returns (ids, logprobs): the buffers of `out`, checked, or new ones when it is None; logprobs is None
    unless `return_logprobs`.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    if not isinstance(return_logprobs, bool):
        raise TypeError(f"return_logprobs: expected a bool, got {type(return_logprobs).__name__}")
    batch, vocab = logits.shape
    if not 1 <= vocab < MAX_VOCAB:
        raise ValueError(f"logits: expected a vocab size (last dim) in [1, {MAX_VOCAB}), got {vocab}")
    if return_logprobs:
        if out is None:
            return (torch.empty(batch, dtype=torch.int64, device=logits.device),
                    torch.empty(batch, dtype=torch.float32, device=logits.device))
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"out: expected a tuple (ids, logprobs) with return_logprobs=True, got "
                            f"{type(out).__name__}")
        out_ids, out_lp = out
        _check_out("out[0] (ids)", out_ids, torch.int64, logits)
        _check_out("out[1] (logprobs)", out_lp, torch.float32, logits)
        return out_ids, out_lp
    if out is None:
        return torch.empty(batch, dtype=torch.int64, device=logits.device), None
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected an int64 tensor with return_logprobs=False, got {type(out).__name__}")
    _check_out("out", out, torch.int64, logits)
    return out, None


def greedy_sample(
    logits: torch.Tensor,
    *,
    return_logprobs: bool = False,
    out: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Greedy next tokens: the index of each row's largest logit, as `torch.argmax(logits, -1)`.

    Ties go to the lowest index; a NaN counts as the largest value (the first NaN wins), as in torch.argmax.
    The result never depends on the batch size or on the other rows.

    Args:
        logits: `[batch, vocab]` fp32/fp16/bf16, last dim contiguous (any row stride), 1 <= vocab < 2**24.
        return_logprobs: also return the fp32 log-probability of each chosen token,
            `logit - logsumexp(row)`, computed from the same single read of the logits.
        out: static output buffers (for CUDA graphs): an int64 `[batch]` tensor, or with
            `return_logprobs=True` a tuple `(ids int64 [batch], logprobs fp32 [batch])`. Written and returned.
    Returns:
        int64 ids `[batch]`, or `(ids, logprobs)` with `return_logprobs=True`.
        Reference: `trinfer.triton_kernels.references.greedy_sample_ref`.
    """
    out_ids, out_lp = prepare_greedy_sample(logits, return_logprobs, out)
    if logits.shape[0]:
        if return_logprobs:
            _greedy_sample_logprobs_op(logits, out_ids, out_lp)
        else:
            _greedy_sample_op(logits, out_ids)
    return (out_ids, out_lp) if return_logprobs else out_ids


def _i32(values) -> str:
    """AOT type of an i32 argument taking these values: "i32:16" when the JIT would mark all divisible by 16."""
    return "i32:16" if all(v % 16 == 0 for v in values) else "i32"


def aot_specs(vocab_sizes=(32000, 49152, 128256, 151936), dtypes=FLOAT_DTYPES) -> list[AotSpec]:
    """The launch configurations `greedy_sample` picks for real vocabulary sizes (each distinct one once)."""
    partial, reduce = {}, {}
    for vocab in vocab_sizes:
        cfg = sample_launch_config(vocab)
        for with_lp in (False, True):
            for dtype in dtypes:
                partial.setdefault((cfg["block"], cfg["num_warps"], dtype, with_lp), []).append(vocab)
            reduce.setdefault((cfg["block_c"], cfg["reduce_warps"], with_lp), []).append(vocab)
    specs = []
    for (block, warps, dtype, with_lp), vocabs in partial.items():
        specs.append(AotSpec(
            name=f"greedy_sample_partial[v={'/'.join(map(str, vocabs))},{TRITON_DTYPE[dtype]},lp={int(with_lp)}]",
            fn=greedy_sample_partial_kernel,
            # A contiguous [batch, vocab] row stride is vocab; "i32:16" where the JIT would mark it so. The
            # logprob partials start batch * n_chunks floats into the scratch buffer: maybe not 16-byte aligned.
            signature={"logits_ptr": "*" + TRITON_DTYPE[dtype], "logits_row_stride": _i32(vocabs),
                       "vocab": _i32(vocabs), "part_max_ptr": "*fp32", "part_idx_ptr": "*i32",
                       "part_sum_ptr": "*fp32:1", "n_chunks": "i32"},
            constexprs={"BLOCK": block, "WITH_LOGPROBS": with_lp},
            num_warps=warps,
        ))
    for (block_c, warps, with_lp), vocabs in reduce.items():
        specs.append(AotSpec(
            name=f"greedy_sample_reduce[v={'/'.join(map(str, vocabs))},lp={int(with_lp)}]",
            fn=greedy_sample_reduce_kernel,
            signature={"part_max_ptr": "*fp32", "part_idx_ptr": "*i32", "part_sum_ptr": "*fp32:1", "n_chunks": "i32",
                       "ids_ptr": "*i64", "ids_stride": "i32", "logprobs_ptr": "*fp32", "logprobs_stride": "i32"},
            constexprs={"BLOCK_C": block_c, "WITH_LOGPROBS": with_lp},
            num_warps=warps,
        ))
    return specs
