"""silu_and_mul vs the fp32 reference and Hugging Face's LlamaMLP activation (ACT2FN["silu"](gate) * up)."""
import pytest
import torch

from tolerances import DTYPES, assert_close, poisoned
from trinfer.triton_kernels import silu_and_mul
from trinfer.triton_kernels.references import silu_and_mul_ref

# x shapes [..., 2 * I]: I = 1, 7, 576, 1536 (SmolLM2), 1025 (one column past a block), extra leading dims.
SHAPES = [(1, 2), (3, 14), (257, 1152), (2, 3072), (1, 2050), (2, 3, 14)]


def _x(shape, dtype, device):
    return (torch.randn(shape, device=device) * 4).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device):
    x = _x(shape, dtype, device)
    out_shape = (*shape[:-1], shape[-1] // 2)
    out = poisoned(out_shape, dtype, device)
    got = silu_and_mul(x, out=out)
    assert got is out
    expected = silu_and_mul_ref(x)
    assert_close(got, expected, dtype)
    fresh = silu_and_mul(x)
    assert fresh.shape == out_shape and fresh.dtype == dtype and fresh.is_contiguous()
    assert_close(fresh, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_hf_llama_mlp_activation(dtype, device):
    from transformers.activations import ACT2FN

    x = _x((5, 2 * 576), dtype, device)
    gate, up = x[:, :576], x[:, 576:]
    expected = ACT2FN["silu"](gate) * up  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x), in the model dtype
    assert torch.equal(silu_and_mul_ref(x), expected), "the reference does not reproduce HF's casts"
    got = silu_and_mul(x)
    assert_close(got, expected, dtype)
    if dtype == torch.float16:  # same casts: fp16 agrees bit for bit except where exp's last bit flips a rounding
        assert (got == expected).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_rows(dtype, device):
    wide = _x((9, 4000), dtype, device)
    x = wide[::2, 500:3572]  # rows of 2 * 1536 with a row stride of 8000
    out_wide = poisoned((5, 2000), dtype, device)
    out = out_wide[:, 100:1636]
    silu_and_mul(x, out=out)
    assert_close(out, silu_and_mul_ref(x), dtype)
    assert out_wide[:, :100].isnan().all() and out_wide[:, 1636:].isnan().all(), "wrote outside out"


def test_extreme_values(device):
    g = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan"), 3.0],
                     device=device)
    u = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, float("nan")], device=device)
    x = torch.cat([g, u])[None]
    got = silu_and_mul(x)
    expected = silu_and_mul_ref(x)
    assert_close(got, expected, torch.float32)
    assert torch.equal(got.isnan(), expected.isnan())


def test_empty_launches_nothing(device):
    assert silu_and_mul(torch.empty(0, 64, device=device)).shape == (0, 32)
    assert silu_and_mul(torch.empty(3, 0, device=device)).shape == (3, 0)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(x=torch.zeros(4, 8, dtype=torch.int32)), TypeError, ["x", "dtype", "int32"]),
        (dict(x=torch.zeros(())), ValueError, ["x", "at least 1 dims"]),
        (dict(x=torch.zeros(4, 7)), ValueError, ["x", "even", "7"]),
        (dict(x=torch.zeros(8, 4).t()), ValueError, ["x", "contiguous"]),
        (dict(x=torch.zeros(4, 3, 8).transpose(0, 1)[:, ::2]), ValueError, ["x", "rows", "strides"]),
        (dict(out=torch.zeros(4, 8)), ValueError, ["out", "shape", "(4, 4)", "(4, 8)"]),
        (dict(out=torch.zeros(4, 4, dtype=torch.float16)), TypeError, ["out", "float32", "float16"]),
        (dict(out=torch.zeros(8, 4).t()), ValueError, ["out", "contiguous"]),
        (dict(x="x"), TypeError, ["x", "str"]),
    ],
)
def test_bad_inputs(kwargs, exc, words):
    args = dict(x=torch.zeros(4, 8), out=None)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        silu_and_mul(args["x"], out=args["out"])
    for w in words:
        assert w in str(info.value)


def test_compiles_fullgraph(device):
    def mlp(x, w_gate_up, w_down):
        return silu_and_mul(x @ w_gate_up) @ w_down

    compiled = torch.compile(mlp, fullgraph=True, backend="inductor")
    x = torch.randn(3, 32, device=device)
    w1, w2 = torch.randn(32, 2 * 48, device=device), torch.randn(48, 32, device=device)
    assert_close(compiled(x, w1, w2), mlp(x, w1, w2), torch.float32, scale=10)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_llama3_8b_prefill_cuda(dtype, device):
    x = _x((4096, 2 * 14336), dtype, device)
    assert_close(silu_and_mul(x), silu_and_mul_ref(x), dtype)
