"""RMSNorm and fused residual-add + RMSNorm, one row per program.

    y = weight * cast_to_input_dtype(x_fp32 * rsqrt(mean(x_fp32^2) + eps))

the casts of Hugging Face's LlamaRMSNorm. With HAS_RESIDUAL the program first computes
x = x + residual in the input dtype, stores it back to `residual`, and normalizes that sum.
"""
import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr,            # [rows, n_cols] input (fp32/fp16/bf16), last dim contiguous
    x_row_stride,     # elements between rows of x
    res_ptr,          # [rows, n_cols] residual, read and overwritten with x + residual (HAS_RESIDUAL only)
    res_row_stride,
    w_ptr,            # [n_cols] weight, same dtype as x
    out_ptr,          # [rows, n_cols] output, same dtype as x
    out_row_stride,
    n_cols,           # hidden size
    eps,              # fp32 epsilon added to the mean square
    BLOCK: tl.constexpr,         # power of two >= n_cols: the whole row lives in registers
    HAS_RESIDUAL: tl.constexpr,  # fused add: one pass over memory for the pre-norm residual stream
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the storage dtype, as `residual = residual + x` does in the model dtype.
        summed = (x + r).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * res_row_stride + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)
