"""linear (batch-invariant decode GEMM) and dequantize, for every weight format, against the float64 reference.

Under the interpreter the kernels run with the GPU launch configuration (`gpu_tiles`), not the interpreter's
larger tiles, so that the tile edges, K steps and row tiles exercised are those a GPU runs.
"""
import functools
import importlib

import pytest
import torch

from tolerances import DTYPES, assert_close, poisoned
from trinfer.runtime.quantization import random_weight
from trinfer.triton_kernels import QuantizedWeight, dequantize, linear
from trinfer.triton_kernels.references import dequantize_ref, linear_ref

L = importlib.import_module("trinfer.triton_kernels.linear")  # the module (the package exports the function)

# (name, format, int4 group size): every format the kernel reads
FORMATS = [("dense", "dense", 0), ("int8", "int8", 0), ("int4-g32", "int4", 32), ("int4-g64", "int4", 64),
           ("int4-g128", "int4", 128), ("q8_0", "q8_0", 32), ("q4_0", "q4_0", 32), ("q4_1", "q4_1", 32)]
IDS = [f[0] for f in FORMATS]


@pytest.fixture(autouse=True)
def gpu_tiles(monkeypatch):
    """The GPU's tile sizes also under the interpreter (whose default is whole-K tiles, for speed)."""
    monkeypatch.setattr(L, "linear_launch_config", functools.partial(L.linear_launch_config, interpreter=False))


def make_weight(fmt: str, group: int, n: int, k: int, dtype: torch.dtype, device, seed: int = 1):
    """A `[n, k]` weight with values of std ~1/sqrt(k): dense in `dtype`, or random quantized blocks/words."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if fmt == "dense":
        return (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(dtype)
    return random_weight(fmt, (n, k), device=device, scale=k**-0.5, generator=gen, group_size=group or 128)


def _k_for(fmt: str, k_int: int, k_gguf: int) -> int:
    return k_gguf if fmt.startswith("q") else k_int


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, fmt, group", FORMATS, ids=IDS)
def test_matches_reference(name, fmt, group, dtype, device):
    """M=7 rows of a strided (non-contiguous) x, N=40 (not a multiple of the column tile), K=203 (not a multiple
    of 8, of a group or of the K step; GGUF: 160, five blocks, not a multiple of the K step), bias, NaN-poisoned
    output."""
    n, k = 40, _k_for(fmt, 203, 160)
    w = make_weight(fmt, group, n, k, dtype, device)
    big = torch.randn(7, 2 * k, device=device).to(dtype)
    x = big[:, ::2]  # strides (2k, 2)
    bias = torch.randn(n, device=device).to(dtype)
    out = poisoned((7, n), dtype, device)
    y = linear(x, w, bias, out=out)
    assert y is out
    assert_close(y, linear_ref(x, w, bias), dtype, name=f"linear[{name}]")
    assert_close(linear(x.contiguous(), w), linear_ref(x, w), dtype, name=f"linear[{name}] no bias")


@pytest.mark.parametrize("name, fmt, group", FORMATS, ids=IDS)
def test_batch_invariance_and_row_counts(name, fmt, group, device):
    """Every row alone gives bitwise the same result as inside batches of M = 2, 3, 7, 16 and 64 rows (the first
    M rows), and inside a 64-row batch rotated by 37 rows, so every row is seen at two positions and every
    position is covered; each batch also matches the reference. bf16 (the GPU's dtype); N=13 (one partial
    column tile), K=96 (one partial K step; not a multiple of 64 or 128)."""
    dtype = torch.bfloat16
    n, k = 13, 96
    w = make_weight(fmt, group, n, k, dtype, device)
    x = torch.randn(64, k, device=device).to(dtype)
    alone = torch.cat([linear(x[i:i + 1], w) for i in range(64)])
    assert_close(alone, linear_ref(x, w), dtype, name=f"{name} rows alone")
    for m in (2, 3, 7, 16, 64):
        batch = linear(x[:m], w)
        assert torch.equal(batch, alone[:m]), f"{name}: a batch of {m} rows differs from its rows alone"
    rolled = linear(torch.roll(x, 37, dims=0), w)
    assert torch.equal(rolled, torch.roll(alone, 37, dims=0)), f"{name}: rows moved in the batch changed"


def test_more_rows_than_one_launch(device):
    """70 rows run as a 64-row launch and a 6-row one; each row is still bitwise what it gives alone."""
    n, k = 24, 64
    w = make_weight("int4", 32, n, k, torch.float16, device)
    x = torch.randn(70, k, device=device).half()
    y = linear(x, w)
    assert_close(y, linear_ref(x, w), torch.float16)
    assert torch.equal(y[64:], linear(x[64:], w)) and torch.equal(y[:1], linear(x[:1], w))


def test_leading_dims_and_empty(device):
    w = make_weight("q8_0", 32, 9, 64, torch.float32, device)
    x = torch.randn(2, 3, 64, device=device)
    assert_close(linear(x, w), linear_ref(x, w), torch.float32)
    assert linear(x[:, :0], w).shape == (2, 0, 9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, fmt, group", FORMATS[1:], ids=IDS[1:])
def test_dequantize(name, fmt, group, dtype, device):
    """The dense matrix of every quantized format: bitwise the float64 decode rounded once in fp32 (every
    value but int8's is exact in fp32), within the dtype's rounding in fp16/bf16."""
    w = make_weight(fmt, group, 37, _k_for(fmt, 203, 96), dtype, device)
    want = dequantize_ref(w)
    out = poisoned(w.shape, dtype, device)
    got = dequantize(w, dtype, out=out)
    assert got is out
    if dtype == torch.float32:
        assert torch.equal(got.cpu(), want.float())
    else:
        assert_close(got, want, dtype)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_decode_like_the_gguf_package(type_name, device):
    """Blocks made by the gguf package's quantizer are decoded bitwise as its numpy dequantizer does: by the
    dequantize kernel, by linear on an identity x (fp32: one non-zero product per output), and by the reference."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    rng = np.random.default_rng(0)
    data = rng.standard_normal((6, 96)).astype(np.float32)
    data[1] *= 1e-3
    data[2, :32] = 0.0  # an all-zero block
    data[3] = rng.uniform(0.5, 2.0, 96).astype(np.float32)  # all positive (Q4_1's m > 0)
    kind = getattr(gguf.GGMLQuantizationType, type_name)
    packed = gguf.quants.quantize(data, kind)
    want = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(packed, kind)))
    raw = torch.from_numpy(np.ascontiguousarray(packed)).view(torch.uint8).reshape(6, -1).to(device)
    w = QuantizedWeight(type_name.lower(), (6, 96), raw, group_size=32)
    assert torch.equal(dequantize(w).cpu(), want)
    assert torch.equal(dequantize_ref(w).float().cpu(), want)
    eye = torch.eye(96, device=device)[:64]  # rows 0..63 of the identity: y[m, n] = W[n, m]
    assert torch.equal(linear(eye, w).cpu(), want[:, :64].T)


def test_bad_inputs(device):
    x = torch.randn(3, 64, device=device)
    w = torch.randn(8, 64, device=device)
    with pytest.raises(ValueError, match="weight: expected in_features .* 48, got 64"):
        linear(x[:, :48], w)
    with pytest.raises(TypeError, match="weight: expected dtype float32, got float16"):
        linear(x, w.half())
    with pytest.raises(ValueError, match="bias: expected shape"):
        linear(x, w, torch.randn(7, device=device))
    with pytest.raises(TypeError, match="bias: expected dtype float32"):
        linear(x, w, torch.randn(8, device=device).half())
    with pytest.raises(ValueError, match=r"out: expected shape \(3, 8\), got \(3, 9\)"):
        linear(x, w, out=torch.empty(3, 9, device=device))
    with pytest.raises(TypeError, match="x: expected dtype"):
        linear(x.to(torch.int32), w)
    q = make_weight("int8", 0, 8, 32, torch.float32, device)
    with pytest.raises(ValueError, match="weight: expected in_features"):
        linear(x, q)
    with pytest.raises(TypeError, match="weight: expected a QuantizedWeight"):
        dequantize(w)


def test_quantized_weight_fields_are_validated():
    data = torch.zeros(4, 8, dtype=torch.int32)
    s, z = torch.ones(4, 1, dtype=torch.float16), torch.zeros(4, 1, dtype=torch.uint8)
    QuantizedWeight("int4", (4, 64), data, s, z, 64)  # valid
    cases = [
        (dict(format="int5"), ValueError, "format: expected one of"),
        (dict(group_size=48), ValueError, r"group_size: expected one of \(32, 64, 128\)"),
        (dict(data=data.to(torch.int64)), TypeError, "data: expected dtype int32, got int64"),
        (dict(data=data[:, :7]), ValueError, r"data: expected shape \[4, 8\], got \[4, 7\]"),
        (dict(scales=s[:3]), ValueError, r"scales: expected shape \[4, 1\]"),
        (dict(zeros=z.to(torch.int8)), TypeError, "zeros: expected dtype uint8"),
        (dict(shape=(4, 0)), ValueError, "shape: expected"),
    ]
    for change, exc, msg in cases:
        args = dict(format="int4", shape=(4, 64), data=data, scales=s, zeros=z, group_size=64) | change
        with pytest.raises(exc, match=msg):
            QuantizedWeight(**args)
    with pytest.raises(ValueError, match="shape: q4_0 rows are whole blocks of 32 weights; .* got 40"):
        QuantizedWeight("q4_0", (2, 40), torch.zeros(2, 18, dtype=torch.uint8), group_size=32)
    with pytest.raises(ValueError, match="scales: expected None for q8_0"):
        QuantizedWeight("q8_0", (2, 32), torch.zeros(2, 34, dtype=torch.uint8), torch.ones(2), group_size=32)


def test_rows_and_concat(device):
    a = make_weight("int4", 32, 5, 64, torch.float32, device, seed=1)
    b = make_weight("int4", 32, 3, 64, torch.float32, device, seed=2)
    both = QuantizedWeight.concat([a, b])
    assert both.shape == (8, 64)
    assert torch.equal(dequantize_ref(both), torch.cat([dequantize_ref(a), dequantize_ref(b)]))
    idx = torch.tensor([7, 0, 0, 3])
    assert torch.equal(dequantize_ref(both.rows(idx)), dequantize_ref(both)[idx.to(device)])
    with pytest.raises(ValueError, match="parts\\[1\\]: expected format int4"):
        QuantizedWeight.concat([a, make_weight("int8", 0, 3, 64, torch.float32, device)])


