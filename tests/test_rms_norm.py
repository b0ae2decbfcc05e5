"""rms_norm and fused_add_rms_norm vs the fp32 reference and Hugging Face's LlamaRMSNorm.

Every test runs for each kernel backend (`kernel_backend`: Triton, and CUDA C++ where it can run; conftest.py).
"""
import pytest
import torch

from tolerances import DTYPES, assert_close, poisoned
from trinfer.triton_kernels.references import fused_add_rms_norm_ref, rms_norm_ref

SHAPES = [(1, 1), (3, 7), (257, 576), (2, 4095), (1, 8192), (2, 3, 576)]


def _inputs(shape, dtype, device):
    x = torch.randn(shape, dtype=torch.float32, device=device).mul_(3).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype, device, kernel_backend):
    x, w = _inputs(shape, dtype, device)
    out = poisoned(shape, dtype, device)
    got = kernel_backend.rms_norm(x, w, 1e-5, out=out)
    assert got is out
    assert_close(got, rms_norm_ref(x, w, 1e-5), dtype)
    assert_close(kernel_backend.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_matches_hf_llama_rmsnorm(dtype, device, kernel_backend):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w = _inputs((5, 576), dtype, device)
    hf = LlamaRMSNorm(576, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
        expected = hf(x)
    got = kernel_backend.rms_norm(x, w, 1e-6)
    assert got.dtype == expected.dtype
    # Same casts as HF: fp16 outputs agree to the last bit except where fp32 summation order flips a rounding.
    assert_close(got, expected, dtype)
    if dtype == torch.float16:
        assert (got == expected).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_non_contiguous_rows(dtype, device, kernel_backend):
    wide = torch.randn(9, 1200, device=device).to(dtype)
    x = wide[:, 100:676]  # rows of 576 with a row stride of 1200
    w = torch.randn(576, device=device).to(dtype)
    assert_close(kernel_backend.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (257, 576), (2, 3, 4095)])
def test_fused_add_rms_norm(shape, dtype, device, kernel_backend):
    x, w = _inputs(shape, dtype, device)
    res = torch.randn(shape, device=device).to(dtype)
    res_ref = res.clone()
    expected = fused_add_rms_norm_ref(x, res_ref, w, 1e-5)
    got = kernel_backend.fused_add_rms_norm(x, res, w, 1e-5, out=poisoned(shape, dtype, device))
    assert_close(res, res_ref, dtype, name="residual")
    assert_close(got, expected, dtype)


def _eps_rows(n, eps, dtype, device):
    """Rows where eps matters or the squares are large, rounded to dtype: mean squares of 0.1, 1 and 10 times
    eps, an all-zero row, a row of magnitude ~1, and a very large row (|x| up to ~6e4 in fp16, whose squares
    overflow fp16; ~1e15 in bf16/fp32)."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for ms in (0.1 * eps, eps, 10 * eps):
        r = torch.randn(n, generator=g, dtype=torch.float64)
        rows.append(r * (ms / r.pow(2).mean()).sqrt())
    rows.append(torch.zeros(n, dtype=torch.float64))
    rows.append(torch.randn(n, generator=g, dtype=torch.float64))
    big, limit = (2e4, 6e4) if dtype == torch.float16 else (1e15, 1e16)
    rows.append((torch.randn(n, generator=g, dtype=torch.float64) * big).clamp(-limit, limit))
    return torch.stack(rows).to(dtype).to(device)


def _rms_norm_fp64(x, w, eps):
    """`w * x / sqrt(mean(x^2) + eps)` in float64 (no intermediate rounding): the ideal the kernels round."""
    h = x.double()
    return w.double() * h / (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
@pytest.mark.parametrize("fused", [False, True])
def test_eps_and_large_values_against_fp64(fused, eps, dtype, device, kernel_backend):
    """eps is no detail here (rows with mean square 0.1, 1, 10 eps; a zero row, which without eps is 0/0), and
    the sum of squares of a very large row must not overflow. fused: residual + x is exactly the row."""
    n = 1000
    x = _eps_rows(n, eps, dtype, device)
    w = (1 + 0.5 * torch.randn(n, device=device)).to(dtype)
    out = poisoned(x.shape, dtype, device)
    if fused:
        half = (x.double() / 2).to(dtype)
        res = x.double() - half.double()
        assert torch.equal(half.double() + res.to(dtype).double(), x.double())  # the add is exact
        res = res.to(dtype)
        got = kernel_backend.fused_add_rms_norm(half, res, w, eps, out=out)
        assert torch.equal(res, x), "residual"
    else:
        got = kernel_backend.rms_norm(x, w, eps, out=out)
    assert_close(got, _rms_norm_fp64(x, w, eps), dtype)
    assert torch.equal(got[3], torch.zeros_like(got[3]))  # the zero row


def test_empty_batch_launches_nothing(device, kernel_backend):
    x = torch.empty(0, 64, device=device)
    w = torch.ones(64, device=device)
    assert kernel_backend.rms_norm(x, w, 1e-5).shape == (0, 64)
    assert kernel_backend.fused_add_rms_norm(x, x.clone(), w, 1e-5).shape == (0, 64)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(x=torch.zeros(4, 8, dtype=torch.int32)), TypeError, ["x", "dtype", "int32"]),
        (dict(x=torch.zeros(())), ValueError, ["x", "at least 1 dims"]),
        (dict(weight=torch.ones(9)), ValueError, ["weight", "8", "9"]),
        (dict(weight=torch.ones(8, dtype=torch.float16)), TypeError, ["weight", "float16"]),
        (dict(weight=torch.ones(1, 8)), ValueError, ["weight", "1 dims"]),
        (dict(x=torch.zeros(8, 4).t()), ValueError, ["x", "contiguous"]),
        (dict(eps=0.0), ValueError, ["eps", "> 0", "0.0"]),
        (dict(eps=-1e-6), ValueError, ["eps"]),
        (dict(out=torch.zeros(4, 9)), ValueError, ["out", "shape"]),
        (dict(x="not a tensor"), TypeError, ["x", "str"]),
    ],
)
def test_bad_inputs(kwargs, exc, words, kernel_backend):
    args = dict(x=torch.zeros(4, 8), weight=torch.ones(8), eps=1e-5, out=None)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        kernel_backend.rms_norm(args["x"], args["weight"], args["eps"], out=args["out"])
    for w in words:
        assert w in str(info.value)


def test_fused_bad_residual(kernel_backend):
    with pytest.raises(ValueError, match="residual"):
        kernel_backend.fused_add_rms_norm(torch.zeros(4, 8), torch.zeros(4, 9), torch.ones(8), 1e-5)


def test_compiles_fullgraph(device, kernel_backend):
    def layer(x, r, w):
        return kernel_backend.rms_norm(kernel_backend.fused_add_rms_norm(x, r, w, 1e-5), w, 1e-5) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    x, w = _inputs((3, 64), torch.float32, device)
    r1, r2 = torch.randn(3, 64, device=device), None
    r2 = r1.clone()
    assert_close(compiled(x, r1, w), layer(x, r2, w), torch.float32)
    assert_close(r1, r2, torch.float32, name="residual")
