"""SiLU-and-multiply, the gated activation of a Llama MLP.

    out[r, j] = rnd(rnd(silu(gate)) * up),  gate = x[r, j], up = x[r, I + j],  silu(g) = g / (1 + exp(-g))

with silu and the product computed in fp32 and each rounded to the input dtype: the casts of Hugging Face's
`act_fn(gate_proj(x)) * up_proj(x)` in the model dtype (torch evaluates fp16/bf16 silu in fp32 and rounds,
then the multiply rounds again). x `[rows, 2 * I]` fp32/fp16/bf16, out `[rows, I]` of x's dtype.
Grid `(rows, cdiv(I, BLOCK))`. Reference: `references.silu_and_mul_ref`.
"""
import triton
import triton.language as tl


@triton.jit
def silu_and_mul_kernel(
    x_ptr,            # [rows, 2 * n_cols] gate then up (fp32/fp16/bf16), last dim contiguous
    x_row_stride,     # elements between rows of x
    out_ptr,          # [rows, n_cols] output, x's dtype, last dim contiguous
    out_row_stride,
    n_cols,           # the intermediate size I
    BLOCK: tl.constexpr,  # columns per program (power of two)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + row * x_row_stride
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (act * up).to(dt), mask=mask)
