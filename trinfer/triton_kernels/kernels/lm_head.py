"""Fused LM head + greedy sampling: logits are never written to memory.

For hidden states `h [batch, hidden]` and the LM-head weight `W [vocab, hidden]` (dense in h's dtype, or in a
quantized format of `weight_formats.py`, decoded tile by tile in registers as `linear` does; int8's row scale
multiplies the accumulated logit):

    logits[b, v] = round_to_act_dtype( sum_k h[b, k] * W[v, k] )     (fp32 accumulation)

and each program reduces its tile of logits to the partials of `kernels/sampling.py` (chunk max, lowest
index of the max or of the first NaN, sum of exp(x - max)), which `greedy_sample_reduce_kernel` folds into
token ids and log-probabilities. Rounding the fp32 accumulator to the activation dtype before the argmax
(ROUND_LOGITS) reproduces `greedy_sample(h @ W.T)` when the matmul writes logits in that dtype, ties included.

Grid `(batch_tiles, vocab_chunks)`: axis 0 is fastest, so the programs that read the same W chunk run
together and W comes from HBM once whatever the batch. BLOCK_B is fixed (16, the smallest tensor-core tile)
so each row's arithmetic is identical at any batch size: results are batch-invariant.
"""
import triton
import triton.language as tl

from .linear import FMT_INT8, _weight_tile

_NO_INDEX = tl.constexpr(2147483647)


@triton.jit
def lm_head_greedy_partial_kernel(
    h_ptr,            # [batch, hidden] fp16/bf16/fp32 final-normed hidden states, last dim contiguous
    h_row_stride,
    w_ptr,            # [vocab, hidden] LM-head weight data (FORMAT: dense in h's dtype, or quantized), rows contiguous
    w_row_stride,
    s_ptr,            # quantized formats: scales / GGUF bytes as fp16, as for linear_kernel (dense: unused)
    s_row_stride,
    z_ptr,            # int4 zero points (otherwise unused)
    z_row_stride,
    batch,
    vocab,
    hidden,
    part_max_ptr,     # [batch, n_chunks] fp32 out: chunk max (NaN when the chunk holds a NaN)
    part_idx_ptr,     # [batch, n_chunks] int32 out: lowest index of the chunk max (or first NaN)
    part_sum_ptr,     # [batch, n_chunks] fp32 out: sum of exp(x - max) over the chunk (WITH_LOGPROBS)
    n_chunks,
    BLOCK_B: tl.constexpr,        # rows of h per program (16: tensor-core minimum, fixed for batch invariance)
    BLOCK_V: tl.constexpr,        # vocabulary entries per program (= one partial chunk)
    BLOCK_K: tl.constexpr,        # hidden elements per step of the dot-product loop
    ROUND_LOGITS: tl.constexpr,   # round logits to h's dtype before the argmax (matches unfused matmul)
    WITH_LOGPROBS: tl.constexpr,
    IEEE_FP32: tl.constexpr,      # fp32 inputs: full-precision products instead of tf32
    FORMAT: tl.constexpr = 0,     # weight format (kernels/linear.py FMT_*; 0 = dense)
    GROUP: tl.constexpr = 0,      # int4 group size
):
    pid_b = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < batch
    col_ok = cols < vocab
    ks = tl.arange(0, BLOCK_K)
    h_base = h_ptr + rows.to(tl.int64)[:, None] * h_row_stride
    # Swap-AB: the tile is [BLOCK_V, BLOCK_B] = W_chunk @ h_tile^T, so the large vocab side is the MMA's M
    # dimension (wgmma wants M = 64 per warpgroup) and the small batch side is N (16 is enough).
    acc = tl.zeros((BLOCK_V, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + ks
        k_ok = k < hidden
        w = _weight_tile(w_ptr, w_row_stride, s_ptr, s_row_stride, z_ptr, z_row_stride, cols, col_ok, k0, hidden,
                         FORMAT, GROUP, BLOCK_V, BLOCK_K).to(h_ptr.dtype.element_ty)
        h = tl.load(h_base + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE_FP32:
            acc = tl.dot(w, tl.trans(h), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(h), acc)
    if FORMAT == FMT_INT8:
        acc = acc * tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    if ROUND_LOGITS:
        acc = acc.to(h_ptr.dtype.element_ty).to(tl.float32)
    x = tl.where(col_ok[:, None], acc, float("-inf"))
    is_nan = x != x
    first_nan = tl.min(tl.where(is_nan, cols[:, None], _NO_INDEX), axis=0)
    xv = tl.where(is_nan, float("-inf"), x)
    m = tl.max(xv, axis=0)
    first_max = tl.min(tl.where(col_ok[:, None] & (xv == m[None, :]), cols[:, None], _NO_INDEX), axis=0)
    has_nan = first_nan < _NO_INDEX
    out = rows.to(tl.int64) * n_chunks + chunk
    tl.store(part_max_ptr + out, tl.where(has_nan, float("nan"), m), mask=row_ok)
    tl.store(part_idx_ptr + out, tl.where(has_nan, first_nan, first_max), mask=row_ok)
    if WITH_LOGPROBS:
        m_safe = tl.where(tl.abs(m) == float("inf"), 0.0, m)
        tl.store(part_sum_ptr + out, tl.sum(tl.exp(xv - m_safe[None, :]), axis=0), mask=row_ok)
