"""Attention and the KV-cache writes at scale, judged row by row (GPU only, @cuda; each seconds on an H200).

- A KV cache of more than 2^31 elements whose sequence lives in its last blocks: every index into it passes
  2^31, where an int32 offset wraps. Writes (both backends), the rotary write, prefill and decode (both
  backends) against the references run on the sequence's blocks gathered into a small cache.
- Long contexts, 8K to 32K keys, fp16 and bf16, with lengths on the engine's context-bucket edges (1024/1025,
  4096/4097) and a padding row, judged by the relative L2 error of each output row (`assert_rows_close`): at
  32K keys an output element is ~0.005, so bf16's absolute tolerance would pass an all-zero output.

On the CPU: that the row tolerance fails an all-zero output and a 10% error and passes a correct one.
"""
import pytest
import torch

import trinfer.triton_kernels as tk
from paged_cache import cu_seqlens, make_paged_batch
from tolerances import ROW_RTOL, assert_rows_close, poisoned
from trinfer.triton_kernels import build_rope_cache, paged_prefill_attention
from trinfer.triton_kernels.references import (
    apply_rotary_ref,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
)


def test_row_tolerance_fails_an_all_zero_long_context_output():
    batch = make_paged_batch([8192, 300], 1, 64, torch.bfloat16, "cpu")
    q = torch.randn(2, 2, 64).to(torch.bfloat16)
    expected = paged_decode_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.125)
    assert expected.float().abs().median() < 0.05  # small elements: what an absolute tolerance cannot judge
    for wrong in (torch.zeros_like(expected), (expected.float() * 0.9).to(torch.bfloat16)):
        with pytest.raises(AssertionError, match="relative L2 error above"):
            assert_rows_close(wrong, expected, torch.bfloat16)
    noisy = (expected.float() * (1 + torch.randn(expected.shape) * ROW_RTOL[torch.bfloat16] / 4)).to(torch.bfloat16)
    assert_rows_close(noisy, expected, torch.bfloat16)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_rows_close(torch.full_like(expected, float("nan")), expected)


# ----------------------------------------------------------------------------------------------------------
# A KV cache of more than 2^31 elements
# ----------------------------------------------------------------------------------------------------------

BLOCK, KV_HEADS, HEAD_DIM, Q_HEADS = 16, 8, 128, 32
BIG_BLOCKS = 2**17 + 64       # x 16 x 8 x 128 = 2^31 + 2^20 elements per cache
SEQ = 300                     # tokens of the one sequence, in the cache's last blocks
SEQ_BLOCKS = -(-SEQ // BLOCK)
TABLE = list(range(BIG_BLOCKS - 1, BIG_BLOCKS - 1 - SEQ_BLOCKS, -1))  # the last blocks, backwards


@pytest.fixture(scope="module")
def big_cache():
    """K and V caches of 2^31 + 2^20 bf16 elements each: 4.0 GiB each, 8.0 GiB of GPU memory together (no other
    test here holds more than ~2 GiB), uninitialized but for the blocks a test writes."""
    shape = (BIG_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM)
    assert shape[0] * shape[1] * shape[2] * shape[3] > 2**31
    k = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    v = torch.empty_like(k)
    yield k, v
    del k, v
    torch.cuda.empty_cache()


def _slots(n: int = SEQ) -> torch.Tensor:
    t = torch.arange(n)
    return (torch.tensor(TABLE)[t // BLOCK] * BLOCK + t % BLOCK).cuda()


def _gathered(cache: torch.Tensor) -> torch.Tensor:
    """The sequence's blocks copied into a small cache, block i of the table at index i."""
    return cache[torch.tensor(TABLE, device="cuda")].clone()


def _fill_sequence(k_cache, v_cache, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.tensor(TABLE, device="cuda")
    k_cache[idx] = torch.randn((SEQ_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM), generator=g, device="cuda").bfloat16()
    v_cache[idx] = torch.randn((SEQ_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM), generator=g, device="cuda").bfloat16()


@pytest.mark.cuda
def test_big_cache_write(big_cache, kernel_backend):
    """write_kv_cache into the last blocks (slots past 2^31 / 128 rows of 128: element offsets past 2^31), one
    padding token (slot -1): the rows land exactly, the block before the sequence's is untouched."""
    k_cache, v_cache = big_cache
    k_cache[BIG_BLOCKS - 1 - SEQ_BLOCKS].fill_(7.0)
    k = torch.randn(SEQ + 1, KV_HEADS, HEAD_DIM, device="cuda").bfloat16()
    v = torch.randn(SEQ + 1, KV_HEADS, HEAD_DIM, device="cuda").bfloat16()
    slots = torch.cat([_slots(), torch.tensor([-1], device="cuda")])
    kernel_backend.write_kv_cache(k, v, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    flat_k, flat_v = k_cache.view(-1, KV_HEADS, HEAD_DIM), v_cache.view(-1, KV_HEADS, HEAD_DIM)
    assert torch.equal(flat_k[slots[:SEQ]], k[:SEQ]) and torch.equal(flat_v[slots[:SEQ]], v[:SEQ])
    assert bool((k_cache[BIG_BLOCKS - 1 - SEQ_BLOCKS] == 7.0).all())


@pytest.mark.cuda
def test_big_cache_rotary_write(big_cache):
    """The Triton rotary write (the CUDA C++ backend has none) into the last blocks against the reference."""
    k_cache, v_cache = big_cache
    q = torch.randn(SEQ, Q_HEADS, HEAD_DIM, device="cuda").bfloat16()
    k = torch.randn(SEQ, KV_HEADS, HEAD_DIM, device="cuda").bfloat16()
    v = torch.randn(SEQ, KV_HEADS, HEAD_DIM, device="cuda").bfloat16()
    pos = torch.arange(SEQ, device="cuda") + 1000
    cache = build_rope_cache(HEAD_DIM, 2048, 500000.0, device="cuda")
    q_ref, k_ref = apply_rotary_ref(q.clone(), k.clone(), pos, cache)
    slots = _slots()
    tk.rotary_write_kv_cache(q, k, v, pos, cache, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    flat_k, flat_v = k_cache.view(-1, KV_HEADS, HEAD_DIM), v_cache.view(-1, KV_HEADS, HEAD_DIM)
    assert_rows_close(q, q_ref, torch.bfloat16, name="q")
    assert_rows_close(flat_k[slots], k_ref, torch.bfloat16, name="k_cache rows")
    assert torch.equal(flat_v[slots], v)


@pytest.mark.cuda
def test_big_cache_prefill(big_cache):
    """paged_prefill_attention (Triton) of a fresh 300-token prompt and of a 40-query chunk, both over the last
    blocks, against the reference on the gathered blocks."""
    k_cache, v_cache = big_cache
    _fill_sequence(k_cache, v_cache, seed=1)
    table = torch.tensor([TABLE, TABLE], dtype=torch.int32, device="cuda")
    kv_lens = torch.tensor([SEQ, SEQ], dtype=torch.int32, device="cuda")
    cu = cu_seqlens([SEQ, 40], "cuda")
    q = torch.randn(SEQ + 40, Q_HEADS, HEAD_DIM, device="cuda").bfloat16()
    out = poisoned(q.shape, q.dtype, "cuda")
    paged_prefill_attention(q, k_cache, v_cache, table, cu, kv_lens, HEAD_DIM ** -0.5, out=out, validate=True)
    small = torch.arange(SEQ_BLOCKS, dtype=torch.int32, device="cuda").repeat(2, 1)
    expected = paged_prefill_attention_ref(q, _gathered(k_cache), _gathered(v_cache), small, cu, kv_lens,
                                           HEAD_DIM ** -0.5)
    assert_rows_close(out, expected, torch.bfloat16)


@pytest.mark.cuda
def test_big_cache_decode(big_cache, kernel_backend):
    """paged_decode_attention (both backends) of the sequence at lengths 300 and 257 (two splits) and a padding
    row, over the last blocks, against the reference on the gathered blocks."""
    k_cache, v_cache = big_cache
    _fill_sequence(k_cache, v_cache, seed=2)
    table = torch.tensor([TABLE] * 3, dtype=torch.int32, device="cuda")
    lens = torch.tensor([SEQ, 257, 0], dtype=torch.int32, device="cuda")
    q = torch.randn(3, Q_HEADS, HEAD_DIM, device="cuda").bfloat16()
    out = poisoned(q.shape, q.dtype, "cuda")
    kernel_backend.paged_decode_attention(q, k_cache, v_cache, table, lens, HEAD_DIM ** -0.5, out=out, validate=True)
    small = torch.arange(SEQ_BLOCKS, dtype=torch.int32, device="cuda").repeat(3, 1)
    expected = paged_decode_attention_ref(q, _gathered(k_cache), _gathered(v_cache), small, lens, HEAD_DIM ** -0.5)
    assert_rows_close(out, expected, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Long contexts, judged per row
# ----------------------------------------------------------------------------------------------------------

LONG_HEADS = [(128, 32, 8), (64, 9, 3)]
DECODE_LENS = [32768, 8192, 4097, 4096, 1025, 1024, 0]   # 8K-32K keys, the context-bucket edges, a padding row
# (q_len, kv_len): a chunk over 8K cached keys, one token over 32K, prompts on the bucket edges
PREFILL_LENS = [(512, 8192), (1, 32768), (1025, 1025), (1, 4097), (4096, 4096)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, hq, hkv", LONG_HEADS)
def test_long_context_decode_rows(head_dim, hq, hkv, dtype, kernel_backend):
    batch = make_paged_batch(DECODE_LENS, hkv, head_dim, dtype, "cuda")
    q = torch.randn(len(DECODE_LENS), hq, head_dim, device="cuda").to(dtype)
    out = poisoned(q.shape, dtype, "cuda")
    kernel_backend.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens,
                                          head_dim ** -0.5, out=out, validate=True)
    expected = paged_decode_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens,
                                          head_dim ** -0.5)
    assert_rows_close(out, expected, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, hq, hkv", LONG_HEADS)
def test_long_context_prefill_rows(head_dim, hq, hkv, dtype):
    q_lens = [a for a, _ in PREFILL_LENS]
    batch = make_paged_batch([b for _, b in PREFILL_LENS], hkv, head_dim, dtype, "cuda")
    cu = cu_seqlens(q_lens, "cuda")
    q = torch.randn(sum(q_lens), hq, head_dim, device="cuda").to(dtype)
    out = poisoned(q.shape, dtype, "cuda")
    paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens,
                            head_dim ** -0.5, out=out, validate=True)
    expected = paged_prefill_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens,
                                           head_dim ** -0.5)
    assert_rows_close(out, expected, dtype)
