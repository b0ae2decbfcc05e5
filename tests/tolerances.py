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
