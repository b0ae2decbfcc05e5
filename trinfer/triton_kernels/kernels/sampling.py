"""Greedy sampling (argmax over the vocabulary) with an optional log-probability, in two passes.

    ids[b]      = argmax_v logits[b, v]     (ties -> lowest v; a NaN counts as the maximum, the first NaN wins)
    logprob[b]  = logits[b, ids[b]] - logsumexp_v logits[b, v]     (fp32)

exactly as `torch.argmax` and `logits.float()[ids] - torch.logsumexp(logits.float(), -1)` (the reference
`references.greedy_sample_ref`). Logits are fp32/fp16/bf16 `[batch, vocab]`, read once.

Pass 1 (`greedy_sample_partial_kernel`, grid `(batch, n_chunks)`) splits each row into chunks of BLOCK
logits, so that at batch 1 a 128K-vocabulary row is read by ~128 programs at once. Each program writes one
partial: (chunk max, lowest index of it, sum of exp(x - chunk max)). A chunk holding a NaN reports max = NaN
and the index of its first NaN. Pass 2 (`greedy_sample_reduce_kernel`, grid `(batch,)`) folds the partials
of a row in a fixed order. The chunking depends on the vocabulary only, so ids never depend on the split
and log-probabilities are bit-identical whatever the batch size.

Infinite maxima follow torch.logsumexp: a max of +-inf is replaced by 0 before subtracting, so a row of all
-inf gives logprob NaN (-inf - -inf) and a row with +inf gives NaN, as the reference does.
"""
import triton
import triton.language as tl

# Larger than any index: vocabularies are limited to < 2**24 by the wrapper.
_NO_INDEX = tl.constexpr(2147483647)


@triton.jit
def _argmax(x, idx, mask):
    """torch.argmax over axis 0 of a block: values `x` at indices `idx`, `mask` the real entries (others -inf).

    Returns (xv, m, arg, has_nan): x with NaNs as -inf, its max, the lowest index of that max among `mask` or,
    when x holds a NaN (it counts as the maximum), the lowest index of a NaN, and whether it does.
    """
    is_nan = x != x
    first_nan = tl.min(tl.where(is_nan, idx, _NO_INDEX), axis=0)
    xv = tl.where(is_nan, float("-inf"), x)
    m = tl.max(xv, axis=0)
    first_max = tl.min(tl.where(mask & (xv == m), idx, _NO_INDEX), axis=0)
    has_nan = first_nan < _NO_INDEX
    return xv, m, tl.where(has_nan, first_nan, first_max), has_nan


@triton.jit
def greedy_sample_partial_kernel(
    logits_ptr,         # [batch, vocab] fp32/fp16/bf16, last dim contiguous
    logits_row_stride,  # elements between rows of logits
    vocab,              # number of logits per row
    part_max_ptr,       # [batch, n_chunks] fp32 out: chunk max (NaN when the chunk holds a NaN)
    part_idx_ptr,       # [batch, n_chunks] int32 out: lowest index of the chunk max (or of its first NaN)
    part_sum_ptr,       # [batch, n_chunks] fp32 out: sum over the chunk of exp(x - safe max) (WITH_LOGPROBS only)
    n_chunks,           # chunks per row = cdiv(vocab, BLOCK)
    BLOCK: tl.constexpr,          # logits per program (power of two)
    WITH_LOGPROBS: tl.constexpr,  # also accumulate the sum of exponentials for logsumexp
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    x = tl.load(logits_ptr + row * logits_row_stride + cols, mask=mask, other=float("-inf")).to(tl.float32)
    # The mask keeps out-of-range -inf padding out of the index of an all -inf chunk.
    xv, m, arg, has_nan = _argmax(x, cols, mask)
    out = row * n_chunks + chunk
    tl.store(part_max_ptr + out, tl.where(has_nan, float("nan"), m))
    tl.store(part_idx_ptr + out, arg)
    if WITH_LOGPROBS:
        m_safe = tl.where(tl.abs(m) == float("inf"), 0.0, m)
        tl.store(part_sum_ptr + out, tl.sum(tl.exp(xv - m_safe), axis=0))


@triton.jit
def greedy_sample_reduce_kernel(
    part_max_ptr,      # [batch, n_chunks] fp32 partial maxima from pass 1
    part_idx_ptr,      # [batch, n_chunks] int32 partial indices
    part_sum_ptr,      # [batch, n_chunks] fp32 partial sums of exponentials (WITH_LOGPROBS only)
    n_chunks,
    ids_ptr,           # [batch] int64 out: chosen token ids
    ids_stride,
    logprobs_ptr,      # [batch] fp32 out: log-probability of the chosen token (WITH_LOGPROBS only)
    logprobs_stride,
    BLOCK_C: tl.constexpr,        # power of two >= n_chunks: all partials of a row in registers
    WITH_LOGPROBS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < n_chunks
    base = row * n_chunks
    pm = tl.load(part_max_ptr + base + c, mask=mask, other=float("-inf"))
    pi = tl.load(part_idx_ptr + base + c, mask=mask, other=_NO_INDEX)
    # Chunks hold increasing index ranges, so the lowest index among tied chunk maxima is the row's first max
    # (and the lowest index of a NaN chunk the row's first NaN).
    pmv, big, arg, has_nan = _argmax(pm, pi, mask)
    tl.store(ids_ptr + row * ids_stride, arg.to(tl.int64))
    if WITH_LOGPROBS:
        ps = tl.load(part_sum_ptr + base + c, mask=mask, other=0.0)
        big_safe = tl.where(tl.abs(big) == float("inf"), 0.0, big)
        m_safe = tl.where(tl.abs(pmv) == float("inf"), 0.0, pmv)
        # Chunks whose sum is 0 (all -inf) add nothing, even where exp(m_safe - big_safe) would overflow.
        total = tl.sum(tl.where(ps > 0.0, ps * tl.exp(m_safe - big_safe), 0.0), axis=0)
        # logit - (log(total) + big_safe) with logit = big, rearranged so a finite max cancels exactly.
        lp = (big - big_safe) - tl.log(total)
        tl.store(logprobs_ptr + row * logprobs_stride, tl.where(has_nan, float("nan"), lp))
