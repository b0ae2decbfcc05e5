"""One tolerance table for every kernel test, and a comparison with a readable mismatch report.

bf16 tolerances are sized for the Triton interpreter, whose fp32 -> bf16 casts truncate instead of
rounding (one bf16 ulp is 2^-8 ~ 3.9e-3 relative; FIELD.md). fp16 casts round exactly as torch does.
"""
import torch

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Relative L2 error per row (the last dim: one token's head, one norm row), ||got - expected|| / ||expected||.
# What long reductions are judged by: at long context an attention output row averages thousands of values and
# its elements are ~1/sqrt(keys) small, so TOL's bf16 atol (2e-2) would pass an all-zero output there; a
# relative error scores it 1. Sized for bf16 outputs rounded (on the GPU) or truncated (the interpreter) a few times.
ROW_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, *, scale: float = 1.0,
                 name: str = "output") -> None:
    """Compare in fp32 with TOL[dtype] (scaled), NaN in the output always failing; report the worst elements."""
    dtype = dtype or expected.dtype
    tol = TOL[dtype]
    atol, rtol = tol["atol"] * scale, tol["rtol"] * scale
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = (a - e).abs().nan_to_num(float("inf")).max().item()
        pairs = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ beyond atol={atol:g} rtol={rtol:g} "
            f"({str(dtype).replace('torch.', '')}); max abs diff {worst:.3g}; first: {pairs}"
        )


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so any element the kernel does not write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, *,
                      name: str = "output") -> None:
    """Every row's relative L2 error (`bench.harness.row_rel_errors`) within ROW_RTOL[dtype]: a row the reference
    leaves at zero must be zero, NaN or inf fails; reports the worst rows."""
    from bench.harness import row_rel_errors

    dtype = dtype or expected.dtype
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: {int((~torch.isfinite(actual)).sum())} non-finite elements"
    err = row_rel_errors(actual, expected)
    tol = ROW_RTOL[dtype]
    bad = err > tol
    if bad.any():
        norms = expected.detach().float().cpu().reshape(err.shape[0], -1).norm(dim=1)
        worst = err.topk(min(5, err.numel())).indices.tolist()
        rows = ", ".join(f"row {i}: {err[i].item():.3g} (|expected| {norms[i].item():.3g})" for i in worst)
        raise AssertionError(f"{name}: {int(bad.sum())}/{err.numel()} rows have a relative L2 error above {tol:g} "
                             f"({str(dtype).replace('torch.', '')}); worst: {rows}")
