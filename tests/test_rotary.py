"""build_rope_cache, apply_rotary and rotary_write_kv_cache vs the references and Hugging Face's rope code."""
import math

import pytest
import torch

from tolerances import DTYPES, assert_close
from trinfer.triton_kernels import apply_rotary, build_rope_cache, rotary_write_kv_cache
from trinfer.triton_kernels._utils import interpreting
from trinfer.triton_kernels.references import apply_rotary_ref, rms_norm_ref, rotary_write_kv_cache_ref

MAX_POS = 2048
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
# (tokens, q heads, kv heads, head_dim) x dtype. 257 tokens (514 programs, which the interpreter runs one by
# one) only in test_rotary_write_kv_cache, whose q programs are apply_rotary's.
SHAPE_DTYPES = [(*shape, dtype) for shape in [(1, 4, 4, 64), (3, 9, 3, 80), (5, 32, 8, 128)] for dtype in DTYPES]


def _trunc_bf16(t):
    """fp32 -> bf16 by truncation (what the Triton interpreter's casts do, FIELD.md), returned as fp32."""
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def _expected(x, positions, cache, norm_weight=None, eps=None):
    """The reference result for x `[T, H, D]` (not modified), with the per-head RMSNorm first when norm_weight is
    given. Under the interpreter bf16 casts truncate, so there the same formula is evaluated with truncating
    casts: the kernel must then match it bit for bit (up to the norm's sum of squares, see its tests)."""
    y = x.clone()
    if not (interpreting() and x.dtype == torch.bfloat16):
        if norm_weight is not None:
            y.copy_(rms_norm_ref(y, norm_weight, eps))
        apply_rotary_ref(y, y[:, :0], positions, cache)
        return y
    half = x.shape[-1] // 2
    rows = cache[positions.long()]
    c, s = _trunc_bf16(rows[:, None, :half]), _trunc_bf16(rows[:, None, half:])
    h = x.float()
    if norm_weight is not None:
        h = _trunc_bf16(_trunc_bf16(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)) * norm_weight.float())
    x1, x2 = h[..., :half], h[..., half:]
    o1 = _trunc_bf16(_trunc_bf16(x1 * c) + _trunc_bf16(-x2 * s))
    o2 = _trunc_bf16(_trunc_bf16(x2 * c) + _trunc_bf16(x1 * s))
    return torch.cat([o1, o2], -1).to(x.dtype)


def _assert_rotated(got, expected, dtype, name):
    if dtype == torch.float32:  # a GPU may contract x*cos + y*sin into an FMA: one ulp
        assert_close(got, expected, dtype, name=name)
    else:  # every product and sum is rounded to the dtype explicitly, as in HF: bit-exact
        assert torch.equal(got, expected), f"{name}: {(got != expected).sum().item()} elements differ"


def _qkv(tokens, nq, nkv, hd, dtype, device):
    """q, k, v as strided head views of one fused projection output `[T, (nq + 2 nkv) * hd]`."""
    qkv = (torch.randn(tokens, (nq + 2 * nkv) * hd, device=device) * 2).to(dtype)
    q = qkv[:, : nq * hd].view(tokens, nq, hd)
    k = qkv[:, nq * hd: (nq + nkv) * hd].view(tokens, nkv, hd)
    v = qkv[:, (nq + nkv) * hd:].view(tokens, nkv, hd)
    return qkv, q, k, v


# ----------------------------------------------------------------------------------------- build_rope_cache
def _hf_inv_freq(rope_type, head_dim, theta, scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": rope_type, "rope_theta": theta, **(scaling or {})}
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=131072, rope_parameters=params)
    # transformers 5.x keeps "default" out of ROPE_INIT_FUNCTIONS (a static method of the rotary module).
    init = ROPE_INIT_FUNCTIONS.get(rope_type) or LlamaRotaryEmbedding.compute_default_rope_parameters
    inv_freq, attention_scaling = init(config, device="cpu")
    assert attention_scaling == 1.0
    return config, inv_freq


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("rope_type, theta, scaling", [
    ("default", 10000.0, None),
    ("default", 100000.0, {"rope_type": "default"}),
    ("linear", 10000.0, {"rope_type": "linear", "factor": 4.0}),
    ("llama3", 500000.0, LLAMA3),
])
def test_build_rope_cache_matches_hf_rope_init(rope_type, theta, scaling, head_dim):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config, inv_freq = _hf_inv_freq(rope_type, head_dim, theta, {k: v for k, v in (scaling or {}).items()
                                                                  if k != "rope_type"})
    table = build_rope_cache(head_dim, MAX_POS, theta, scaling)
    assert table.shape == (MAX_POS, head_dim) and table.dtype == torch.float32 and table.is_contiguous()
    # HF's forward: angles = position * inv_freq in fp32, emb = cat(angles, angles), cos/sin of it.
    angles = torch.arange(MAX_POS)[:, None].float() * inv_freq
    assert torch.equal(table[:, : head_dim // 2], angles.cos())
    assert torch.equal(table[:, head_dim // 2:], angles.sin())
    # And the rotary module end to end, fp32 cos/sin for a few positions.
    pos = torch.tensor([[0, 1, 7, 1000, MAX_POS - 1]])
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), pos)
    half = head_dim // 2
    assert torch.equal(cos[0], table[pos[0], :half].repeat(1, 2))
    assert torch.equal(sin[0], table[pos[0], half:].repeat(1, 2))


def test_build_rope_cache_scaling_forms():
    base = build_rope_cache(64, 16, 10000.0)
    assert torch.equal(build_rope_cache(64, 16, 10000.0, {"rope_type": "default", "rope_theta": 10000.0}), base)
    legacy = build_rope_cache(64, 16, 10000.0, {"type": "linear", "factor": 2.0})
    assert torch.equal(legacy, build_rope_cache(64, 16, 10000.0, {"rope_type": "linear", "factor": 2.0}))
    assert not torch.equal(legacy, base)
    # Position p with linear factor f is position p / f unscaled.
    assert torch.allclose(legacy[8], base[4], atol=1e-6)
    legacy_l3 = {"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}}
    assert torch.equal(build_rope_cache(128, 16, 500000.0, legacy_l3), build_rope_cache(128, 16, 500000.0, LLAMA3))


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(scaling={"rope_type": "yarn", "factor": 4.0}), ValueError, ["yarn", "not supported"]),
    (dict(scaling={"type": "dynamic", "factor": 2.0}), ValueError, ["dynamic", "not supported"]),
    (dict(scaling={"rope_type": "linear"}), ValueError, ["factor", "linear"]),
    (dict(scaling={"rope_type": "linear", "factor": 0.0}), ValueError, ["factor", "> 0"]),
    (dict(scaling={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}), ValueError, ["low_freq_factor"]),
    (dict(scaling={"rope_type": "default", "partial_rotary_factor": 0.5}), ValueError, ["partial_rotary_factor"]),
    (dict(scaling={"rope_type": "default", "rope_theta": 5.0}), ValueError, ["rope_theta", "5.0"]),
    (dict(scaling="linear"), TypeError, ["scaling", "dict", "str"]),
    (dict(head_dim=63), ValueError, ["head_dim", "even", "63"]),
    (dict(head_dim=64.0), TypeError, ["head_dim", "int", "float"]),
    (dict(max_positions=0), ValueError, ["max_positions", ">= 1", "0"]),
    (dict(theta=-1.0), ValueError, ["theta", "> 0"]),
    (dict(theta=float("inf")), ValueError, ["theta"]),
])
def test_build_rope_cache_bad_inputs(kwargs, exc, words):
    args = dict(head_dim=64, max_positions=16, theta=10000.0, scaling=None)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        build_rope_cache(args["head_dim"], args["max_positions"], args["theta"], args["scaling"])
    for w in words:
        assert w in str(info.value)


# --------------------------------------------------------------------------------------------- apply_rotary
@pytest.mark.parametrize("tokens, nq, nkv, hd, dtype", SHAPE_DTYPES)
def test_apply_rotary_matches_reference(tokens, nq, nkv, hd, dtype, device):
    cache = build_rope_cache(hd, MAX_POS, 10000.0, device=device)
    qkv, q, k, v = _qkv(tokens, nq, nkv, hd, dtype, device)
    pos = torch.randint(0, MAX_POS, (tokens,), device=device)
    eq, ek, v0 = _expected(q, pos, cache), _expected(k, pos, cache), v.clone()
    out = apply_rotary(q, k, pos, cache)
    assert out[0] is q and out[1] is k
    _assert_rotated(q, eq, dtype, "q")
    _assert_rotated(k, ek, dtype, "k")
    assert torch.equal(v, v0), "v (next to q and k in the fused buffer) was modified"


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_equals_hf_apply_rotary_pos_emb(dtype):
    """The package reference is HF's rotary, bit for bit, for every dtype (llama3-scaled table)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hd, T = 128, 40
    config, _ = _hf_inv_freq("llama3", hd, 500000.0, {k: v for k, v in LLAMA3.items() if k != "rope_type"})
    cache = build_rope_cache(hd, 8192, 500000.0, LLAMA3)
    _, q, k, _ = _qkv(T, 4, 2, hd, dtype, "cpu")
    pos = torch.randint(0, 8192, (T,))
    cos, sin = LlamaRotaryEmbedding(config)(q, pos[None])
    assert cos.dtype == dtype
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    apply_rotary_ref(q, k, pos, cache)
    assert torch.equal(q, hq[0].transpose(0, 1)) and torch.equal(k, hk[0].transpose(0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_rotary_matches_hf(dtype, device):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hd, T = 64, 6
    config, _ = _hf_inv_freq("default", hd, 100000.0, None)
    cache = build_rope_cache(hd, MAX_POS, 100000.0, device=device)
    _, q, k, _ = _qkv(T, 9, 3, hd, dtype, device)
    pos = torch.tensor([0, 1, 2, 500, 2000, 3], device=device, dtype=torch.int32)
    cos, sin = LlamaRotaryEmbedding(config).to(device)(q, pos[None].long())
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    apply_rotary(q, k, pos, cache)
    _assert_rotated(q, hq[0].transpose(0, 1), dtype, "q")
    _assert_rotated(k, hk[0].transpose(0, 1), dtype, "k")


def test_apply_rotary_position_zero_is_identity_and_int32_positions(device):
    cache = build_rope_cache(80, 64, device=device)
    _, q, k, _ = _qkv(4, 3, 1, 80, torch.float32, device)
    q0, k0 = q.clone(), k.clone()
    apply_rotary(q, k, torch.zeros(4, dtype=torch.int32, device=device), cache)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    # Rotation preserves each pair's norm.
    pos = torch.tensor([1, 5, 63, 30], dtype=torch.int32, device=device)
    apply_rotary(q, k, pos, cache)
    n = lambda t: t[..., :40] ** 2 + t[..., 40:] ** 2  # noqa: E731
    assert_close(n(q), n(q0), torch.float32, scale=10)


def test_empty_tokens_launch_nothing(device):
    cache = build_rope_cache(64, 8, device=device)
    q, k = torch.empty(0, 4, 64, device=device), torch.empty(0, 2, 64, device=device)
    pos = torch.empty(0, dtype=torch.int64, device=device)
    assert apply_rotary(q, k, pos, cache)[0] is q
    kc = torch.zeros(2, 4, 2, 64, device=device)
    rotary_write_kv_cache(q, k, k, pos, cache, kc, kc.clone(), pos)
    assert not kc.any()


def test_out_of_range_positions_validated():
    cache = build_rope_cache(64, 8)
    q, k = torch.zeros(3, 2, 64), torch.zeros(3, 1, 64)
    with pytest.raises(ValueError, match=r"positions: expected values in \[0, 8\).*got 8 at token 1"):
        apply_rotary(q, k, torch.tensor([0, 8, 2]), cache, validate=True)
    with pytest.raises(ValueError, match="got -1 at token 0"):
        apply_rotary(q, k, torch.tensor([-1, 0, 2]), cache, validate=True)


_C = build_rope_cache(64, 8)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(q=torch.zeros(3, 2, 64, dtype=torch.int32)), TypeError, ["q", "dtype", "int32"]),
    (dict(q=torch.zeros(3, 128)), ValueError, ["q", "3 dims", "2"]),
    (dict(k=torch.zeros(3, 1, 64, dtype=torch.float16)), TypeError, ["k", "float32", "float16"]),
    (dict(k=torch.zeros(4, 1, 64)), ValueError, ["k", "tokens", "3", "4"]),
    (dict(k=torch.zeros(3, 1, 32)), ValueError, ["k", "head_dim", "64", "32"]),
    (dict(q=torch.zeros(3, 2, 7), k=torch.zeros(3, 1, 7)), ValueError, ["q", "even", "7"]),
    (dict(q=torch.zeros(3, 64, 2).transpose(1, 2)), ValueError, ["q", "contiguous", "stride"]),
    (dict(k=torch.zeros(3, 64, 2).transpose(1, 2)[:, :1]), ValueError, ["k", "contiguous"]),
    (dict(positions=torch.zeros(3)), TypeError, ["positions", "int32/int64", "float32"]),
    (dict(positions=torch.zeros(4, dtype=torch.int64)), ValueError, ["positions", "3", "4"]),
    (dict(positions=torch.zeros(6, dtype=torch.int64)[::2]), ValueError, ["positions", "contiguous"]),
    (dict(cos_sin_cache=_C.half()), TypeError, ["cos_sin_cache", "float32", "float16"]),
    (dict(cos_sin_cache=_C[:, :32]), ValueError, ["cos_sin_cache", "head_dim", "64", "32"]),
    (dict(cos_sin_cache=_C[0]), ValueError, ["cos_sin_cache", "2 dims"]),
    (dict(q="q"), TypeError, ["q", "Tensor", "str"]),
])
def test_apply_rotary_bad_inputs(kwargs, exc, words):
    args = dict(q=torch.zeros(3, 2, 64), k=torch.zeros(3, 1, 64), positions=torch.zeros(3, dtype=torch.int64),
                cos_sin_cache=_C)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        apply_rotary(**args)
    for w in words:
        assert w in str(info.value)


# ------------------------------------------------------------------------------------ rotary_write_kv_cache
def _caches(num_blocks, block_size, nkv, hd, dtype, device, sliced):
    """NaN-poisoned caches; `sliced`: K and V are the two halves of one `[2, ...]` allocation's view with
    a padded block stride, so only the last dim is contiguous."""
    if sliced:
        big = torch.full((2, num_blocks, block_size + 1, nkv, hd), float("nan"), dtype=dtype, device=device)
        return big[0, :, :block_size], big[1, :, :block_size]
    shape = (num_blocks, block_size, nkv, hd)
    return (torch.full(shape, float("nan"), dtype=dtype, device=device),
            torch.full(shape, float("nan"), dtype=dtype, device=device))


@pytest.mark.parametrize("tokens, nq, nkv, hd, block_size, sliced, dtype", [
    (*case, dtype) for case in [(1, 4, 4, 64, 16, False), (3, 9, 3, 80, 1, True), (7, 32, 8, 128, 4, False)]
    for dtype in DTYPES] + [(257, 2, 1, 64, 16, True, torch.bfloat16)])
def test_rotary_write_kv_cache(tokens, nq, nkv, hd, block_size, sliced, dtype, device):
    cache = build_rope_cache(hd, MAX_POS, device=device)
    num_blocks = tokens // block_size + 3
    _, q, k, v = _qkv(tokens, nq, nkv, hd, dtype, device)
    pos = torch.randint(0, MAX_POS, (tokens,), device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    slots[::3] = -1  # padding tokens write nothing
    kc, vc = _caches(num_blocks, block_size, nkv, hd, dtype, device, sliced)
    q2, k2, kc2, vc2 = q.clone(), k.clone(), kc.clone(), vc.clone()
    eq, ek = _expected(q, pos, cache), _expected(k, pos, cache)
    rotary_write_kv_cache_ref(q2, k2, v, pos, cache, kc2, vc2, slots)  # cache layout and the -1 skips
    out = rotary_write_kv_cache(q, k, v, pos, cache, kc, vc, slots, validate=True)
    assert out[0] is q and out[1] is k
    _assert_rotated(q, eq, dtype, "q")
    _assert_rotated(k, ek, dtype, "k")
    # The cache holds exactly what the kernel left in k (and v), at the reference's slots; others stay NaN.
    keep = slots >= 0
    s = slots[keep]
    assert torch.equal(kc2.isnan(), kc.isnan()) and torch.equal(vc.isnan(), vc2.isnan())
    assert torch.equal(kc[s // block_size, s % block_size], k[keep])
    assert torch.equal(vc.nan_to_num(7.0), vc2.nan_to_num(7.0))
    assert kc.isnan().sum() == (num_blocks * block_size - len(s)) * nkv * hd


def test_rotary_write_kv_cache_int32_indices(device):
    cache = build_rope_cache(64, 32, device=device)
    _, q, k, v = _qkv(5, 2, 2, 64, torch.float16, device)
    pos = torch.tensor([0, 3, 31, 7, 1], dtype=torch.int32, device=device)
    slots = torch.tensor([9, -1, 0, 15, 4], dtype=torch.int32, device=device)
    kc, vc = _caches(4, 4, 2, 64, torch.float16, device, False)
    q2, k2, kc2, vc2 = q.clone(), k.clone(), kc.clone(), vc.clone()
    rotary_write_kv_cache_ref(q2, k2, v, pos, cache, kc2, vc2, slots)
    rotary_write_kv_cache(q, k, v, pos, cache, kc, vc, slots)
    for got, want in ((q, q2), (k, k2), (kc, kc2), (vc, vc2)):
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(v=torch.zeros(3, 1, 64, dtype=torch.float16)), TypeError, ["v", "float32", "float16"]),
    (dict(v=torch.zeros(3, 2, 64)), ValueError, ["v", "shape of k"]),
    (dict(k_cache=torch.zeros(4, 4, 1, 64, dtype=torch.float16)), TypeError, ["k_cache", "float16"]),
    (dict(k_cache=torch.zeros(4, 4, 2, 64)), ValueError, ["k_cache", "kv_heads", "(1, 64)", "(2, 64)"]),
    (dict(k_cache=torch.zeros(16, 1, 64)), ValueError, ["k_cache", "4 dims"]),
    (dict(v_cache=torch.zeros(5, 4, 1, 64)), ValueError, ["v_cache", "shape of k_cache"]),
    (dict(slot_mapping=torch.zeros(3)), TypeError, ["slot_mapping", "int32/int64"]),
    (dict(slot_mapping=torch.zeros(2, dtype=torch.int64)), ValueError, ["slot_mapping", "3", "2"]),
    (dict(slot_mapping=torch.tensor([0, 16, 1])), ValueError, ["slot_mapping", "[-1, 16)", "16", "token 1"]),
    (dict(slot_mapping=torch.tensor([0, -2, 1])), ValueError, ["slot_mapping", "-2"]),
    (dict(slot_mapping=torch.tensor([5, -1, 5])), ValueError, ["slot_mapping", "duplicates"]),
    (dict(positions=torch.tensor([0, 1, 99])), ValueError, ["positions", "99"]),
])
def test_rotary_write_kv_cache_bad_inputs(kwargs, exc, words):
    args = dict(q=torch.zeros(3, 2, 64), k=torch.zeros(3, 1, 64), v=torch.zeros(3, 1, 64),
                positions=torch.zeros(3, dtype=torch.int64), cos_sin_cache=_C,
                k_cache=torch.zeros(4, 4, 1, 64), v_cache=torch.zeros(4, 4, 1, 64),
                slot_mapping=torch.tensor([0, -1, 1]))
    args.update(kwargs)
    with pytest.raises(exc) as info:
        rotary_write_kv_cache(**args, validate=True)
    for w in words:
        assert w in str(info.value)


# ------------------------------------------------------------------ rotary_write_kv_cache with the q/k norm
QWEN3_EPS = 1e-6


def _qk_norm_inputs(tokens, nq, nkv, hd, dtype, device):
    """q, k, v views of one fused projection output whose heads differ in scale by up to 10^5 (a norm across
    heads instead of per head fails; in the 1e-3 heads eps matters), and distinct q and k norm weights."""
    qkv, q, k, v = _qkv(tokens, nq, nkv, hd, dtype, device)
    for x in (q, k):
        scales = torch.tensor([1.0, 100.0, 1e-3, 3.0], device=device)[torch.arange(x.shape[1], device=device) % 4]
        x.copy_((x.float() * scales[None, :, None]).to(dtype))
    wq = (1 + 0.5 * torch.randn(hd, device=device)).to(dtype)
    wk = (1 + 0.5 * torch.randn(hd, device=device)).to(dtype)
    return qkv, q, k, v, wq, wk


def _norm_rope_fp64(x, w, eps, positions, cache):
    """Independent float64 expectation: `w * x / sqrt(mean(x^2) + eps)` per head, then the half-split rotation,
    with no intermediate rounding."""
    x = x.double()
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    half = x.shape[-1] // 2
    rows = cache[positions.long()].double()[:, None]
    c, s = rows[..., :half], rows[..., half:]
    y1, y2 = y[..., :half], y[..., half:]
    return torch.cat([y1 * c - y2 * s, y2 * c + y1 * s], dim=-1)


# (tokens, q heads, kv heads, head_dim): MHA, GQA 2 (Qwen3-0.6B's heads), GQA 6, GQA 3 with a padded tile.
QK_NORM_SHAPES = [(3, 4, 4, 64), (5, 16, 8, 128), (2, 12, 2, 128), (4, 9, 3, 80)]


@pytest.mark.parametrize("tokens, nq, nkv, hd", QK_NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_write_kv_cache_qk_norm(tokens, nq, nkv, hd, dtype, device):
    cache = build_rope_cache(hd, MAX_POS, 1000000.0, device=device)
    block_size, num_blocks = 4, tokens // 4 + 3
    qkv, q, k, v, wq, wk = _qk_norm_inputs(tokens, nq, nkv, hd, dtype, device)
    pos = torch.randint(0, MAX_POS, (tokens,), device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    slots[1::2] = -1  # padding tokens: normalized and rotated, but write nothing
    kc, vc = _caches(num_blocks, block_size, nkv, hd, dtype, device, sliced=hd == 80)
    q64, k64 = _norm_rope_fp64(q, wq, QWEN3_EPS, pos, cache), _norm_rope_fp64(k, wk, QWEN3_EPS, pos, cache)
    eq, ek = _expected(q, pos, cache, wq, QWEN3_EPS), _expected(k, pos, cache, wk, QWEN3_EPS)
    q2, k2, v2, kc2, vc2 = q.clone(), k.clone(), v.clone(), kc.clone(), vc.clone()
    rotary_write_kv_cache_ref(q2, k2, v2, pos, cache, kc2, vc2, slots, wq, wk, QWEN3_EPS)  # layout, -1 skips
    v0 = v.clone()
    out = rotary_write_kv_cache(q, k, v, pos, cache, kc, vc, slots, q_norm_weight=wq, k_norm_weight=wk,
                                norm_eps=QWEN3_EPS, validate=True)
    assert out[0] is q and out[1] is k
    # Against float64: the dtype's roundings (norm, weight, two products and a sum; truncating bf16 casts
    # under the interpreter) stay within 3x the table's tolerance.
    assert_close(q, q64, dtype, scale=3, name="q vs float64")
    assert_close(k, k64, dtype, scale=3, name="k vs float64")
    # Against the reference's formula (same casts; the sum of squares may round differently: an ulp of rstd,
    # which can move a rounding by one ulp of the dtype).
    assert_close(q, eq, dtype, name="q vs reference")
    assert_close(k, ek, dtype, name="k vs reference")
    if dtype != torch.float32:  # every cast is HF's: all but those rare elements are bit-exact
        for name, got, want in (("q", q, eq), ("k", k, ek)):
            differ = (got != want).sum().item()
            assert differ <= 0.005 * got.numel(), f"{name}: {differ}/{got.numel()} elements not bit-exact"
    assert torch.equal(v, v0), "v was modified"
    # The cache holds exactly the normalized, rotated k (and v) at the live slots; every other slot stays NaN.
    keep = slots >= 0
    s = slots[keep]
    assert torch.equal(kc.isnan(), kc2.isnan()) and torch.equal(vc.isnan(), vc2.isnan())
    assert torch.equal(kc[s // block_size, s % block_size], k[keep])
    assert torch.equal(vc[s // block_size, s % block_size], v[keep])
    assert kc.isnan().sum() == (num_blocks * block_size - len(s)) * nkv * hd


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_reference_equals_hf_qwen3(dtype):
    """The reference's norm + rotation is Hugging Face's Qwen3 attention prologue, bit for bit: q_norm / k_norm
    (Qwen3RMSNorm in the dtype) on the projection's head view, then apply_rotary_pos_emb with Qwen3's cos/sin."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

    T, nq, nkv, hd = 6, 8, 2, 128
    config = Qwen3Config(hidden_size=256, num_attention_heads=nq, num_key_value_heads=nkv, head_dim=hd,
                         max_position_embeddings=4096, rope_parameters={"rope_type": "default",
                                                                         "rope_theta": 1000000.0})
    cache = build_rope_cache(hd, 4096, 1000000.0)
    _, q, k, v, wq, wk = _qk_norm_inputs(T, nq, nkv, hd, dtype, "cpu")
    pos = torch.randint(0, 4096, (T,))
    norms = []
    for w in (wq, wk):
        n = Qwen3RMSNorm(hd, eps=QWEN3_EPS).to(dtype)
        with torch.no_grad():
            n.weight.copy_(w)
        norms.append(n)
    with torch.no_grad():
        hq = norms[0](q.clone()).transpose(0, 1)[None]  # [1, H, T, D], as Qwen3Attention transposes
        hk = norms[1](k.clone()).transpose(0, 1)[None]
        cos, sin = Qwen3RotaryEmbedding(config)(q, pos[None])
        hq, hk = apply_rotary_pos_emb(hq, hk, cos, sin)
    kc = torch.full((4, 4, nkv, hd), float("nan"), dtype=dtype)
    slots = torch.arange(T)
    rotary_write_kv_cache_ref(q, k, v, pos, cache, kc, kc.clone(), slots, wq, wk, QWEN3_EPS)
    assert torch.equal(q, hq[0].transpose(0, 1)) and torch.equal(k, hk[0].transpose(0, 1))
    assert torch.equal(kc.view(-1, nkv, hd)[:T], k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_write_kv_cache_qk_norm_matches_hf(dtype, device):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    T, nq, nkv, hd = 4, 16, 8, 128
    cache = build_rope_cache(hd, MAX_POS, 1000000.0, device=device)
    _, q, k, v, wq, wk = _qk_norm_inputs(T, nq, nkv, hd, dtype, device)
    pos = torch.tensor([0, 1, 1000, 2047], device=device)
    with torch.no_grad():
        hq, hk = [], []
        for x, w, out in ((q, wq, hq), (k, wk, hk)):
            n = Qwen3RMSNorm(hd, eps=QWEN3_EPS).to(device=device, dtype=dtype)
            n.weight.copy_(w)
            out.append(n(x.clone()))
        rows = cache[pos]
        cos = torch.cat([rows[:, : hd // 2]] * 2, -1).to(dtype)
        sin = torch.cat([rows[:, hd // 2:]] * 2, -1).to(dtype)
        hq, hk = apply_rotary_pos_emb(hq[0], hk[0], cos, sin, unsqueeze_dim=1)
    kc, vc = _caches(2, 4, nkv, hd, dtype, device, False)
    rotary_write_kv_cache(q, k, v, pos, cache, kc, vc, torch.tensor([4, 0, 7, 2], device=device),
                          q_norm_weight=wq, k_norm_weight=wk, norm_eps=QWEN3_EPS)
    assert_close(q, hq, dtype, name="q")
    assert_close(k, hk, dtype, name="k")


_W = torch.ones(64)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(q_norm_weight=_W, norm_eps=1e-6), ValueError, ["k_norm_weight", "both or neither", "None"]),
    (dict(k_norm_weight=_W, norm_eps=1e-6), ValueError, ["q_norm_weight", "both or neither", "None"]),
    (dict(q_norm_weight=_W, k_norm_weight=_W), ValueError, ["norm_eps", "float > 0", "None"]),
    (dict(norm_eps=1e-6), ValueError, ["norm_eps", "without q_norm_weight"]),
    (dict(q_norm_weight=_W, k_norm_weight=_W, norm_eps=0.0), ValueError, ["norm_eps", "> 0", "0.0"]),
    (dict(q_norm_weight=_W, k_norm_weight=_W, norm_eps="1e-6"), TypeError, ["norm_eps", "float", "str"]),
    (dict(q_norm_weight=_W.half(), k_norm_weight=_W, norm_eps=1e-6), TypeError, ["q_norm_weight", "float16"]),
    (dict(q_norm_weight=_W, k_norm_weight=torch.ones(128), norm_eps=1e-6), ValueError,
     ["k_norm_weight", "head_dim", "64", "128"]),
    (dict(q_norm_weight=torch.ones(2, 64), k_norm_weight=_W, norm_eps=1e-6), ValueError, ["q_norm_weight", "1 dims"]),
    (dict(q_norm_weight=_W, k_norm_weight=torch.ones(128)[::2], norm_eps=1e-6), ValueError,
     ["k_norm_weight", "contiguous"]),
])
def test_rotary_write_kv_cache_qk_norm_bad_inputs(kwargs, exc, words):
    q, k = torch.randn(3, 2, 64), torch.randn(3, 1, 64)
    kc = torch.full((4, 4, 1, 64), float("nan"))
    q0, k0 = q.clone(), k.clone()
    with pytest.raises(exc) as info:
        rotary_write_kv_cache(q, k, torch.zeros(3, 1, 64), torch.zeros(3, dtype=torch.int64), _C, kc, kc.clone(),
                              torch.tensor([0, -1, 1]), **kwargs)
    for w in words:
        assert w in str(info.value)
    assert torch.equal(q, q0) and torch.equal(k, k0) and kc.isnan().all(), "a refused call changed its inputs"


# ------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("qk_norm", [False, True])
def test_compiles_fullgraph(qk_norm, device):
    T, nq, nkv, hd = 3, 4, 2, 64
    cache = build_rope_cache(hd, 64, device=device)
    norm = dict(q_norm_weight=torch.rand(hd, device=device) + 0.5, k_norm_weight=torch.rand(hd, device=device) + 0.5,
                norm_eps=1e-6) if qk_norm else {}

    def attn_prologue(x, pos, kc, vc, slots):
        qkv = x * 2
        q = qkv[:, : nq * hd].view(T, nq, hd)
        k = qkv[:, nq * hd: (nq + nkv) * hd].view(T, nkv, hd)
        v = qkv[:, (nq + nkv) * hd:].view(T, nkv, hd)
        rotary_write_kv_cache(q, k, v, pos, cache, kc, vc, slots, **norm)
        q2, k2 = apply_rotary(q.clone(), k.clone(), pos, cache)
        return qkv + 1, q2, k2

    compiled = torch.compile(attn_prologue, fullgraph=True, backend="inductor")
    x = torch.randn(T, (nq + 2 * nkv) * hd, device=device)
    pos = torch.tensor([0, 5, 9], device=device)
    slots = torch.tensor([3, -1, 0], device=device)
    kc1, vc1 = torch.zeros(2, 2, nkv, hd, device=device), torch.zeros(2, 2, nkv, hd, device=device)
    kc2, vc2 = kc1.clone(), vc1.clone()
    got = compiled(x, pos, kc1, vc1, slots)
    want = attn_prologue(x, pos, kc2, vc2, slots)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2) and kc1.any()


@pytest.mark.cuda
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_prefill_cuda(dtype, qk_norm, device):
    tokens, nq, nkv, hd = 8192, 32, 8, 128
    cache = build_rope_cache(hd, 131072, 500000.0, LLAMA3, device=device)
    if qk_norm:  # Qwen3-8B's attention prologue
        _, q, k, v, wq, wk = _qk_norm_inputs(tokens, nq, nkv, hd, dtype, device)
        norm = dict(q_norm_weight=wq, k_norm_weight=wk, norm_eps=QWEN3_EPS)
    else:
        _, q, k, v = _qkv(tokens, nq, nkv, hd, dtype, device)
        norm, wq, wk = {}, None, None
    pos = torch.randint(0, 131072, (tokens,), device=device)
    eq, ek = _expected(q, pos, cache, wq, QWEN3_EPS), _expected(k, pos, cache, wk, QWEN3_EPS)
    kc, vc = _caches(tokens // 16 + 1, 16, nkv, hd, dtype, device, False)
    slots = torch.randperm(kc.shape[0] * 16, device=device)[:tokens]
    rotary_write_kv_cache(q, k, v, pos, cache, kc, vc, slots, **norm)
    if qk_norm:  # the sum of squares may round differently from torch's (an ulp of rstd)
        assert_close(q, eq, dtype, name="q")
        assert_close(k, ek, dtype, name="k")
    else:
        _assert_rotated(q, eq, dtype, "q")
        _assert_rotated(k, ek, dtype, "k")
    assert torch.equal(kc[slots // 16, slots % 16], k) and torch.equal(vc[slots // 16, slots % 16], v)
    assert math.isfinite(q.float().abs().max().item())
