"""lm_head_greedy (fused LM head + argmax, logits never written) vs matmul + greedy_sample."""
import pytest
import torch

from tolerances import DTYPES, TOL
from trinfer.runtime.quantization import random_weight
from trinfer.triton_kernels import greedy_sample
from trinfer.triton_kernels.references import dequantize_ref
from trinfer.triton_kernels.lm_head import lm_head_greedy
from trinfer.triton_kernels.references.lm_head import lm_head_greedy_ref


def _inputs(batch, hidden, vocab, dtype, device):
    h = torch.randn(batch, hidden, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype)
    return h, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, hidden, vocab", [(1, 64, 1000), (3, 96, 300), (17, 64, 129)])
def test_matches_reference(batch, hidden, vocab, dtype, device):
    h, w = _inputs(batch, hidden, vocab, dtype, device)
    ids_ref, lp_ref = lm_head_greedy_ref(h, w, return_logprobs=True)
    ids = torch.full((batch,), -7, dtype=torch.int64, device=device)
    lps = torch.full((batch,), float("nan"), device=device)
    got_ids, got_lp = lm_head_greedy(h, w, return_logprobs=True, out=(ids, lps))
    assert got_ids is ids and got_lp is lps
    # Summation order differs from the reference matmul; where the top two logits are within that noise
    # the ids may legitimately differ, so compare the chosen logit instead of the index.
    logits = (h.float() @ w.float().T)
    chosen, best = logits.gather(1, ids.view(-1, 1).cpu().to(logits.device)).squeeze(1), logits.max(1).values
    assert torch.all(best - chosen <= TOL[dtype]["atol"] * 4 + 1e-6), (ids, ids_ref)
    agree = ids == ids_ref
    assert agree.float().mean() >= 0.9
    torch.testing.assert_close(lps[agree], lp_ref[agree], atol=TOL[dtype]["atol"] * 4, rtol=TOL[dtype]["rtol"] * 4)
    assert torch.equal(lm_head_greedy(h, w), ids)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s numbers at |x| (float64)."""
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, hidden, vocab", [(70, 96, 300)])
def test_chosen_logit_is_the_fp64_maximum_within_rounding(batch, hidden, vocab, dtype, device):
    """Against float64 logits (not the kernel's own reference): in every row, for the ids-only path and the
    log-probability path alike, the chosen id's exact logit is the maximum up to the kernel's rounding of the
    logits to dtype (each rounded logit within one ulp of the exact one, interpreter truncation included: two
    ulps of the maximum) plus the fp32 accumulation error; the log-probability is the float64 log-softmax at
    that id within the same rounding. So a kernel that drops or misreads part of the dot product fails."""
    h, w = _inputs(batch, hidden, vocab, dtype, device)
    logits = h.double().cpu() @ w.double().cpu().T
    best = logits.max(1).values
    acc = hidden * 2.0 ** -24 * (h.double().abs().cpu() @ w.double().abs().cpu().T).max(1).values  # fp32 sums
    rounding = 0 if dtype == torch.float32 else 1
    slack = 2 * rounding * _ulp(best, dtype) + 2 * acc
    ids_only = lm_head_greedy(h, w)
    ids, lps = lm_head_greedy(h, w, return_logprobs=True)
    for name, got in (("ids-only", ids_only), ("with logprobs", ids)):
        chosen = logits.gather(1, got.cpu().view(-1, 1)).squeeze(1)
        short = best - chosen
        assert torch.all(short <= slack), f"{name}: rows {(short > slack).nonzero().flatten().tolist()} short by " \
                                          f"{short[short > slack].tolist()} (slack {slack[short > slack].tolist()})"
    lp64 = logits.log_softmax(1).gather(1, ids.cpu().view(-1, 1)).squeeze(1)
    amax = logits.abs().max(1).values
    lp_slack = 2 * rounding * _ulp(amax, dtype) + 2 * acc + 1e-5  # + fp32 exp/log
    assert torch.all((lps.double().cpu() - lp64).abs() <= lp_slack), (lps.double().cpu() - lp64).abs().max()


def test_fp32_exact_ids_against_unfused_kernels(device):
    h, w = _inputs(5, 64, 700, torch.float32, device)
    ids = lm_head_greedy(h, w)
    assert torch.equal(ids, greedy_sample(h @ w.T))


def test_ties_go_to_lowest_index_and_nan_wins(device):
    hidden, vocab = 32, 600
    w = torch.zeros(vocab, hidden, device=device)
    w[[5, 300, 450], 0] = 2.0  # three equal best logits in different 128-wide chunks
    h = torch.zeros(2, hidden, device=device)
    h[:, 0] = 1.0
    assert lm_head_greedy(h, w).tolist() == [5, 5]
    w[[420, 410], 3] = float("nan")  # NaN logits at 410 and 420: the first NaN wins, as in torch.argmax
    ids, lps = lm_head_greedy(h, w, return_logprobs=True)
    assert ids.tolist() == [410, 410] == torch.argmax(h @ w.T, dim=1).tolist()
    assert torch.isnan(lps).all()


def test_batch_invariance(device):
    h, w = _inputs(40, 64, 515, torch.float16, device)
    alone = lm_head_greedy(h[7:8].contiguous(), w, return_logprobs=True)
    batched = lm_head_greedy(h, w, return_logprobs=True)
    assert torch.equal(alone[0], batched[0][7:8])
    assert torch.equal(alone[1], batched[1][7:8])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "int4", "q8_0", "q4_0", "q4_1"])
def test_quantized_weight(fmt, dtype, device):
    """A quantized LM head (a GGUF's tied Q8_0 embedding, say) decoded tile by tile in the kernel: the chosen
    logit is the best of `hidden @ W^T` with W decoded in float64, the log-probabilities match the reference on
    the decoded matrix, and a row alone gives bitwise what it gives in the batch."""
    h = torch.randn(6, 96, device=device).to(dtype)
    w = random_weight(fmt, (300, 96), device=device, scale=96 ** -0.5, group_size=32)
    ids, lps = lm_head_greedy(h, w, return_logprobs=True)
    logits = h.double() @ dequantize_ref(w).T
    chosen, best = logits.gather(1, ids.view(-1, 1)).squeeze(1), logits.max(1).values
    assert torch.all(best - chosen <= TOL[dtype]["atol"] * 4 + 1e-6)
    ids_ref, lp_ref = lm_head_greedy_ref(h, dequantize_ref(w).to(dtype), return_logprobs=True)
    agree = ids == ids_ref
    assert agree.float().mean() >= 0.8
    torch.testing.assert_close(lps[agree], lp_ref[agree], atol=TOL[dtype]["atol"] * 4, rtol=TOL[dtype]["rtol"] * 4)
    alone = lm_head_greedy(h[4:5].contiguous(), w, return_logprobs=True)
    assert torch.equal(alone[0], ids[4:5]) and torch.equal(alone[1], lps[4:5])


def test_bad_inputs(device):
    h, w = _inputs(2, 64, 100, torch.float32, device)
    with pytest.raises(ValueError, match="weight.*64.*32"):
        lm_head_greedy(h, w[:, :32].contiguous())
    with pytest.raises(TypeError, match="weight.*float16"):
        lm_head_greedy(h, w.half())
    with pytest.raises(ValueError, match="out.*shape"):
        lm_head_greedy(h, w, out=torch.empty(3, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="out"):
        lm_head_greedy(h, w, return_logprobs=True, out=torch.empty(2, dtype=torch.int64, device=device))
    assert lm_head_greedy(h[:0], w).shape == (0,)


def test_compiles_fullgraph(device):
    h, w = _inputs(2, 64, 200, torch.float32, device)
    fn = torch.compile(lambda h, w: lm_head_greedy(h * 1.0, w), fullgraph=True)
    assert torch.equal(fn(h, w), lm_head_greedy(h, w))
