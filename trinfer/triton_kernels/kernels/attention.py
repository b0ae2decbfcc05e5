"""Attention over the paged KV cache: causal prefill/extend (optionally split over keys, with its reduce), split-KV
decode, and the decode reduce.

Cache layout: `trinfer.triton_kernels.kv_cache_layout` (`[num_blocks, block_size, kv_heads, head_dim]` per layer,
`block_tables [batch, max_blocks]` int32). Every kernel computes, per query row of head `h` at position `p`,

    out = sum_j softmax_j(scale * q . k_j) v_j      over the keys j <= p of the row's sequence,
                                                    with k_j, v_j of KV head h // (q_heads // kv_heads)

as a flash-attention style online softmax in fp32 (scores in the log2 domain, `exp2`), `tl.dot` on the
input dtype (fp16/bf16 tensor cores; fp32 in IEEE precision), the probabilities cast to the V dtype for the
P @ V product, and the score matrix never materialized. Key tiles are gathered page by page through the
block table (int64 cache offsets); a tile never touches a block-table entry or a slot at or past the
sequence's length. References: `references.paged_prefill_attention_ref`, `references.paged_decode_attention_ref`.

GQA: one program serves several query heads of the same KV head, packed as rows of its query tile, so each
K/V tile is loaded once for all of them.
"""
import triton
import triton.language as tl


@triton.jit
def _load_rows(base, row_off, offs_d, rows_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile `base + row_off[:, None] + offs_d[None, :]`, zero past HEAD_DIM / bad rows."""
    ptrs = base + row_off[:, None] + offs_d[None, :]
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _attend_tile(
    acc, l_i, m_i,          # running output [M, BLOCK_D] fp32, row sums [M], row maxima [M] (log2 domain)
    q,                      # [M, BLOCK_D] query tile, input dtype
    q_pos,                  # [M] position of each query row in its sequence (causal mask)
    k_base, v_base,         # cache pointers already offset to the KV head
    bt_row,                 # pointer to the sequence's block-table row
    start_n, kv_end,        # first key of this tile; keys >= kv_end are masked (MASK_KV only)
    stride_kb, stride_ks, stride_vb, stride_vs,
    block_size, qk_scale,   # tokens per cache block; softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KV: tl.constexpr,  # the tile may hold keys >= kv_end (the last tile) or past a query (diagonal)
    CAUSAL: tl.constexpr,   # mask keys after each row's q_pos (MASK_KV tiles only)
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tok = start_n + offs_n
    tok_ok = tok < kv_end
    # One block-table entry per key (a handful of distinct entries per tile, cached), then whole rows.
    if MASK_KV:
        blk = tl.load(bt_row + tok // block_size, mask=tok_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + tok // block_size).to(tl.int64)
    in_blk = tok % block_size
    k = _load_rows(k_base, blk * stride_kb + in_blk * stride_ks, offs_d, tok_ok, HEAD_DIM, BLOCK_D, MASK_KV)
    qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    if MASK_KV:
        keep = tok_ok[None, :]
        if CAUSAL:
            keep = keep & (tok[None, :] <= q_pos[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASK_KV:
        # A row with no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_base, blk * stride_vb + in_blk * stride_vs, offs_d, tok_ok, HEAD_DIM, BLOCK_D, MASK_KV)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, l_i, m_new


@triton.jit
def _attend_keys(
    q, q_pos,               # [M, BLOCK_D] query tile (input dtype); [M] position of each row (CAUSAL only)
    k_cache_ptr, stride_kb, stride_ks, stride_kh,
    v_cache_ptr, stride_vb, stride_vs, stride_vh,
    bt_ptr, stride_bt,
    seq, kv_head,           # the sequence (its block-table row) and the KV head the tile attends to
    lo, full_end, hi,       # keys [lo, full_end) in unmasked tiles, then [full_end, hi) in masked ones
    kv_end,                 # keys >= kv_end are masked
    block_size, qk_scale,
    M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Online softmax of the query tile over keys [lo, hi) of its sequence: (acc, l_i, m_i), unnormalized."""
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    acc = tl.zeros([M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    for start_n in range(lo, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, q_pos, k_base, v_base, bt_row, start_n, kv_end,
                                     stride_kb, stride_ks, stride_vb, stride_vs, block_size, qk_scale,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, q_pos, k_base, v_base, bt_row, start_n, kv_end,
                                     stride_kb, stride_ks, stride_vb, stride_vs, block_size, qk_scale,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL)
    return acc, l_i, m_i


@triton.jit
def _store_partial(part_o_ptr, part_lse_ptr, part, acc, l_i, m_i, offs_d, rows_ok, HEAD_DIM: tl.constexpr):
    """Store a split's normalized output `acc / l` ([rows, HEAD_DIM] fp32 at `part_o_ptr + part * HEAD_DIM`) and its
    log2-sum-exp2 `m + log2(l)` (-inf for a row that saw no key of the split) at `part_lse_ptr + part`."""
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o,
             mask=rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    # The log-sum-exp through the same 2-D layout as o (column 0 only): no layout conversion, fewer registers.
    lse = (m_i + tl.log2(l_safe))[:, None] + tl.zeros_like(o)
    tl.store(part_lse_ptr + part[:, None] + 0 * offs_d[None, :], lse, mask=rows_ok[:, None] & (offs_d[None, :] == 0))


# Values that change from step to step (table width, capacity, grid bounds) are not specialized, so that a
# growing context never triggers a recompile mid-generation (the JIT would otherwise specialize ints == 1
# and multiples of 16).
@triton.jit(do_not_specialize=["stride_bt", "capacity"])
def paged_prefill_attention_kernel(
    q_ptr,              # [total_q, q_heads, head_dim] packed queries of all sequences, last dim contiguous
    stride_qt, stride_qh,
    k_cache_ptr,        # [num_blocks, block_size, kv_heads, head_dim] K cache
    stride_kb, stride_ks, stride_kh,
    v_cache_ptr,        # [num_blocks, block_size, kv_heads, head_dim] V cache
    stride_vb, stride_vs, stride_vh,
    bt_ptr,             # [batch, max_blocks] int32 block tables
    stride_bt,
    cu_seqlens_ptr,     # [batch + 1] int32 cumulative query lengths (cu[0] = 0)
    kv_lens_ptr,        # [batch] int32 total keys of each sequence (cached prefix + new tokens), >= q_len
    out_ptr,            # [total_q, q_heads, head_dim] output, q's dtype
    stride_ot, stride_oh,
    kv_splits_ptr,      # SPLIT: [batch] int32 KV splits of each sequence (1: not split, written to out)
    part_base_ptr,      # SPLIT: [batch] int32 first partial row of each sequence (sum of q_len * splits before)
    part_o_ptr,         # SPLIT: [partials, head_dim] fp32 normalized partial outputs, partial = row/head/split
    part_lse_ptr,       # SPLIT: [partials] fp32 their log2-sum-exp2
    num_q_heads,
    block_size,         # tokens per cache block
    capacity,           # max_blocks * block_size: kv_lens are clamped to it (never read past the table)
    qk_scale,           # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,   # model constant; sets the tile width
    BLOCK_D: tl.constexpr,    # next power of two >= HEAD_DIM
    GROUP: tl.constexpr,      # query heads per KV head
    HEADS: tl.constexpr,      # query heads per program (divides GROUP), packed as rows with the tokens
    BLOCK_M: tl.constexpr,    # query rows per program: BLOCK_M // HEADS tokens x HEADS heads
    BLOCK_N: tl.constexpr,    # keys per inner step
    SPLIT: tl.constexpr,      # some sequence is split over its keys (reads kv_splits; else none is)
):
    """Causal attention of packed variable-length queries to their sequence's paged keys.

    Query i of a sequence with q_len queries and kv_len keys sits at position kv_len - q_len + i and attends
    to keys 0 .. kv_len - q_len + i (fresh prompt: kv_len == q_len; continuation/chunk: kv_len > q_len).

    KV split (SPLIT): sequence seq cuts its keys into S = kv_splits[seq] ranges of L = BLOCK_N *
    cdiv(cdiv(kv_len, S), BLOCK_N) keys; the program of (query tile, split s) attends its rows to the keys of
    [s L, (s + 1) L) they may see and stores the normalized partial output and its log2-sum-exp2 (-inf for a
    range a row cannot see) for `paged_prefill_reduce_kernel`, which writes `out`. Partial of (row t, head h,
    split s): part_base[seq] * num_q_heads + (t * num_q_heads + h) * S + s. With S = 1 the partial is the
    unsplit program's normalized output and the reduce's weight is exp2(0) = 1: the same bits, so a sequence's
    output never depends on whether another sequence of the batch is split. (Every sequence of a SPLIT launch
    goes through the partials: one store path keeps the kernel within its registers.)

    Grid: (q_heads // HEADS, cdiv(max_q_len, BLOCK_M // HEADS) [* max S when SPLIT], batch); programs past a
    sequence's query tiles (times its splits) exit.
    """
    TOKENS: tl.constexpr = BLOCK_M // HEADS
    pid_h = tl.program_id(0)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if SPLIT:
        n_split = tl.load(kv_splits_ptr + seq)
        q_tiles = tl.cdiv(q_len, TOKENS)
        work = tl.program_id(1)
        if work >= q_tiles * n_split:
            return
        pid_m = q_tiles - 1 - work // n_split  # the longest causal rows first
        split = work % n_split
    else:
        n_split = 1
        split = 0
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest causal rows first: less tail at the end
    m_tok = pid_m * TOKENS
    if m_tok >= q_len:
        return
    kv_len = tl.minimum(tl.load(kv_lens_ptr + seq), capacity)
    prefix = kv_len - q_len

    head0 = pid_h * HEADS
    kv_head = head0 // GROUP
    r = tl.arange(0, BLOCK_M)
    t = m_tok + r // HEADS
    h = head0 + r % HEADS
    row_ok = (r < TOKENS * HEADS) & (t < q_len)
    q_pos = prefix + t
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = (q_start + t).to(tl.int64) * stride_qt + h * stride_qh
    q = _load_rows(q_ptr, q_rows, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)

    # Keys before the tile's first query position are visible to every row: no mask at all.
    full_end = tl.maximum(prefix + m_tok + 1, 0) // BLOCK_N * BLOCK_N
    # Keys any row of the tile may see: up to its last real query.
    hi = tl.minimum(kv_len, prefix + tl.minimum(m_tok + TOKENS, q_len))
    lo = 0
    if SPLIT:  # this program's key range (all of them when the sequence has one split)
        split_len = tl.cdiv(tl.cdiv(kv_len, n_split), BLOCK_N) * BLOCK_N
        lo = tl.multiple_of(split * split_len, BLOCK_N)
        split_end = lo + split_len
        hi = tl.minimum(hi, split_end)
        full_end = tl.multiple_of(tl.maximum(tl.minimum(full_end, split_end), lo), BLOCK_N)
    acc, l_i, m_i = _attend_keys(q, q_pos, k_cache_ptr, stride_kb, stride_ks, stride_kh,
                                 v_cache_ptr, stride_vb, stride_vs, stride_vh, bt_ptr, stride_bt, seq, kv_head,
                                 lo, full_end, hi, kv_len, block_size, qk_scale,
                                 BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, True)

    if SPLIT:  # the split's indices read again here rather than kept live across the key loop (registers)
        n_split = tl.load(kv_splits_ptr + seq)
        part = (tl.load(part_base_ptr + seq).to(tl.int64) * num_q_heads
                + (t.to(tl.int64) * num_q_heads + h) * n_split + tl.program_id(1) % n_split)
        _store_partial(part_o_ptr, part_lse_ptr, part, acc, l_i, m_i, offs_d, row_ok, HEAD_DIM)
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # a row that saw no key (invalid lengths) writes zeros, not NaN
        o = (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty)
        o_rows = (q_start + t).to(tl.int64) * stride_ot + h * stride_oh
        o_ptrs = out_ptr + o_rows[:, None] + offs_d[None, :]
        tl.store(o_ptrs, o, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def paged_prefill_reduce_kernel(
    part_o_ptr,         # [partials, head_dim] fp32 normalized partial outputs (paged_prefill_attention_kernel)
    part_lse_ptr,       # [partials] fp32 their log2-sum-exp2
    cu_seqlens_ptr,     # [batch + 1] int32 cumulative query lengths
    kv_splits_ptr,      # [batch] int32 KV splits of each sequence
    part_base_ptr,      # [batch] int32 first partial row of each sequence
    out_ptr,            # [total_q, q_heads, head_dim] output, q's dtype
    stride_ot, stride_oh,
    num_q_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,    # query heads per program
):
    """KV-split prefill, phase 2: out = sum_s w_s o_s / sum_s w_s, w_s = exp2(lse_s - max lse), in split order.

    One program per (query row, sequence, BLOCK_H query heads); every sequence of the launch (one split: the
    merge of a single partial gives it back unchanged). Grid: (max_q_len, batch, cdiv(q_heads, BLOCK_H)).
    """
    t = tl.program_id(0)
    seq = tl.program_id(1)
    q_start = tl.load(cu_seqlens_ptr + seq)
    if t >= tl.load(cu_seqlens_ptr + seq + 1) - q_start:
        return
    n_split = tl.load(kv_splits_ptr + seq)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < num_q_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    base = tl.load(part_base_ptr + seq).to(tl.int64) * num_q_heads + (t * num_q_heads + h).to(tl.int64) * n_split
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for s in range(0, n_split):  # split 0 has seen a key: the running max is finite from the first step on
        lse = tl.load(part_lse_ptr + base + s, mask=h_ok, other=0.0)
        o = tl.load(part_o_ptr + (base + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=h_ok[:, None] & d_ok[None, :],
                    other=0.0)
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse - m_new)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m_i = m_new
    o_ptrs = out_ptr + (q_start + t).to(tl.int64) * stride_ot + (h * stride_oh)[:, None] + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["stride_bt", "max_splits", "capacity"])
def paged_decode_split_kernel(
    q_ptr,              # [batch, q_heads, head_dim] one query token per sequence, last dim contiguous
    stride_qb, stride_qh,
    k_cache_ptr,        # [num_blocks, block_size, kv_heads, head_dim] K cache
    stride_kb, stride_ks, stride_kh,
    v_cache_ptr,        # [num_blocks, block_size, kv_heads, head_dim] V cache
    stride_vb, stride_vs, stride_vh,
    bt_ptr,             # [batch, max_blocks] int32 block tables
    stride_bt,
    seq_lens_ptr,       # [batch] int32 keys of each sequence (including the current token); 0 = padding row
    out_ptr,            # [batch, q_heads, head_dim] output (written here when the sequence has one split)
    stride_ob, stride_oh,
    part_o_ptr,         # [batch, q_heads, max_splits, head_dim] fp32 workspace: normalized partial outputs
    part_lse_ptr,       # [batch, q_heads, max_splits] fp32 workspace: partial log2-sum-exp2 of the scores
    num_q_heads,
    max_splits,         # grid size along splits (host bound, independent of seq_lens' contents)
    split_tokens,       # keys per split: a fixed multiple of BLOCK_N, never derived from the batch
    block_size,         # tokens per cache block
    capacity,           # min(max_blocks * block_size, max_splits * split_tokens): seq_lens are clamped to it
    qk_scale,           # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,      # query heads per KV head
    BLOCK_G: tl.constexpr,    # query-head rows per program (>= 16 for tl.dot), padding rows masked
    BLOCK_N: tl.constexpr,    # keys per inner step
):
    """Flash-decoding, phase 1: program (split, seq, kv-head tile) attends BLOCK_G query heads to one split.

    Split s covers keys [s * split_tokens, (s + 1) * split_tokens) of the sequence; programs past the
    sequence's last split exit. A sequence with one split writes `out` directly; otherwise each split writes
    its normalized output and log2-sum-exp2 for `paged_decode_reduce_kernel`. A sequence of length 0 writes
    zeros. The result depends only on the sequence's own data (bitwise batch invariance).
    Grid: (max_splits, batch, kv_heads * cdiv(GROUP, BLOCK_G)).
    """
    G_TILES: tl.constexpr = (GROUP + BLOCK_G - 1) // BLOCK_G
    split = tl.program_id(0)
    seq = tl.program_id(1)
    pid_g = tl.program_id(2)
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), capacity)
    n_splits = tl.cdiv(seq_len, split_tokens)
    if split >= tl.maximum(n_splits, 1):
        return
    kv_head = pid_g // G_TILES
    g = (pid_g % G_TILES) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    h = kv_head * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr + seq.to(tl.int64) * stride_qb, h * stride_qh, offs_d, g_ok, HEAD_DIM, BLOCK_D, True)

    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32)  # unused: the one query sees every key of its sequence

    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N  # then the ragged last tile, if any
    acc, l_i, m_i = _attend_keys(q, q_pos, k_cache_ptr, stride_kb, stride_ks, stride_kh,
                                 v_cache_ptr, stride_vb, stride_vs, stride_vh, bt_ptr, stride_bt, seq, kv_head,
                                 start, full_end, end, end, block_size, qk_scale,
                                 BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_N, False)

    if n_splits <= 1:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / l_safe[:, None]
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + (h * stride_oh)[:, None] + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    else:
        part = (seq.to(tl.int64) * num_q_heads + h) * max_splits + split  # [BLOCK_G]
        _store_partial(part_o_ptr, part_lse_ptr, part, acc, l_i, m_i, offs_d, g_ok, HEAD_DIM)


@triton.jit(do_not_specialize=["max_splits", "capacity"])
def paged_decode_reduce_kernel(
    part_o_ptr,         # [batch, q_heads, max_splits, head_dim] fp32 partial outputs (normalized per split)
    part_lse_ptr,       # [batch, q_heads, max_splits] fp32 partial log2-sum-exp2
    seq_lens_ptr,       # [batch] int32
    out_ptr,            # [batch, q_heads, head_dim] output, q's dtype
    stride_ob, stride_oh,
    num_q_heads, max_splits, split_tokens, capacity,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,    # splits combined per step
):
    """Flash-decoding, phase 2: out = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max lse), in split order.

    Only the sequence's non-empty splits are read; sequences with at most one split were finished by phase 1.
    Grid: (batch, q_heads).
    """
    seq = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), capacity)
    n_splits = tl.cdiv(seq_len, split_tokens)
    if n_splits <= 1:
        return
    base = (seq.to(tl.int64) * num_q_heads + h) * max_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        s = s0 + offs_s
        s_ok = s < n_splits
        lse = tl.load(part_lse_ptr + base + s, mask=s_ok, other=float("-inf"))
        o = tl.load(part_o_ptr + (base + s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_i, tl.max(lse, 0))
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse - m_new)
        l_i = l_i * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m_i = m_new
    o_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + h * stride_oh + offs_d
    tl.store(o_ptrs, (acc / l_i).to(out_ptr.dtype.element_ty), mask=d_ok)
