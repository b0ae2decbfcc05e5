"""write_kv_cache vs its reference, and the layout helpers of kv_cache_layout.

write_kv_cache tests run for each backend (`kernel_backend`: Triton, and CUDA C++ where it can run; conftest.py).
"""
import pytest
import torch

from paged_cache import poison_
from tolerances import DTYPES
from trinfer.triton_kernels.kv_cache_layout import (
    DEFAULT_BLOCK_SIZE,
    allocate_kv_cache,
    blocks_needed,
    check_block_size,
    kv_cache_shape,
    slot_mapping,
)
from trinfer.triton_kernels.references import write_kv_cache_ref


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN patterns included (compare the raw bits)."""
    return torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                       b.view(torch.int16 if b.element_size() == 2 else torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, kv_heads, block_size", [(64, 2, 16), (80, 3, 4), (64, 1, 1), (128, 8, 256)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_matches_reference(head_dim, kv_heads, block_size, dtype, slot_dtype, device, kernel_backend):
    tokens, q_heads = 11, 2 * kv_heads
    num_blocks = 4 + tokens // block_size + 1
    # k and v as strided views of a fused qkv projection output: [tokens, (q + 2 kv) heads * head_dim].
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, device=device).to(dtype)
    k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (q_heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[[2, 7]] = -1  # padding tokens are skipped
    slots = slots.to(device=device, dtype=slot_dtype)
    k_cache, v_cache = (poison_(torch.empty(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device))
                        for _ in range(2))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kernel_backend.write_kv_cache(k, v, k_cache, v_cache, slots, validate=True)
    write_kv_cache_ref(k, v, k_ref, v_ref, slots)
    assert _same(k_cache, k_ref) and _same(v_cache, v_ref)  # a copy: bit-exact, and nothing else touched


def test_write_into_slices_of_one_allocation(device, kernel_backend):
    """Caches that are views (one [2, blocks, bs, heads, d] tensor, one layer of a stacked cache) work."""
    kv = poison_(torch.empty(3, 2, 6, 4, 2, 64, device=device).half().view(36, 4, 2, 64)).view(3, 2, 6, 4, 2, 64)
    k_cache, v_cache = kv[1, 0], kv[1, 1]
    k, v = torch.randn(2, 5, 2, 64, device=device).half()
    slots = torch.tensor([0, 23, 5, -1, 12], device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    before = kv.clone()
    kernel_backend.write_kv_cache(k, v, k_cache, v_cache, slots)
    write_kv_cache_ref(k, v, k_ref, v_ref, slots)
    assert _same(k_cache, k_ref) and _same(v_cache, v_ref)
    assert _same(kv[0], before[0]) and _same(kv[2], before[2])


def test_write_empty_and_all_padding(device, kernel_backend):
    k_cache, v_cache = allocate_kv_cache(2, 16, 2, 64, dtype=torch.float16, device=device)
    poison_(k_cache), poison_(v_cache)
    before = k_cache.clone()
    empty = torch.empty(0, 2, 64, dtype=torch.float16, device=device)
    kernel_backend.write_kv_cache(empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.int64, device=device))
    x = torch.randn(3, 2, 64, device=device).half()
    kernel_backend.write_kv_cache(x, x, k_cache, v_cache, torch.full((3,), -1, device=device))
    assert _same(k_cache, before)


def _args():
    k_cache = torch.zeros(4, 16, 2, 64, dtype=torch.float16)
    return dict(k=torch.zeros(3, 2, 64, dtype=torch.float16), v=torch.zeros(3, 2, 64, dtype=torch.float16),
                k_cache=k_cache, v_cache=k_cache.clone(), slot_mapping=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (dict(k=torch.zeros(3, 2, 64)), TypeError, ["k", "float32"]),
        (dict(k=torch.zeros(3, 4, 64, dtype=torch.float16)), ValueError, ["k", "num_kv_heads", "(4, 64)"]),
        (dict(v=torch.zeros(3, 2, 64, dtype=torch.float16)[:2]), ValueError, ["v", "shape"]),
        (dict(k=torch.zeros(3, 64, 2, dtype=torch.float16).transpose(1, 2)), ValueError, ["k", "contiguous"]),
        (dict(v_cache=torch.zeros(4, 16, 2, 32, dtype=torch.float16)), ValueError, ["v_cache", "shape"]),
        (dict(k_cache=torch.zeros(4, 16, 2, 64), v_cache=torch.zeros(4, 16, 2, 64)), TypeError, ["k", "float32"]),
        (dict(k_cache=torch.zeros(4, 6, 2, 64, dtype=torch.float16), v_cache=torch.zeros(4, 6, 2, 64, dtype=torch.float16)),
         ValueError, ["block_size", "power of two", "6"]),
        (dict(slot_mapping=torch.tensor([0.0, 1.0, 2.0])), TypeError, ["slot_mapping", "int32", "float32"]),
        (dict(slot_mapping=torch.tensor([0, 1])), ValueError, ["slot_mapping", "3", "2"]),
    ],
)
def test_write_bad_inputs(change, exc, words, kernel_backend):
    args = _args()
    args.update(change)
    with pytest.raises(exc) as info:
        kernel_backend.write_kv_cache(**args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize(
    "slots, words",
    [([0, 64, 1], ["slot_mapping", "[-1, 64)", "64", "token 1"]), ([0, -2, 1], ["-2"]), ([5, 7, 5], ["at most once", "slot 5 2 times"])],
)
def test_write_validate(slots, words, kernel_backend):
    args = _args()
    args["slot_mapping"] = torch.tensor(slots)
    with pytest.raises(ValueError) as info:
        kernel_backend.write_kv_cache(**args, validate=True)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_layout_helpers():
    assert DEFAULT_BLOCK_SIZE == 16
    assert kv_cache_shape(10, 16, 8, 128) == (10, 16, 8, 128)
    assert [check_block_size(b) for b in (1, 2, 16, 256)] == [1, 2, 16, 256]
    for bad in (0, 3, 24, 512):
        with pytest.raises(ValueError, match="power of two"):
            check_block_size(bad)
    with pytest.raises(TypeError):
        check_block_size(16.0)
    assert blocks_needed(0, 16) == 0 and blocks_needed(16, 16) == 1 and blocks_needed(17, 16) == 2
    table = torch.tensor([[5, 2, 9], [0, 7, 1]], dtype=torch.int32)
    seq = torch.tensor([0, 0, 0, 1, 1])
    pos = torch.tensor([0, 3, 9, 4, 8])
    expected = [5 * 4 + 0, 5 * 4 + 3, 9 * 4 + 1, 7 * 4 + 0, 1 * 4 + 0]
    assert slot_mapping(table, seq, pos, 4).tolist() == expected
    k, v = allocate_kv_cache(3, 8, 2, 64, dtype=torch.bfloat16, device="cpu")
    assert k.shape == v.shape == (3, 8, 2, 64) and k.dtype == torch.bfloat16
