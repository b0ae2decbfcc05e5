"""The `torch` backend's lean ops (trinfer/runtime/torch_backend.py) equal the references they stand for.

fp32 elementwise ops (rms_norm, fused_add_rms_norm, silu_and_mul, rotary + KV write) must be bit for bit the
reference's; other dtypes go to the reference itself, so there a comparison with the reference would compare it
with itself: every dtype is compared, bit for bit, with Hugging Face's own computation instead (LlamaRMSNorm,
LlamaMLP's `act_fn(gate) * up`, apply_rotary_pos_emb, run in the dtype, and the cache written slot by slot). Attention runs the same fp32 math with other matrix-product
shapes (and torch's SDPA for prefill), so it is compared with the fp32 tolerance, on poisoned paged caches
(shuffled and consecutive block tables, ragged and zero lengths, stale table entries). prepare_matrix only
changes strides.
"""
import pytest
import torch
import torch.nn.functional as F

from paged_cache import cu_seqlens, make_paged_batch
from tolerances import assert_close
from trinfer.runtime import torch_backend as T
from trinfer.runtime.model import get_backend
from trinfer.triton_kernels import build_rope_cache
from trinfer.triton_kernels import references as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"max abs diff {(a.float() - b.float()).abs().max().item():.3g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_the_torch_backend_runs_these_ops():
    b = get_backend("torch")
    assert (b.rms_norm, b.fused_add_rms_norm, b.silu_and_mul, b.rotary_write_kv_cache, b.paged_prefill_attention,
            b.paged_decode_attention, b.prepare_matrix) == (
        T.rms_norm, T.fused_add_rms_norm, T.silu_and_mul, T.rotary_write_kv_cache, T.paged_prefill_attention,
        T.paged_decode_attention, T.prepare_matrix)


def _hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(x.shape[-1], eps=eps).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        return norm(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (3, 5, 33)])
def test_norms_equal_hf_and_the_references(dtype, shape):
    x = torch.randn(shape).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    got = T.rms_norm(x, w, 1e-5, validate=True)
    _same(got, _hf_rms_norm(x, w, 1e-5))
    _same(got, R.rms_norm_ref(x, w, 1e-5))
    r1 = torch.randn(shape).to(dtype)
    r2, r3 = r1.clone(), r1.clone()
    got = T.fused_add_rms_norm(x, r1, w, 1e-6)
    r3 = r3 + x  # the decoder layer's `residual + hidden_states`, in the dtype
    _same(got, _hf_rms_norm(r3, w, 1e-6))
    _same(r1, r3)  # the residual, updated in place
    _same(got, R.fused_add_rms_norm_ref(x, r2, w, 1e-6))
    _same(r1, r2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3072), (5, 2 * 97)])
def test_silu_and_mul_equals_hf_and_the_reference(dtype, shape):
    x = (3 * torch.randn(shape)).to(dtype)
    got = T.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    _same(got, F.silu(gate) * up)  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x), in the dtype
    _same(got, R.silu_and_mul_ref(x))


def _qkv(T_, hq, hk, d, dtype):
    """q, k, v as the model makes them: strided views of one fused projection output."""
    qkv = torch.randn(T_, (hq + 2 * hk) * d).to(dtype)
    q = qkv[:, : hq * d].view(T_, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(T_, hk, d)
    v = qkv[:, (hq + hk) * d:].view(T_, hk, d)
    return qkv, q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("fused", [True, False])  # q and k adjacent in one buffer (rotated as one view) or not
@pytest.mark.parametrize("qk_norm", [False, True])  # Qwen3's per-head q/k RMSNorm before the rotation
def test_rotary_write_kv_cache_equals_hf_and_the_reference(dtype, pad, fused, qk_norm):
    hq, hk, d, bs, nblocks = 9, 3, 64, 4, 6
    rope = build_rope_cache(d, 64, 100000.0)
    qkv, q, k, v = _qkv(5, hq, hk, d, dtype)
    if not fused:  # k before q in the buffer: not one view
        qkv = torch.cat([qkv[:, hq * d: (hq + hk) * d], qkv[:, : hq * d], qkv[:, (hq + hk) * d:]], dim=1)
        k, q = qkv[:, : hk * d].view(5, hk, d), qkv[:, hk * d: (hq + hk) * d].view(5, hq, d)
        v = qkv[:, (hq + hk) * d:].view(5, hk, d)
        assert T._joint_heads(q, k) is None
    else:
        assert T._joint_heads(q, k) is not None
    qkv2 = qkv.clone()
    q2, k2, v2 = (qkv2.as_strided(t.shape, t.stride(), t.storage_offset()) for t in (q, k, v))
    positions = torch.tensor([0, 7, 8, 31, 63])
    slots = torch.tensor([3, 17, -1, 0, 23] if pad else [3, 17, 9, 0, 23])
    # Hugging Face's rotation in the dtype (cos/sin as LlamaRotaryEmbedding returns them: [T, D], the dtype).
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    half = d // 2
    rows = rope[positions]
    cos = torch.cat([rows[:, :half], rows[:, :half]], dim=-1).to(dtype)
    sin = torch.cat([rows[:, half:], rows[:, half:]], dim=-1).to(dtype)
    norm = {}
    q_in, k_in = q.clone(), k.clone()
    if qk_norm:  # Qwen3Attention: q_norm / k_norm (Qwen3RMSNorm, in the dtype) on each head, then the rotation
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

        norm = dict(q_norm_weight=(1 + 0.3 * torch.randn(d)).to(dtype),
                    k_norm_weight=(1 + 0.3 * torch.randn(d)).to(dtype), norm_eps=1e-6)
        with torch.no_grad():
            for name, x in (("q_norm_weight", q_in), ("k_norm_weight", k_in)):
                n = Qwen3RMSNorm(d, eps=1e-6).to(dtype)
                n.weight.copy_(norm[name])
                x.copy_(n(x))
    q_hf, k_hf = apply_rotary_pos_emb(q_in, k_in, cos, sin, unsqueeze_dim=1)
    v_hf = v.clone()
    caches = [torch.full((nblocks, bs, hk, d), float("nan")).to(dtype) for _ in range(6)]
    for t, slot in enumerate(slots.tolist()):  # the cache written token by token
        if slot >= 0:
            caches[4][slot // bs, slot % bs] = k_hf[t]
            caches[5][slot // bs, slot % bs] = v_hf[t]
    T.rotary_write_kv_cache(q, k, v, positions, rope, caches[0], caches[1], slots, validate=True, **norm)
    R.rotary_write_kv_cache_ref(q2, k2, v2, positions, rope, caches[2], caches[3], slots, **norm)
    _same(q, q_hf)
    _same(k, k_hf)
    _same(v, v_hf)
    _same(qkv, qkv2)  # q and k rotated in place, v untouched
    for a, b in ((caches[0], caches[2]), (caches[1], caches[3]), (caches[0], caches[4]), (caches[1], caches[5])):
        assert torch.equal(a.isnan(), b.isnan())  # the same slots written (-1: none)
        _same(a.nan_to_num(), b.nan_to_num())


HEADS = [(9, 3, 64), (4, 4, 32), (8, 1, 80)]  # (q_heads, kv_heads, head_dim): GQA 3, MHA, GQA 8


@pytest.mark.parametrize("hq, hk, d", HEADS)
@pytest.mark.parametrize("lens", [[1], [16], [47], [200], [5, 17, 0, 33], [40, 40], [0],
                                  [3, 300, 0, 7, 150, 6, 2]])  # the last: rows in three length groups
@pytest.mark.parametrize("consecutive", [False, True])
def test_decode_attention_matches_the_reference(hq, hk, d, lens, consecutive):
    bs = 16
    batch = make_paged_batch(lens, hk, d, torch.float32, "cpu", block_size=bs, extra_table_cols=2)
    tables = batch.block_tables
    if consecutive:  # each sequence's blocks in order, as a lone sequence gets them: the cache-view path
        tables = tables.clone()
        start = 0
        for s, n in enumerate(lens):
            nb = -(-n // bs)
            perm = tables[s, :nb].clone()
            order = torch.arange(start, start + nb, dtype=torch.int32)
            k_src, v_src = batch.k_cache[perm.long()].clone(), batch.v_cache[perm.long()].clone()
            batch.k_cache[order.long()] = k_src  # move the sequence's blocks to consecutive ids
            batch.v_cache[order.long()] = v_src
            tables[s, :nb] = order
            start += nb
        # Stale entries past each sequence's blocks: any value (here out of range), never read.
        for s, n in enumerate(lens):
            tables[s, -(-n // bs):] = 10 ** 6
    q = torch.randn(len(lens), hq, d)
    got = T.paged_decode_attention(q, batch.k_cache, batch.v_cache, tables, batch.kv_lens, d ** -0.5,
                                   max_seq_len=max(lens), workspace=None, validate=False)
    expected = R.paged_decode_attention_ref(q, batch.k_cache, batch.v_cache, tables, batch.kv_lens, d ** -0.5)
    assert_close(got, expected, torch.float32)


def test_decode_rows_are_grouped_by_length_within_2x():
    """Worked by hand: sorted lengths 0 0 2 3 6 7 150 300 -> [0 0 2 3] [6 7] [150 300] (zero-length rows join the
    shortest group; a group's longest row is at most twice its shortest nonzero one)."""
    lens = [3, 300, 0, 7, 150, 6, 2, 0]
    assert T._length_groups(lens) == [[2, 7, 6, 0], [5, 3], [4, 1]]
    assert T._length_groups([10, 10, 20]) == [[0, 1, 2]] and T._length_groups([10, 21]) == [[0], [1]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_other_dtypes(dtype):
    lens = [30, 3]
    batch = make_paged_batch(lens, 2, 64, dtype, "cpu", block_size=8)
    q = torch.randn(2, 6, 64).to(dtype)
    got = T.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.125)
    expected = R.paged_decode_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens, 0.125)
    assert got.dtype == dtype
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("hq, hk, d", HEADS)
@pytest.mark.parametrize("q_lens, kv_lens", [([43], [43]), ([1], [1]), ([17, 0, 5], [17, 9, 40]),
                                             ([300], [300]), ([3, 16], [32, 16])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_matches_the_reference(hq, hk, d, q_lens, kv_lens, dtype):
    batch = make_paged_batch(kv_lens, hk, d, dtype, "cpu", block_size=16)
    q = torch.randn(sum(q_lens), hq, d).to(dtype)
    cu = cu_seqlens(q_lens, "cpu")
    got = T.paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens,
                                    d ** -0.5, max_q_len=max(q_lens), validate=True)
    expected = R.paged_prefill_attention_ref(q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.kv_lens,
                                             d ** -0.5)
    assert got.dtype == dtype
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(960, 576), (576, 576), (576, 1536), (3, 2)])
def test_prepare_matrix_keeps_values_and_shape(dtype, shape):
    w = torch.randn(shape).to(dtype)
    p = T.prepare_matrix(w)
    _same(p, w)
    col_major = (dtype == torch.float32 and shape[0] >= shape[1] and torch.backends.mkl.is_available())
    assert p.stride() == ((1, shape[0]) if col_major else w.stride())
    x = torch.randn(4, shape[1]).to(dtype)
    assert_close(F.linear(x, p), F.linear(x, w), dtype)
