"""greedy_sample vs torch.argmax / logsumexp (the reference): ties, NaN, infinities, real vocabularies.

Kernel tests run for each backend (`kernel_backend`: Triton, and CUDA C++ where it can run; conftest.py).
"""
import pytest
import torch

from tolerances import DTYPES, assert_close, poisoned
from trinfer.triton_kernels.references import greedy_sample_ref
from trinfer.triton_kernels.sampling import sample_launch_config

NAN, INF = float("nan"), float("inf")
VOCABS = [32000, 49152, 128256, 151936]


def _poisoned_out(batch, device):
    return torch.full((batch,), -7, dtype=torch.int64, device=device), poisoned((batch,), torch.float32, device)


def _check(m, logits, device, ids_only_form=True):
    """Both forms of backend `m` (ids + logprobs into poisoned buffers; ids only) against the reference."""
    batch = logits.shape[0]
    ids_ref, lp_ref = greedy_sample_ref(logits, return_logprobs=True)
    out = _poisoned_out(batch, device)
    ids, lp = m.greedy_sample(logits, return_logprobs=True, out=out)
    assert ids is out[0] and lp is out[1]
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32
    assert torch.equal(ids.cpu(), ids_ref.cpu()), f"ids {ids.tolist()} != {ids_ref.tolist()}"
    # logprobs are fp32 from the same fp32 logits whatever the input dtype; only the summation order differs.
    assert_close(lp, lp_ref, torch.float32, scale=4, name="logprobs")
    assert torch.equal(lp.isnan().cpu(), lp_ref.isnan().cpu())
    if ids_only_form:
        ids_only = m.greedy_sample(logits, out=out[0].fill_(-7))
        assert torch.equal(ids_only.cpu(), ids_ref.cpu())


def _planted(batch, vocab, dtype, device, scale=3.0):
    """Random rows whose max is tied at several places in different chunks (first of them must win)."""
    x = (torch.randn(batch, vocab, device=device) * scale).to(dtype)
    top = x.float().max().item() + 1.0
    for b in range(batch):
        cols = torch.randperm(vocab)[: min(3, vocab)].sort().values
        x[b, cols.to(device)] = torch.tensor(top, dtype=dtype, device=device)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_real_vocab_sizes(vocab, dtype, device, kernel_backend):
    _check(kernel_backend, _planted(1, vocab, dtype, device), device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, vocab", [(1, 1), (3, 7), (3, 1023), (2, 1025), (1, 3000)])
def test_awkward_shapes(batch, vocab, dtype, device, kernel_backend):
    _check(kernel_backend, _planted(batch, vocab, dtype, device), device)
    _check(kernel_backend, (torch.randn(batch, vocab, device=device) * 5).to(dtype), device)


def test_many_rows(device, kernel_backend):
    _check(kernel_backend, _planted(257, 5, torch.float16, device), device, ids_only_form=False)


def _special_rows(vocab, device):
    """Rows of ties, NaN and infinities, with the interesting values in different chunks."""
    rows = []
    def row(): return torch.randn(vocab, device=device)
    r = torch.full((vocab,), 1.5, device=device); rows.append(r)                     # all equal -> 0
    rows.append(torch.full((vocab,), -INF, device=device))                          # all -inf -> 0, logprob NaN
    rows.append(torch.full((vocab,), NAN, device=device))                           # all NaN -> 0
    r = row(); r[[3000, 1100, 5000]] = 9.0; rows.append(r)                          # ties across chunks -> 1100
    r = row(); r[[1023, 1024]] = 9.0; rows.append(r)                                # tie at a chunk border -> 1023
    r = row(); r[vocab - 1] = NAN; rows.append(r)                                   # NaN in the last chunk wins
    r = row(); r[[4100, 2050, 7000]] = NAN; r[10] = INF; rows.append(r)             # first NaN wins over +inf
    r = row(); r[[5, 4000]] = INF; rows.append(r)                                   # +inf ties -> 5, logprob NaN
    r = row(); r[: vocab // 2] = -INF; rows.append(r)                               # half -inf: finite logprob
    r = torch.full((vocab,), -INF, device=device); r[vocab - 2] = -3.0; rows.append(r)  # one finite: logprob 0
    r = row() * 1e4; rows.append(r)                                                 # large logits, wide range
    r = row() - 1e4; rows.append(r)                                                 # very negative, finite
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_nan_and_infinities(dtype, device, kernel_backend):
    vocab = 8000
    x = _special_rows(vocab, device).to(dtype)
    _check(kernel_backend, x, device)
    ids = kernel_backend.greedy_sample(x)
    assert ids[:8].tolist() == [0, 0, 0, 1100, 1023, vocab - 1, 2050, 5]


def test_tie_between_inf_and_nan_rows_in_large_vocab(device, kernel_backend):
    x = torch.randn(2, 151936, device=device)
    x[0, 140000] = NAN
    x[0, 3] = INF
    x[1, [150000, 130000]] = 50.0
    _check(kernel_backend, x, device, ids_only_form=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_rows(dtype, device, kernel_backend):
    wide = (torch.randn(5, 9000, device=device) * 3).to(dtype)
    x = wide[::2, 100:8292]  # row stride 18000, vocab 8192
    assert not x.is_contiguous()
    _check(kernel_backend, x, device)


def test_logprob_is_logit_minus_logsumexp_and_batch_invariant(device, kernel_backend):
    x = torch.randn(6, 50000, device=device) * 4
    ids, lp = kernel_backend.greedy_sample(x, return_logprobs=True)
    xd = x.double()
    assert_close(lp, xd.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(xd, -1), torch.float32, scale=4)
    for b in (0, 5):
        ids1, lp1 = kernel_backend.greedy_sample(x[b : b + 1], return_logprobs=True)
        assert ids1.item() == ids[b].item()
        assert torch.equal(lp1, lp[b : b + 1]), "logprob depends on the batch size"


def test_launch_config_splits_large_rows():
    cfg = sample_launch_config(128256)
    assert 100 <= cfg["n_chunks"] <= 160
    for vocab in (1, 1024, 1025, 151936, 3_000_000, (1 << 24) - 1):
        cfg = sample_launch_config(vocab)
        assert cfg["n_chunks"] * cfg["block"] >= vocab > (cfg["n_chunks"] - 1) * cfg["block"]
        assert cfg["n_chunks"] <= cfg["block_c"] <= 1024


def test_empty_batch_launches_nothing(device, kernel_backend):
    x = torch.empty(0, 100, device=device)
    assert kernel_backend.greedy_sample(x).shape == (0,)
    ids, lp = kernel_backend.greedy_sample(x, return_logprobs=True)
    assert ids.shape == (0,) and lp.shape == (0,) and ids.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(logits=torch.zeros(2, 8, dtype=torch.int64)), TypeError, ["logits", "dtype", "int64"]),
        (dict(logits=torch.zeros(8)), ValueError, ["logits", "2 dims", "1"]),
        (dict(logits=torch.zeros(2, 3, 8)), ValueError, ["logits", "2 dims", "3"]),
        (dict(logits=torch.zeros(2, 0)), ValueError, ["logits", "vocab", "0"]),
        (dict(logits=torch.zeros(8, 2).t()), ValueError, ["logits", "contiguous"]),
        (dict(logits="nope"), TypeError, ["logits", "str"]),
        (dict(out=torch.zeros(2, dtype=torch.int32)), TypeError, ["out", "int64", "int32"]),
        (dict(out=torch.zeros(3, dtype=torch.int64)), ValueError, ["out", "shape", "(2,)", "(3,)"]),
        (dict(out=(torch.zeros(2, dtype=torch.int64), torch.zeros(2))), TypeError, ["out", "tensor", "tuple"]),
        (dict(return_logprobs=True, out=torch.zeros(2, dtype=torch.int64)), TypeError, ["out", "tuple", "Tensor"]),
        (dict(return_logprobs=True, out=(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.float16))),
         TypeError, ["out[1]", "float32", "float16"]),
        (dict(return_logprobs=True, out=(torch.zeros(2, dtype=torch.int64), torch.zeros(1))),
         ValueError, ["out[1]", "shape"]),
        (dict(return_logprobs=1), TypeError, ["return_logprobs", "bool", "int"]),
    ],
)
def test_bad_inputs(kwargs, exc, words, kernel_backend):
    args = dict(logits=torch.zeros(2, 8), return_logprobs=False, out=None)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        kernel_backend.greedy_sample(args["logits"], return_logprobs=args["return_logprobs"], out=args["out"])
    for w in words:
        assert w in str(info.value)


def test_compiles_fullgraph(device, kernel_backend):
    def step(logits, ids_buf, lp_buf):
        ids, lp = kernel_backend.greedy_sample(logits * 2, return_logprobs=True, out=(ids_buf, lp_buf))
        return kernel_backend.greedy_sample(logits) + ids, lp * 2

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    x = torch.randn(3, 2000, device=device)
    got = compiled(x, *_poisoned_out(3, device))
    want = step(x, *_poisoned_out(3, device))
    assert torch.equal(got[0], want[0])
    assert_close(got[1], want[1], torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_full_batch_cuda(vocab, dtype, device, kernel_backend):
    _check(kernel_backend, _planted(256, vocab, dtype, device), device)
    _check(kernel_backend, _special_rows(vocab, device).to(dtype), device)
