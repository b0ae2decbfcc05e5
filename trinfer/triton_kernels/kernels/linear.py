"""Decode-sized matrix products `y = x @ W^T (+ bias)` that stream each weight once, and weight dequantization.

Formats (the layouts are defined in `trinfer.triton_kernels.weight_formats`): FORMAT 0 dense (W in x's dtype),
1 int8 per-row scales, 2 int4 groups with scales and zero points, 3/4/5 GGUF Q8_0/Q4_0/Q4_1 blocks.

linear_kernel, for x `[M, K]` (M <= 16 * M_TILES <= 64), W `[N, K]`, y `[M, N]`:

    y[m, n] = round_to_y_dtype( sum_k x[m, k] * W[n, k]  (+ bias[n]) )          (fp32 accumulation)

Grid `(cdiv(N, BLOCK_N),)`: a program owns BLOCK_N output columns, streams their rows of W once (each
`[BLOCK_N, BLOCK_K]` tile decoded to x's dtype in registers) and multiplies every tile by all M rows of x. Rows
go in fixed tiles of 16 (the smallest tensor-core tile; one accumulator per tile) and K is walked in the same
BLOCK_K steps whatever M is, so each output element sees the same operations in the same order alone or in
any batch, at any row position: results are bitwise batch-invariant. The dot is swap-AB, `W_tile @ x_tile^T`,
so the large N side is the MMA's M dimension. int8 applies its per-row scale once, in the epilogue.

dequantize_kernel writes the dense `[N, K]` matrix (fp32 math, rounded to the output dtype once).
"""
import triton
import triton.language as tl

FMT_DENSE = tl.constexpr(0)
FMT_INT8 = tl.constexpr(1)
FMT_INT4 = tl.constexpr(2)
FMT_Q8_0 = tl.constexpr(3)
FMT_Q4_0 = tl.constexpr(4)
FMT_Q4_1 = tl.constexpr(5)

ROW_TILE = tl.constexpr(16)  # rows of x per accumulator (fixed: batch invariance)


@triton.jit
def _weight_tile(w_ptr, w_stride_n, s_ptr, s_stride_n, z_ptr, z_stride_n, cols, col_ok, k0, K,
                 FORMAT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[cols, k0:k0 + BLOCK_K] decoded: `[BLOCK_N, BLOCK_K]`, fp32 for quantized formats (int8: q alone, without
    its row scale), W's own dtype for dense; 0 outside N and K. (One branch per format, one return: the compiler
    would also build the code after a return inside a constexpr branch.)"""
    n64 = cols.to(tl.int64)[:, None]
    if FORMAT == FMT_INT4:
        # 8 weights per int32 word along K: load the words (contiguous), split them into 4-bit fields.
        WORDS: tl.constexpr = BLOCK_K // 8
        wk = k0 // 8 + tl.arange(0, WORDS)
        ok = col_ok[:, None] & (wk * 8 < K)[None, :]
        words = tl.load(w_ptr + n64 * w_stride_n + wk[None, :], mask=ok, other=0)
        q = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
        g = (wk * 8 // GROUP)[None, :]  # a word never straddles two groups (GROUP % 8 == 0)
        s = tl.load(s_ptr + n64 * s_stride_n + g, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n64 * z_stride_n + g, mask=ok, other=0).to(tl.float32)
        w = tl.reshape((q.to(tl.float32) - z[:, :, None]) * s[:, :, None], (BLOCK_N, BLOCK_K))
    elif FORMAT == FMT_DENSE or FORMAT == FMT_INT8:
        k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + n64 * w_stride_n + k[None, :], mask=col_ok[:, None] & (k < K)[None, :], other=0)
        if FORMAT == FMT_INT8:
            w = w.to(tl.float32)
    else:
        # GGUF: BLOCK_K // 32 blocks of 32 weights per row; s_ptr views the same bytes as fp16 (d, then m for Q4_1).
        NB: tl.constexpr = BLOCK_K // 32
        b = k0 // 32 + tl.arange(0, NB)
        ok = col_ok[:, None] & (b * 32 < K)[None, :]                   # [BLOCK_N, NB]
        if FORMAT == FMT_Q8_0:  # 34 bytes: fp16 d | 32 int8 q
            j = tl.arange(0, 32)[None, None, :]
            q = tl.load(w_ptr + n64[:, :, None] * w_stride_n + (b * 34 + 2)[None, :, None] + j,
                        mask=ok[:, :, None], other=0).to(tl.float32)
            d = tl.load(s_ptr + n64 * s_stride_n + (b * 17)[None, :], mask=ok, other=0.0).to(tl.float32)
            w = tl.reshape(q * d[:, :, None], (BLOCK_N, BLOCK_K))
        else:  # Q4_0 / Q4_1: after the header, 16 bytes; byte j holds weight j (low nibble) and j + 16 (high)
            HEAD: tl.constexpr = 2 if FORMAT == FMT_Q4_0 else 4
            BYTES: tl.constexpr = 18 if FORMAT == FMT_Q4_0 else 20
            j = tl.arange(0, 16)[None, None, :]
            byte = tl.load(w_ptr + n64[:, :, None] * w_stride_n + (b * BYTES + HEAD)[None, :, None] + j,
                           mask=ok[:, :, None], other=0)                 # [BLOCK_N, NB, 16] uint8
            shift = (tl.arange(0, 2) * 4).to(tl.uint8)[None, None, :, None]
            q = ((byte[:, :, None, :] >> shift) & 0xF).to(tl.float32)  # [BLOCK_N, NB, 2, 16]: low, high
            d = tl.load(s_ptr + n64 * s_stride_n + (b * (BYTES // 2))[None, :], mask=ok, other=0.0).to(tl.float32)
            if FORMAT == FMT_Q4_0:
                w = (q - 8.0) * d[:, :, None, None]
            else:
                m = tl.load(s_ptr + n64 * s_stride_n + (b * (BYTES // 2) + 1)[None, :], mask=ok,
                            other=0.0).to(tl.float32)
                w = q * d[:, :, None, None] + m[:, :, None, None]
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def _mma(w, x_ptr, x_stride_m, x_stride_k, M, tile, k, k_ok, acc, IEEE_FP32: tl.constexpr):
    """acc `[BLOCK_N, 16]` += w `[BLOCK_N, BLOCK_K]` @ x[16*tile : 16*tile + 16, k]^T (rows past M read as 0)."""
    rows = tile * ROW_TILE + tl.arange(0, ROW_TILE)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * x_stride_m + k.to(tl.int64)[None, :] * x_stride_k,
                mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
    if IEEE_FP32:
        return tl.dot(w, tl.trans(x), acc, input_precision="ieee")
    return tl.dot(w, tl.trans(x), acc)


@triton.jit
def _store_rows(acc, tile, cols, col_ok, M, s_ptr, b_ptr, y_ptr, y_stride_m,
                FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y[16*tile + r, cols] = acc[:, r] (* int8 row scale) (+ bias), in y's dtype."""
    if FORMAT == FMT_INT8:
        acc = acc * tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    rows = tile * ROW_TILE + tl.arange(0, ROW_TILE)
    tl.store(y_ptr + rows.to(tl.int64)[None, :] * y_stride_m + cols[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=col_ok[:, None] & (rows < M)[None, :])


@triton.jit
def linear_kernel(
    x_ptr,            # [M, K] fp32/fp16/bf16 activations (any strides)
    x_stride_m,
    x_stride_k,
    M,
    N,
    K,
    w_ptr,            # weight data (weight_formats): dense/int8 [N, K], int4 int32 words, GGUF bytes (Q8_0 as int8)
    w_stride_n,       # elements of w_ptr's type between rows
    s_ptr,            # scales: int8 [N], int4 [N, groups]; GGUF: the block bytes viewed as fp16 (unused: dense)
    s_stride_n,
    z_ptr,            # int4 zero points uint8 [N, groups] (unused otherwise)
    z_stride_n,
    b_ptr,            # [N] bias in y's dtype (HAS_BIAS)
    y_ptr,            # [M, N] out, x's dtype, last dim contiguous
    y_stride_m,
    FORMAT: tl.constexpr,     # FMT_* above
    GROUP: tl.constexpr,      # int4 group size along K (32/64/128)
    HAS_BIAS: tl.constexpr,
    M_TILES: tl.constexpr,    # cdiv(M, 16), 1..4: one accumulator per tile of 16 rows
    BLOCK_N: tl.constexpr,    # output columns per program
    BLOCK_K: tl.constexpr,    # K step (fixed per weight shape, never per M)
    IEEE_FP32: tl.constexpr,  # fp32 activations: full-precision products instead of tf32
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc0 = tl.zeros((BLOCK_N, ROW_TILE), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, ROW_TILE), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, ROW_TILE), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, ROW_TILE), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _weight_tile(w_ptr, w_stride_n, s_ptr, s_stride_n, z_ptr, z_stride_n, cols, col_ok, k0, K,
                         FORMAT, GROUP, BLOCK_N, BLOCK_K).to(x_ptr.dtype.element_ty)
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        acc0 = _mma(w, x_ptr, x_stride_m, x_stride_k, M, 0, k, k_ok, acc0, IEEE_FP32)
        if M_TILES > 1:
            acc1 = _mma(w, x_ptr, x_stride_m, x_stride_k, M, 1, k, k_ok, acc1, IEEE_FP32)
        if M_TILES > 2:
            acc2 = _mma(w, x_ptr, x_stride_m, x_stride_k, M, 2, k, k_ok, acc2, IEEE_FP32)
        if M_TILES > 3:
            acc3 = _mma(w, x_ptr, x_stride_m, x_stride_k, M, 3, k, k_ok, acc3, IEEE_FP32)
    _store_rows(acc0, 0, cols, col_ok, M, s_ptr, b_ptr, y_ptr, y_stride_m, FORMAT, HAS_BIAS)
    if M_TILES > 1:
        _store_rows(acc1, 1, cols, col_ok, M, s_ptr, b_ptr, y_ptr, y_stride_m, FORMAT, HAS_BIAS)
    if M_TILES > 2:
        _store_rows(acc2, 2, cols, col_ok, M, s_ptr, b_ptr, y_ptr, y_stride_m, FORMAT, HAS_BIAS)
    if M_TILES > 3:
        _store_rows(acc3, 3, cols, col_ok, M, s_ptr, b_ptr, y_ptr, y_stride_m, FORMAT, HAS_BIAS)


@triton.jit
def dequantize_kernel(
    w_ptr,            # weight data, as for linear_kernel
    w_stride_n,
    s_ptr,            # scales / GGUF bytes as fp16, as for linear_kernel
    s_stride_n,
    z_ptr,            # int4 zero points
    z_stride_n,
    N,
    K,
    out_ptr,          # [N, K] out (fp32/fp16/bf16), last dim contiguous
    out_stride_n,
    FORMAT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[n, k] = W[n, k] (fp32, then one rounding to out's dtype). Grid `(cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))`."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k0 = tl.program_id(1) * BLOCK_K
    w = _weight_tile(w_ptr, w_stride_n, s_ptr, s_stride_n, z_ptr, z_stride_n, cols, col_ok, k0, K,
                     FORMAT, GROUP, BLOCK_N, BLOCK_K).to(tl.float32)
    if FORMAT == FMT_INT8:
        w = w * tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + cols.to(tl.int64)[:, None] * out_stride_n + k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=col_ok[:, None] & (k < K)[None, :])
