"""paged_prefill_attention and paged_decode_attention vs the fp32 reference (itself checked against SDPA).

Every cache slot a sequence does not own holds NaN or +-inf (paged_cache.py), block tables are shuffled, and
decode uses small split sizes so that short sequences still cross several KV splits under the interpreter.

Decode tests run for each backend (`kernel_backend`: Triton, and CUDA C++ where it can run; conftest.py): they
call `kernel_backend.paged_decode_attention` / `kernel_backend.write_kv_cache`. Prefill is Triton-only.
"""
import pytest
import torch
import torch.nn.functional as F

import trinfer.triton_kernels as tk
from paged_cache import cu_seqlens, make_paged_batch, poison_
from tolerances import DTYPES, assert_close, assert_rows_close, poisoned
from trinfer.triton_kernels import decode_workspace_numel, paged_prefill_attention, plan_prefill_attention
from trinfer.triton_kernels.kv_cache_layout import slot_mapping
from trinfer.triton_kernels.references import paged_decode_attention_ref, paged_prefill_attention_ref

# (head_dim, q_heads, kv_heads): GQA groups 1, 3 and 8, a non-power-of-two head dim.
HEADS = [(64, 2, 2), (80, 6, 2), (64, 8, 1)]
HEAD_IDS = ["d64-g1", "d80-g3", "d64-g8"]
# (q_len, kv_len): single tokens, block boundaries 15/16/17, prefix + new tokens, a chunk ending on a block
# boundary, a sequence with no new query.
PREFILL_LENS = [(1, 1), (15, 15), (16, 16), (17, 17), (6, 45), (3, 32), (0, 5)]
DECODE_LENS = [1, 15, 16, 17, 70]


def _q(n, q_heads, head_dim, dtype, device):
    return torch.randn(n, q_heads, head_dim, device=device).to(dtype)


# --------------------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_len, kv_len", [(37, 37), (5, 29)])
def test_prefill_reference_matches_sdpa(q_len, kv_len):
    hq, hkv, d, bs = 6, 2, 32, 8
    k = torch.randn(kv_len, hkv, d)
    v = torch.randn(kv_len, hkv, d)
    q = torch.randn(q_len, hq, d)
    nb = -(-kv_len // bs)
    k_cache = torch.zeros(nb, bs, hkv, d)
    v_cache = torch.zeros(nb, bs, hkv, d)
    k_cache.view(-1, hkv, d)[:kv_len] = k
    v_cache.view(-1, hkv, d)[:kv_len] = v
    table = torch.arange(nb, dtype=torch.int32)[None]
    got = paged_prefill_attention_ref(q, k_cache, v_cache, table, torch.tensor([0, q_len], dtype=torch.int32),
                                      torch.tensor([kv_len], dtype=torch.int32), 0.3)
    # Bottom-right aligned causal mask: query i sits at kv_len - q_len + i.
    mask = torch.arange(kv_len)[None, :] <= (kv_len - q_len + torch.arange(q_len))[:, None]
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              attn_mask=mask, scale=0.3, enable_gqa=True).transpose(0, 1)
    assert_close(got, expected, torch.float32)
    if q_len == kv_len:
        causal = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                is_causal=True, scale=0.3, enable_gqa=True).transpose(0, 1)
        assert_close(got, causal, torch.float32)


def test_decode_reference_matches_sdpa():
    hq, hkv, d, bs, n = 8, 2, 32, 4, 23
    batch = make_paged_batch([n], hkv, d, torch.float32, "cpu", block_size=bs)
    q = torch.randn(1, hq, d)
    got = paged_decode_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.2)
    t = torch.arange(n)
    slots = batch.block_tables[0, t // bs].long() * bs + t % bs
    k = batch.k_cache.view(-1, hkv, d)[slots].transpose(0, 1)
    v = batch.v_cache.view(-1, hkv, d)[slots].transpose(0, 1)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, scale=0.2, enable_gqa=True).transpose(0, 1)
    assert_close(got, expected, torch.float32)


# --------------------------------------------------------------------------------------------------------
# Prefill / extend
# --------------------------------------------------------------------------------------------------------

def _run_prefill(lens, head_dim, hq, hkv, dtype, device, *, block_size=16, **kwargs):
    q_lens = [a for a, _ in lens]
    batch = make_paged_batch([b for _, b in lens], hkv, head_dim, dtype, device, block_size=block_size)
    cu = cu_seqlens(q_lens, device)
    q = _q(sum(q_lens), hq, head_dim, dtype, device)
    scale = head_dim ** -0.5
    out = poisoned(q.shape, dtype, device)
    got = paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens, scale,
                                  out=out, validate=True, **kwargs)
    assert got is out
    expected = paged_prefill_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens,
                                           scale)
    assert expected.isfinite().all()
    return got, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, hq, hkv", HEADS, ids=HEAD_IDS)
def test_prefill_matches_reference(head_dim, hq, hkv, dtype, device):
    got, expected = _run_prefill(PREFILL_LENS, head_dim, hq, hkv, dtype, device)
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("block_size", [1, 4, 128])
def test_prefill_block_sizes(block_size, device):
    got, expected = _run_prefill([(9, 9), (5, 70), (1, 3)], 64, 6, 2, torch.float16, device, block_size=block_size)
    assert_close(got, expected, torch.float16)


LARGER_HEADS = [(128, 8, 2), (256, 7, 1)]
LARGER_HEAD_IDS = ["d128-g4", "d256-g7"]


@pytest.mark.parametrize("head_dim, hq, hkv", LARGER_HEADS, ids=LARGER_HEAD_IDS)
def test_larger_head_dims(head_dim, hq, hkv, device):
    got, expected = _run_prefill([(17, 17), (5, 40)], head_dim, hq, hkv, torch.float16, device)
    assert_close(got, expected, torch.float16)


@pytest.mark.parametrize("head_dim, hq, hkv", LARGER_HEADS, ids=LARGER_HEAD_IDS)
def test_larger_head_dims_decode(head_dim, hq, hkv, device, kernel_backend):
    got, expected = _run_decode(kernel_backend, [17, 40], head_dim, hq, hkv, torch.float16, device, split_tokens=16)
    assert_close(got, expected, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_sm80_tiles(dtype, device, monkeypatch):
    """The sm_80 table (BLOCK_N 32 at head_dim 80-128) runs the same kernel; the interpreter gets sm_90's."""
    from trinfer.triton_kernels import attention

    monkeypatch.setattr(attention, "_config_arch", lambda dev: 80)
    assert attention._prefill_config(80, dtype, 3, 80).block_n == 32
    got, expected = _run_prefill([(17, 17), (6, 45)], 80, 6, 2, dtype, device)
    assert_close(got, expected, dtype)


def test_prefill_long_chunks_cross_many_tiles(device):
    # 150 queries span several query tiles; the continuation reads unmasked full key tiles then the diagonal.
    got, expected = _run_prefill([(150, 150), (40, 300)], 64, 2, 2, torch.float16, device, max_q_len=150)
    assert_close(got, expected, torch.float16)


def test_prefill_strided_q_and_out(device):
    hq, hkv, d = 4, 2, 64
    lens = [(5, 9), (12, 12)]
    batch = make_paged_batch([b for _, b in lens], hkv, d, torch.float16, device)
    cu = cu_seqlens([a for a, _ in lens], device)
    qkv = torch.randn(17, (hq + 2 * hkv) * d, device=device).half()
    q = qkv[:, : hq * d].view(17, hq, d)  # a view of a fused projection: row stride (hq + 2 hkv) * d
    wide = poisoned((17, hq, 2 * d), torch.float16, device)
    out = wide[..., :d]
    paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens, 0.125, out=out)
    expected = paged_prefill_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens,
                                           0.125)
    assert_close(out, expected, torch.float16)
    assert torch.isnan(wide[..., d:]).all()


def test_prefill_batch_invariance(device):
    lens = [(7, 30), (1, 1), (20, 20), (4, 50), (16, 16)]
    hq, hkv, d, dtype = 4, 2, 64, torch.bfloat16
    batch = make_paged_batch([b for _, b in lens], hkv, d, dtype, device)
    cu = cu_seqlens([a for a, _ in lens], device)
    q = _q(int(cu[-1]), hq, d, dtype, device)
    full = paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens, 0.125)
    s = 3
    alone = paged_prefill_attention(q[cu[s]:cu[s + 1]], batch.k_cache, batch.v_cache, batch.block_tables[s:s + 1],
                                    cu_seqlens([lens[s][0]], device), batch.kv_lens[s:s + 1], 0.125)
    assert torch.equal(full[cu[s]:cu[s + 1]], alone)


# --------------------------------------------------------------------------------------------------------
# Prefill with a KV split (plan_prefill_attention)
# --------------------------------------------------------------------------------------------------------

def _plan(lens, hq, hkv, head_dim, dtype, device, **kwargs):
    kwargs.setdefault("min_split_keys", 16)  # short splits, so that short sequences split under the interpreter
    return plan_prefill_attention([a for a, _ in lens], [b for _, b in lens], num_q_heads=hq, num_kv_heads=hkv,
                                  head_dim=head_dim, dtype=dtype, device=device, **kwargs)


# (q_len, kv_len), for 4 query heads over 1 KV head at head_dim 64: query tiles of 32 tokens (fp16/bf16) or 8
# (fp32), key tiles of 64 (32), blocks of 16. Chunks one below, at and one above a query-tile edge, starting on
# (64, 80) and off (64 + 31) block edges, crossing key-tile edges; one query over a long prefix; a fresh prompt;
# no query. Expected splits, by hand: min(kv_len // 16, cdiv(32, query tiles)) (at least 1).
SPLIT_CASES = {
    torch.float16: ([(31, 95), (32, 96), (33, 161), (1, 200), (16, 16), (0, 5)], 32, [5, 6, 10, 12, 1, 1]),
    torch.bfloat16: ([(31, 95), (32, 96), (33, 161), (1, 200), (16, 16), (0, 5)], 32, [5, 6, 10, 12, 1, 1]),
    torch.float32: ([(7, 71), (8, 72), (9, 130), (1, 100), (16, 16), (0, 3)], 8, [4, 4, 8, 6, 1, 1]),
}


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_kv_split_matches_reference(dtype, device):
    """Short chunks over longer prefixes, split over their keys (some splits see no key of some rows, some lie
    past the sequence: their log-sum-exp is -inf), merged by the reduce: the reference's attention."""
    lens, tokens, splits = SPLIT_CASES[dtype]
    plan = _plan(lens, 4, 1, 64, dtype, device)
    assert plan.tokens_per_tile == tokens and plan.kv_splits.tolist() == splits
    assert plan.num_partials == sum(q * n for (q, _), n in zip(lens, splits))
    got, expected = _run_prefill(lens, 64, 4, 1, dtype, device, plan=plan)
    assert_close(got, expected, dtype)


def test_prefill_kv_split_is_batch_invariant(device):
    """A sequence's output does not depend on its batch: split, it equals its launch alone; unsplit within a
    launch where another sequence is split, it equals (bitwise) a launch without any split."""
    lens = [(7, 30), (1, 1), (20, 20), (4, 150), (16, 16)]
    hq, hkv, d, dtype = 4, 1, 64, torch.bfloat16
    batch = make_paged_batch([b for _, b in lens], hkv, d, dtype, device)
    cu = cu_seqlens([a for a, _ in lens], device)
    q = _q(int(cu[-1]), hq, d, dtype, device)
    plan = _plan(lens, hq, hkv, d, dtype, device)
    assert plan.kv_splits.tolist() == [1, 1, 1, 9, 1]
    full = paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens, 0.125,
                                   plan=plan)
    plain = paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens, 0.125)
    for s in range(len(lens)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        alone = paged_prefill_attention(q[rows], batch.k_cache, batch.v_cache, batch.block_tables[s:s + 1],
                                        cu_seqlens([lens[s][0]], device), batch.kv_lens[s:s + 1], 0.125,
                                        plan=_plan([lens[s]], hq, hkv, d, dtype, device))
        assert torch.equal(full[rows], alone), f"sequence {s}"
        if s != 3:
            assert torch.equal(full[rows], plain[rows]), f"sequence {s}"


def test_prefill_plan_errors(device):
    lens = [(3, 40), (5, 5)]
    batch = make_paged_batch([b for _, b in lens], 1, 64, torch.float16, device)
    cu = cu_seqlens([a for a, _ in lens], device)
    q = _q(8, 4, 64, torch.float16, device)
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens, 0.125)
    with pytest.raises(ValueError, match="plan: made for a batch of 1 sequences, got 2"):
        paged_prefill_attention(*args, plan=_plan(lens[:1], 4, 1, 64, torch.float16, device))
    with pytest.raises(ValueError, match="query tokens per tile"):  # planned for other heads
        paged_prefill_attention(*args, plan=_plan(lens, 8, 1, 64, torch.float16, device))
    with pytest.raises(TypeError, match="plan: expected a PrefillPlan"):
        paged_prefill_attention(*args, plan=(1, 2))
    plan = _plan(lens, 4, 1, 64, torch.float16, device)
    bad = plan._replace(part_base=plan.part_base + 1)
    with pytest.raises(ValueError, match="partial rows"):
        paged_prefill_attention(*args, plan=bad, validate=True)
    with pytest.raises(ValueError, match="kv_lens: expected one per sequence"):
        plan_prefill_attention([1, 2], [3], num_q_heads=4, num_kv_heads=1, head_dim=64, dtype=torch.float16,
                               device=device)
    with pytest.raises(ValueError, match="num_q_heads"):
        plan_prefill_attention([1], [3], num_q_heads=3, num_kv_heads=2, head_dim=64, dtype=torch.float16,
                               device=device)
    with pytest.raises(ValueError, match="workspace"):
        paged_prefill_attention(*args, plan=plan, workspace=torch.empty(3, device=device))


# --------------------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------------------

def _run_decode(kernels, lens, head_dim, hq, hkv, dtype, device, *, block_size=16, **kwargs):
    """`kernels.paged_decode_attention` (kernels: a backend module) on a poisoned paged batch, and the reference."""
    batch = make_paged_batch(lens, hkv, head_dim, dtype, device, block_size=block_size)
    q = _q(len(lens), hq, head_dim, dtype, device)
    scale = head_dim ** -0.5
    out = poisoned(q.shape, dtype, device)
    got = kernels.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, scale,
                                 out=out, validate=True, **kwargs)
    assert got is out
    expected = paged_decode_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, scale)
    assert expected.isfinite().all()
    return got, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, hq, hkv", HEADS, ids=HEAD_IDS)
def test_decode_matches_reference(head_dim, hq, hkv, dtype, device, kernel_backend):
    # split_tokens=16: the 70-token sequence crosses 5 splits, 17 crosses 2, 16 fits one exactly.
    got, expected = _run_decode(kernel_backend, DECODE_LENS, head_dim, hq, hkv, dtype, device, split_tokens=16)
    assert_close(got, expected, dtype)


def test_decode_default_split_size(device, kernel_backend):
    # 600 tokens: 3 splits of 256
    got, expected = _run_decode(kernel_backend, [600, 3], 64, 4, 4, torch.float16, device)
    assert_close(got, expected, torch.float16)


@pytest.mark.parametrize("block_size", [1, 4, 128])
def test_decode_block_sizes(block_size, device, kernel_backend):
    got, expected = _run_decode(kernel_backend, [5, 40, 130], 64, 6, 2, torch.float16, device, block_size=block_size,
                                split_tokens=32)
    assert_close(got, expected, torch.float16)


def test_decode_gqa_group_wider_than_a_tile(device, kernel_backend):
    # group 96 > 64 rows
    got, expected = _run_decode(kernel_backend, [20, 9], 64, 96, 1, torch.float16, device, split_tokens=16)
    assert_close(got, expected, torch.float16)


def test_decode_batch_invariance(device, kernel_backend):
    """One sequence decoded alone and inside a batch of 9 others gives bitwise the same output."""
    hq, hkv, d, dtype = 8, 2, 64, torch.bfloat16
    lens = [75, 3, 150, 16, 1, 33, 64, 99, 17, 120]
    batch = make_paged_batch(lens, hkv, d, dtype, device)
    q = _q(len(lens), hq, d, dtype, device)
    kw = dict(split_tokens=32)
    full = kernel_backend.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens,
                                                 0.125, **kw)
    for s in (0, 2):
        alone = kernel_backend.paged_decode_attention(q[s:s + 1], batch.k_cache, batch.v_cache,
                                                      batch.block_tables[s:s + 1], batch.kv_lens[s:s + 1], 0.125,
                                                      max_seq_len=lens[s], **kw)
        assert torch.equal(full[s], alone[0])
    # Also with a wider table and a bigger grid bound: the grid never changes a result.
    wide = torch.cat([batch.block_tables, batch.block_tables], dim=1)
    again = kernel_backend.paged_decode_attention(q, batch.k_cache, batch.v_cache, wide, batch.kv_lens, 0.125, **kw)
    assert torch.equal(full, again)


def test_decode_preallocated_workspace_and_grid_bound(device, kernel_backend):
    """The engine's CUDA-graph path: out and workspace preallocated, the grid sized by max_seq_len only."""
    hq, hkv, d, dtype = 4, 2, 64, torch.float16
    batch = make_paged_batch([96, 96, 96], hkv, d, dtype, device)
    batch.kv_lens.copy_(torch.tensor([40, 7, 90], dtype=torch.int32))
    q = _q(3, hq, d, dtype, device)
    n = decode_workspace_numel(8, hq, d, 128, split_tokens=32)
    assert n == 8 * hq * 4 * (d + 1)
    workspace = torch.full((n,), float("nan"), device=device)
    out = poisoned(q.shape, dtype, device)
    kernel_backend.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.125,
                                          out=out, max_seq_len=128, split_tokens=32, workspace=workspace)
    expected = paged_decode_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.125)
    assert_close(out, expected, dtype)
    # New lengths and queries in the same buffers (what a graph replay sees).
    batch.kv_lens.copy_(torch.tensor([1, 96, 33], dtype=torch.int32))
    q.copy_(_q(3, hq, d, dtype, device))
    kernel_backend.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.125,
                                          out=out, max_seq_len=128, split_tokens=32, workspace=workspace)
    expected = paged_decode_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.125)
    assert expected.isfinite().all()
    assert_close(out, expected, dtype)
    assert decode_workspace_numel(8, hq, d, 32, split_tokens=32) == 0  # one split: no scratch needed


def test_decode_zero_length_is_zeros(device, kernel_backend):
    hq, hkv, d = 4, 2, 64
    batch = make_paged_batch([0, 20], hkv, d, torch.float16, device)
    q = _q(2, hq, d, torch.float16, device)
    out = kernel_backend.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens,
                                                0.125, out=poisoned(q.shape, torch.float16, device), split_tokens=16,
                                                validate=True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    expected = paged_decode_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.125)
    assert_close(out, expected, torch.float16)


# --------------------------------------------------------------------------------------------------------
# End to end, empty batches, torch.compile
# --------------------------------------------------------------------------------------------------------

def test_write_then_prefill_then_decode_matches_sdpa(device, kernel_backend):
    """A prompt written with write_kv_cache and attended with prefill, then one decode step, vs SDPA (the write and
    the decode step on the backend under test, prefill on Triton)."""
    hq, hkv, d, n, bs, dtype = 6, 2, 64, 21, 4, torch.float32
    k_cache = poison_(torch.empty(12, bs, hkv, d, device=device))
    v_cache = poison_(torch.empty(12, bs, hkv, d, device=device))
    table = torch.tensor([[7, 2, 9, 0, 5, 11, 3]], dtype=torch.int32, device=device)
    k, v, q = (torch.randn(n + 1, h, d, device=device) for h in (hkv, hkv, hq))
    slots = slot_mapping(table, torch.zeros(n + 1, dtype=torch.long), torch.arange(n + 1), bs)
    kernel_backend.write_kv_cache(k[:n], v[:n], k_cache, v_cache, slots[:n].to(device), validate=True)
    lens = torch.tensor([n], dtype=torch.int32, device=device)
    got = paged_prefill_attention(q[:n], k_cache, v_cache, table, cu_seqlens([n], device), lens, 0.125)
    ref = F.scaled_dot_product_attention(q[:n].transpose(0, 1), k[:n].transpose(0, 1), v[:n].transpose(0, 1),
                                         is_causal=True, scale=0.125, enable_gqa=True).transpose(0, 1)
    assert_close(got, ref, torch.float32)
    kernel_backend.write_kv_cache(k[n:], v[n:], k_cache, v_cache, slots[n:].to(device))
    got = kernel_backend.paged_decode_attention(q[n:], k_cache, v_cache, table, lens + 1, 0.125, split_tokens=16)
    ref = F.scaled_dot_product_attention(q[n:].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         scale=0.125, enable_gqa=True).transpose(0, 1)
    assert_close(got, ref, torch.float32)


def test_empty_batches(device, kernel_backend):
    batch = make_paged_batch([4], 2, 64, torch.float16, device)
    table = batch.block_tables[:0]
    q = torch.empty(0, 4, 64, dtype=torch.float16, device=device)
    empty_i32 = torch.empty(0, dtype=torch.int32, device=device)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    assert paged_prefill_attention(q, batch.k_cache, batch.v_cache, table, zero, empty_i32, 0.1).shape == (0, 4, 64)
    decoded = kernel_backend.paged_decode_attention(q, batch.k_cache, batch.v_cache, table, empty_i32, 0.1)
    assert decoded.shape == (0, 4, 64)


def test_compiles_fullgraph(device, kernel_backend):
    hq, hkv, d = 4, 2, 64
    batch = make_paged_batch([9, 20], hkv, d, torch.float32, device)
    cu = cu_seqlens([3, 5], device)

    def step(q_prefill, q_decode):
        a = paged_prefill_attention(q_prefill, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens,
                                    0.125, max_q_len=5)
        b = kernel_backend.paged_decode_attention(q_decode, batch.k_cache, batch.v_cache, batch.block_tables,
                                                  batch.kv_lens, 0.125, split_tokens=16)
        return a * 2, b + 1

    qp, qd = _q(8, hq, d, torch.float32, device), _q(2, hq, d, torch.float32, device)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for got, expected in zip(compiled(qp, qd), step(qp, qd)):
        assert_close(got, expected, torch.float32)


# --------------------------------------------------------------------------------------------------------
# Bad inputs: checked on every call, and device-memory checks under validate=True
# --------------------------------------------------------------------------------------------------------

def _base():
    batch = make_paged_batch([5, 20], 2, 64, torch.float16, "cpu")
    return dict(q=torch.zeros(2, 4, 64, dtype=torch.float16), k_cache=batch.k_cache, v_cache=batch.v_cache,
                block_tables=batch.block_tables, lens=batch.kv_lens, scale=0.125)


BAD_INPUTS = [
    (dict(q=torch.zeros(2, 4, 64)), TypeError, ["q", "dtype", "float32"]),
    (dict(q=torch.zeros(2, 4, 80, dtype=torch.float16)), ValueError, ["q", "head_dim", "64", "80"]),
    (dict(q=torch.zeros(2, 3, 64, dtype=torch.float16)), ValueError, ["q", "multiple", "2 KV heads", "3"]),
    (dict(q=torch.zeros(2, 64, 4, dtype=torch.float16).transpose(1, 2)), ValueError, ["q", "contiguous"]),
    (dict(q=torch.zeros(8, 64, dtype=torch.float16)), ValueError, ["q", "3 dims"]),
    (dict(k_cache=torch.zeros(4, 16, 2, 64)), TypeError, ["v_cache", "float32", "float16"]),
    (dict(v_cache=torch.zeros(4, 16, 2, 64, dtype=torch.float16)), ValueError, ["v_cache", "shape"]),
    (dict(k_cache=torch.zeros(4, 12, 2, 64, dtype=torch.float16), v_cache=torch.zeros(4, 12, 2, 64, dtype=torch.float16)),
     ValueError, ["block_size", "power of two", "12"]),
    (dict(block_tables=torch.zeros(2, 3, dtype=torch.int64)), TypeError, ["block_tables", "int32", "int64"]),
    (dict(block_tables=torch.zeros(3, 3, dtype=torch.int32)), ValueError, ["block_tables", "3"]),
    (dict(lens=torch.tensor([5, 20])), TypeError, ["int32", "int64"]),
    (dict(lens=torch.tensor([5, 20, 3], dtype=torch.int32)), ValueError, ["3"]),
    (dict(scale=0.0), ValueError, ["scale", "> 0"]),
    (dict(scale=float("nan")), ValueError, ["scale"]),
    (dict(out=torch.zeros(2, 4, 32, dtype=torch.float16)), ValueError, ["out", "shape"]),
    (dict(out=torch.zeros(2, 4, 64)), TypeError, ["out", "float32"]),
]


def _check_bad_input(op, change, exc, words, kernels=tk):
    args = _base()
    args.update(change)
    out = args.pop("out", None)
    q, lens = args.pop("q"), args.pop("lens")
    with pytest.raises(exc) as info:
        if op == "prefill":
            cu = cu_seqlens([1, 1], "cpu") if q.dim() == 3 and q.shape[0] == 2 else cu_seqlens([q.shape[0], 0], "cpu")
            paged_prefill_attention(q, args["k_cache"], args["v_cache"], args["block_tables"], cu, lens,
                                    args["scale"], out=out)
        else:
            kernels.paged_decode_attention(q, args["k_cache"], args["v_cache"], args["block_tables"], lens,
                                           args["scale"], out=out)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("change, exc, words", BAD_INPUTS)
def test_prefill_bad_inputs(change, exc, words):
    _check_bad_input("prefill", change, exc, words)


@pytest.mark.parametrize("change, exc, words", BAD_INPUTS)
def test_decode_bad_inputs(change, exc, words, kernel_backend):
    _check_bad_input("decode", change, exc, words, kernel_backend)


@pytest.mark.parametrize("head_dim", [16, 32, 257, 512])
@pytest.mark.parametrize("op", ["prefill", "decode"])
def test_unsupported_head_dim_is_named(op, head_dim):
    """Head dims outside [33, 256] have no tile in the config tables: a ValueError naming the range, not a KeyError."""
    batch = make_paged_batch([5], 1, head_dim, torch.float16, "cpu")
    q = torch.zeros(1, 2, head_dim, dtype=torch.float16)
    with pytest.raises(ValueError, match=rf"^q: expected a head_dim in \[33, 256\] .*, got {head_dim}$"):
        if op == "prefill":
            paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, cu_seqlens([1], "cpu"),
                                    batch.kv_lens, 0.1)
        else:
            tk.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.1)


def test_config_tables_name_an_unsupported_head_dim():
    from trinfer.triton_kernels import attention

    for config in (lambda d: attention._prefill_config(d, torch.float16, 1),
                   lambda d: attention._decode_config(d, torch.float16, 1, 256)):
        with pytest.raises(ValueError, match=r"head_dim: expected a head_dim in \[33, 256\] .*, got 16"):
            config(16)
        assert config(33) == config(64)  # padded to the 64-wide tile


@pytest.mark.parametrize("head_dim", [33, 40])
def test_head_dims_padded_to_a_tile(head_dim, device):
    """Head dims between the table's tile widths run masked (odd 33 and 40 on the 64-wide tile)."""
    got, expected = _run_prefill([(3, 5), (7, 20)], head_dim, 4, 2, torch.float16, device)
    assert_close(got, expected, torch.float16)
    got, expected = _run_decode(tk, [5, 20], head_dim, 4, 2, torch.float16, device, split_tokens=16)
    assert_close(got, expected, torch.float16)


@pytest.mark.parametrize(
    "cu, kv_lens, table_fix, max_q_len, words",
    [
        ([0, 2, 1], [5, 20], None, None, ["cu_seqlens_q", "non-decreasing"]),
        ([1, 2, 3], [5, 20], None, None, ["cu_seqlens_q[0] == 0"]),
        ([0, 1, 3], [5, 20], None, None, ["cu_seqlens_q", "last value", "2"]),
        ([0, 1, 2], [5, 49], None, None, ["kv_lens", "[0, 48]", "49"]),  # table of 3 blocks of 16
        ([0, 2, 2], [1, 20], None, None, ["kv_lens", "q_len", "2"]),
        ([0, 1, 2], [5, 20], (1, 1, 999), None, ["block_tables", "[0,", "999", "[1, 1]"]),
        ([0, 1, 2], [5, 20], (0, 0, -1), None, ["block_tables", "-1", "[0, 0]"]),
        ([0, 1, 4], [5, 20], None, 2, ["max_q_len", "3", "2"]),
    ],
)
def test_prefill_validate(cu, kv_lens, table_fix, max_q_len, words):
    args = _base()
    q = torch.zeros(cu[-1] if cu[-1] else 1, 4, 64, dtype=torch.float16)
    if cu == [0, 1, 3]:
        q = torch.zeros(2, 4, 64, dtype=torch.float16)
    table = args["block_tables"].clone()
    if table_fix:
        table[table_fix[0], table_fix[1]] = table_fix[2]
    with pytest.raises(ValueError) as info:
        paged_prefill_attention(q, args["k_cache"], args["v_cache"], table, torch.tensor(cu, dtype=torch.int32),
                                torch.tensor(kv_lens, dtype=torch.int32), 0.1, max_q_len=max_q_len, validate=True)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize(
    "lens, table_fix, kwargs, exc, words",
    [
        ([5, 49], None, {}, ValueError, ["seq_lens", "[0, 48]", "49"]),
        ([5, -1], None, {}, ValueError, ["seq_lens", "-1"]),
        ([5, 20], (1, 1, 999), {}, ValueError, ["block_tables", "999", "[1, 1]"]),
        ([5, 20], None, dict(max_seq_len=16), ValueError, ["max_seq_len", "20", "16"]),
        ([5, 20], None, dict(split_tokens=24), ValueError, ["split_tokens", "power of two", "24"]),
        ([5, 20], None, dict(split_tokens=8), ValueError, ["split_tokens", "8"]),
        ([5, 20], None, dict(workspace=torch.zeros(10)), ValueError, ["workspace", "at least"]),
        ([5, 20], None, dict(workspace=torch.zeros(10 ** 5, dtype=torch.float16)), TypeError, ["workspace", "float32"]),
    ],
)
def test_decode_validate(lens, table_fix, kwargs, exc, words, kernel_backend):
    args = _base()
    table = args["block_tables"].clone()
    if table_fix:
        table[table_fix[0], table_fix[1]] = table_fix[2]
    with pytest.raises(exc) as info:
        kernel_backend.paged_decode_attention(args["q"], args["k_cache"], args["v_cache"], table,
                                              torch.tensor(lens, dtype=torch.int32), 0.1, validate=True,
                                              split_tokens=kwargs.pop("split_tokens", 16), **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_lengths_past_the_table_are_clamped_without_validate(device, kernel_backend):
    """Without validate the kernels never read past a sequence's table, even when a length lies: the lying
    length is clamped to the table's capacity. Sequence 0 fills its table (2 blocks of 16 tokens) exactly, so its
    output is attention over those 32 tokens; the honest sequence is unaffected."""
    batch = make_paged_batch([32, 7], 2, 64, torch.float16, device, extra_table_cols=0)
    assert batch.block_tables.shape[1] * batch.block_size == 32
    q = _q(2, 4, 64, torch.float16, device)
    lying = torch.tensor([10 ** 6, 7], dtype=torch.int32, device=device)
    out = kernel_backend.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, lying, 0.1,
                                                split_tokens=16, out=poisoned(q.shape, torch.float16, device))
    expected = paged_decode_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.1)
    assert_close(out[0], expected[0], torch.float16, name="the lying sequence (clamped)")
    assert_close(out[1], expected[1], torch.float16, name="the honest sequence")


# --------------------------------------------------------------------------------------------------------
# GPU only: real lengths and head dims
# --------------------------------------------------------------------------------------------------------

LONG_HEADS = [(128, 32, 8), (256, 8, 1), (96, 12, 4), (64, 9, 3)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, hq, hkv", LONG_HEADS)
def test_long_contexts_cuda(head_dim, hq, hkv, dtype, device):
    prefill = [(2048, 2048), (300, 8500), (1, 4097), (77, 77)]
    got, expected = _run_prefill(prefill, head_dim, hq, hkv, dtype, device)
    assert_close(got, expected, dtype)
    assert_rows_close(got, expected, dtype)  # long rows are small: the atol alone would pass zeros


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, hq, hkv", LONG_HEADS)
def test_long_prefix_kv_split_cuda(head_dim, hq, hkv, dtype, device):
    """Short chunks over long cached prefixes with the default split sizes (up to 64 splits), next to an unsplit
    long chunk in the same launch."""
    lens = [(16, 8192), (1, 4097), (100, 20000), (512, 2048), (2048, 2048)]
    plan = _plan(lens, hq, hkv, head_dim, dtype, device, min_split_keys=256)
    assert plan.split and max(plan.kv_splits.tolist()) > 16
    got, expected = _run_prefill(lens, head_dim, hq, hkv, dtype, device, plan=plan)
    assert_close(got, expected, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, hq, hkv", LONG_HEADS)
def test_long_contexts_decode_cuda(head_dim, hq, hkv, dtype, device, kernel_backend):
    got, expected = _run_decode(kernel_backend, [8192 + 5, 1, 300, 16384], head_dim, hq, hkv, dtype, device)
    assert_close(got, expected, dtype)
    assert_rows_close(got, expected, dtype)


@pytest.mark.cuda
def test_decode_cuda_graph_replay(device, kernel_backend):
    hq, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    batch = make_paged_batch([3000] * 4, hkv, d, dtype, device)  # every sequence owns 3000 slots
    q = _q(4, hq, d, dtype, device)
    out = torch.empty_like(q)
    max_len = batch.block_tables.shape[1] * batch.block_size
    ws = torch.empty(decode_workspace_numel(4, hq, d, max_len), device=device)

    def run():
        kernel_backend.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens,
                                              0.088, out=out, workspace=ws)

    run()  # warm up (JIT) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for lens in ([3000, 40, 700, 1], [17, 2999, 0, 256]):
        batch.kv_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(_q(4, hq, d, dtype, device))
        graph.replay()
        torch.cuda.synchronize()
        expected = paged_decode_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.088)
        assert expected.isfinite().all()
        assert_close(out, expected, dtype)
        assert_rows_close(out, expected, dtype)
