"""The CUDA C++ backend's Python side: build logic, availability, identical errors, op plumbing; GPU checks.

On a CPU-only machine: setup.py skips the extension with a reason and installing still works; the backend reports
why it is unavailable and every kernel raises a RuntimeError that says how to build; bad arguments raise exactly
the Triton twin's errors; and the op schemas of csrc/torch_bindings.cpp, registered here with a plain-PyTorch
stand-in implementation, carry the arguments the wrappers pass and compile with torch.compile(fullgraph=True).
The kernels' numerics are tested by the kernel tests (`kernel_backend` fixture, conftest.py) on a GPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import cuda_stand_in
from tolerances import assert_close, poisoned
import trinfer.triton_kernels as tk
from trinfer import cuda_kernels as ck
from trinfer.triton_kernels.references import (
    fused_add_rms_norm_ref,
    greedy_sample_ref,
    paged_decode_attention_ref,
    rms_norm_ref,
    write_kv_cache_ref,
)

REPO = Path(__file__).resolve().parents[1]
CPU_TORCH = torch.version.cuda is None
cpu_torch_only = pytest.mark.skipif(not CPU_TORCH, reason="checks the behaviour with a CPU build of torch")


def _paged_inputs(device="cpu", dtype=torch.float32, batch=2, hq=4, hkv=2, d=64, bs=16, max_blocks=3):
    q = torch.randn(batch, hq, d, device=device).to(dtype)
    k_cache = torch.randn(batch * max_blocks, bs, hkv, d, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)
    table = torch.arange(batch * max_blocks, dtype=torch.int32, device=device).view(batch, max_blocks)
    lens = torch.tensor([5, 40][:batch] + [1] * max(0, batch - 2), dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table, lens


def _valid_calls():
    """One valid call per kernel (CPU tensors), as (name, callable taking the backend module)."""
    q, kc, vc, table, lens = _paged_inputs()
    k = torch.randn(3, 2, 64)
    slots = torch.tensor([0, 17, -1])
    return [
        ("rms_norm", lambda m: m.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)),
        ("fused_add_rms_norm", lambda m: m.fused_add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), 1e-5)),
        ("greedy_sample", lambda m: m.greedy_sample(torch.randn(2, 100), return_logprobs=True)),
        ("write_kv_cache", lambda m: m.write_kv_cache(k, k.clone(), kc, vc, slots)),
        ("paged_decode_attention", lambda m: m.paged_decode_attention(q, kc, vc, table, lens, 0.125)),
    ]


# ----------------------------------------------------------------------------------------------------------
# Availability and the not-built error
# ----------------------------------------------------------------------------------------------------------

@cpu_torch_only
def test_unavailable_with_a_cpu_torch_says_why():
    assert ck.is_available() is False
    reason = ck.unavailable_reason()
    assert reason is not None and "CPU build" in reason and torch.__version__ in reason
    assert ck.loaded_from() is None


@cpu_torch_only
@pytest.mark.parametrize("name, call", _valid_calls(), ids=[c[0] for c in _valid_calls()])
def test_kernels_raise_a_clear_error_when_not_built(name, call):
    with pytest.raises(RuntimeError) as info:
        call(ck)
    msg = str(info.value)
    for words in ("CUDA backend not built", "CPU build", "TRINFER_BUILD_CUDA=1", "pip install",
                  "trinfer.cuda_kernels.load_jit()"):
        assert words in msg, msg


@cpu_torch_only
def test_load_jit_refuses_a_cpu_torch():
    with pytest.raises(RuntimeError, match="CPU build"):
        ck.load_jit()


def test_public_api_matches_the_triton_signatures():
    import inspect

    for name in ("rms_norm", "fused_add_rms_norm", "greedy_sample", "write_kv_cache", "paged_decode_attention"):
        assert inspect.signature(getattr(ck, name)) == inspect.signature(getattr(tk, name)), name


# ----------------------------------------------------------------------------------------------------------
# Identical validation errors (checks run before the backend is needed, so this runs everywhere)
# ----------------------------------------------------------------------------------------------------------

def _bad_calls():
    q, kc, vc, table, lens = _paged_inputs()
    k = torch.randn(3, 2, 64)
    slots = torch.tensor([0, 17, -1])
    x = torch.randn(4, 8)
    return {
        "rms_norm-int-x": lambda m: m.rms_norm(x.int(), torch.ones(8), 1e-5),
        "rms_norm-weight-size": lambda m: m.rms_norm(x, torch.ones(9), 1e-5),
        "rms_norm-eps": lambda m: m.rms_norm(x, torch.ones(8), 0.0),
        "rms_norm-out-shape": lambda m: m.rms_norm(x, torch.ones(8), 1e-5, out=torch.empty(4, 9)),
        "fused-residual-shape": lambda m: m.fused_add_rms_norm(x, torch.zeros(4, 9), torch.ones(8), 1e-5),
        "greedy-1d": lambda m: m.greedy_sample(torch.zeros(8)),
        "greedy-empty-vocab": lambda m: m.greedy_sample(torch.zeros(2, 0)),
        "greedy-out-dtype": lambda m: m.greedy_sample(torch.zeros(2, 8), out=torch.zeros(2, dtype=torch.int32)),
        "greedy-out-tuple": lambda m: m.greedy_sample(torch.zeros(2, 8), return_logprobs=True,
                                                      out=torch.zeros(2, dtype=torch.int64)),
        "greedy-flag": lambda m: m.greedy_sample(torch.zeros(2, 8), return_logprobs=1),
        "kv-heads": lambda m: m.write_kv_cache(torch.randn(3, 4, 64), torch.randn(3, 4, 64), kc, vc, slots),
        "kv-slot-dtype": lambda m: m.write_kv_cache(k, k, kc, vc, slots.float()),
        "kv-validate": lambda m: m.write_kv_cache(k, k, kc, vc, torch.tensor([0, 10**6, -1]), validate=True),
        "decode-heads": lambda m: m.paged_decode_attention(torch.randn(2, 3, 64), kc, vc, table, lens, 0.1),
        "decode-scale": lambda m: m.paged_decode_attention(q, kc, vc, table, lens, -1.0),
        "decode-lens-dtype": lambda m: m.paged_decode_attention(q, kc, vc, table, lens.long(), 0.1),
        "decode-split": lambda m: m.paged_decode_attention(q, kc, vc, table, lens, 0.1, split_tokens=24),
        "decode-workspace": lambda m: m.paged_decode_attention(q, kc, vc, table, lens, 0.1, split_tokens=16,
                                                               workspace=torch.zeros(10)),
        "decode-validate": lambda m: m.paged_decode_attention(q, kc, vc, table, torch.tensor([5, 999], dtype=torch.int32),
                                                              0.1, validate=True),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_arguments_raise_the_triton_errors(case):
    call = _bad_calls()[case]
    with pytest.raises((TypeError, ValueError)) as want:
        call(tk)
    with pytest.raises(want.type) as got:
        call(ck)
    assert str(got.value) == str(want.value)


def test_cuda_only_limits_are_named():
    q, kc, vc, table, lens = _paged_inputs(d=48)  # a head_dim the Triton kernels run (padded), not instantiated here
    with pytest.raises(ValueError, match=r"head_dim in \(64, 80, 96, 128, 256\) for the CUDA backend, got 48"):
        ck.paged_decode_attention(q, kc, vc, table, lens, 0.1)
    q, kc, vc, table, lens = _paged_inputs()
    with pytest.raises(ValueError, match="split_tokens: expected at most 4096"):
        ck.paged_decode_attention(q, kc, vc, table, lens, 0.1, split_tokens=8192)
    wide = torch.randn(kc.shape[0], kc.shape[1], kc.shape[2], 65)[..., 1:]  # rows start 4 bytes off 16
    with pytest.raises(ValueError, match="k_cache: expected 16-byte aligned"):
        ck.paged_decode_attention(q, wide, vc, table, lens, 0.1)


# ----------------------------------------------------------------------------------------------------------
# Build logic without CUDA
# ----------------------------------------------------------------------------------------------------------

def _setup_py(env_value: str | None):
    env = {k: v for k, v in os.environ.items() if k != "TRINFER_BUILD_CUDA"}
    if env_value is not None:
        env["TRINFER_BUILD_CUDA"] = env_value
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@cpu_torch_only
def test_setup_py_skips_the_extension_and_says_why():
    auto = _setup_py(None)
    assert auto.returncode == 0, auto.stderr
    assert re.search(r"skipping the CUDA C\+\+ backend: torch \S+ is a CPU build", auto.stdout), auto.stdout
    assert auto.stdout.strip().splitlines()[-1] == "0.1.0"
    off = _setup_py("0")
    assert off.returncode == 0 and "TRINFER_BUILD_CUDA=0" in off.stdout
    forced = _setup_py("1")
    assert forced.returncode != 0
    assert "TRINFER_BUILD_CUDA=1 but the CUDA backend cannot be built: torch" in forced.stderr


@cpu_torch_only
@pytest.mark.slow
def test_installing_without_cuda_still_works(tmp_path):
    """A wheel builds (what `pip install` does) and holds the Python backend but no compiled extension."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(tmp_path.glob("trinfer-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "trinfer/cuda_kernels/__init__.py" in names and "trinfer/cuda_kernels/_build.py" in names
    assert not any(n.startswith("trinfer/_C") for n in names)


# ----------------------------------------------------------------------------------------------------------
# Op plumbing on the CPU: csrc's schemas, a plain-PyTorch stand-in, torch.compile
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def stand_in(monkeypatch):
    """csrc's op schemas registered in this process with CPU stand-ins (tests/cuda_stand_in.py; only where the real
    library cannot load), the wrappers pointed at them; the stand-ins' call record."""
    if not CPU_TORCH:
        pytest.skip("a CUDA torch may load the real trinfer_cuda library in this process")
    return cuda_stand_in.activate(monkeypatch)


def test_wrappers_call_the_ops_with_their_schema_arguments(stand_in):
    x, w = torch.randn(2, 3, 64), torch.rand(64) + 0.5
    assert_close(ck.rms_norm(x, w, 1e-5, out=poisoned(x.shape, x.dtype, "cpu")), rms_norm_ref(x, w, 1e-5))
    assert stand_in[-1] == ("rms_norm", (6, 64), (6, 64), 1e-5)
    r, r_ref = torch.randn_like(x), None
    r_ref = r.clone()
    assert_close(ck.fused_add_rms_norm(x, r, w, 1e-5), fused_add_rms_norm_ref(x, r_ref, w, 1e-5))
    assert_close(r, r_ref)

    logits = torch.randn(3, 500)
    ids, lp = ck.greedy_sample(logits, return_logprobs=True)
    ids_ref, lp_ref = greedy_sample_ref(logits, return_logprobs=True)
    assert torch.equal(ids, ids_ref) and torch.equal(ck.greedy_sample(logits), ids_ref)
    assert_close(lp, lp_ref)

    q, kc, vc, table, lens = _paged_inputs(max_blocks=4)
    kc2, vc2 = kc.clone(), vc.clone()
    k = torch.randn(3, 2, 64)
    slots = torch.tensor([1, 30, -1], dtype=torch.int32)
    ck.write_kv_cache(k, k * 2, kc, vc, slots)
    write_kv_cache_ref(k, k * 2, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert stand_in[-1] == ("write_kv_cache", (3, 2, 64), torch.int32)

    got = ck.paged_decode_attention(q, kc, vc, table, lens, 0.125, split_tokens=16, max_seq_len=40)
    assert_close(got, paged_decode_attention_ref(q, kc, vc, table, lens, 0.125))
    # The grid bound and workspace come from the Triton wrapper's helpers: ceil(40 / 16) = 3 splits.
    assert stand_in[-1] == ("paged_decode_attention", 3, 16, tk.decode_workspace_numel(2, 4, 64, 40, 16))


def test_ops_compile_fullgraph(stand_in):
    q, kc, vc, table, lens = _paged_inputs(max_blocks=4)
    k = torch.randn(2, 2, 64)
    slots = torch.tensor([3, 50])

    def step(x, r, w, logits, k, kc, vc):
        h = ck.rms_norm(ck.fused_add_rms_norm(x, r, w, 1e-5), w, 1e-5)
        ck.write_kv_cache(k, k, kc, vc, slots)
        o = ck.paged_decode_attention(q, kc, vc, table, lens, 0.125, split_tokens=16)
        ids, lp = ck.greedy_sample(logits * 2, return_logprobs=True)
        return h * 2, o + 1, ids + ck.greedy_sample(logits), lp

    args = (torch.randn(3, 64), torch.randn(3, 64), torch.rand(64) + 0.5, torch.randn(2, 300), k)
    r2 = args[1].clone()
    kc2, vc2 = kc.clone(), vc.clone()
    got = torch.compile(step, fullgraph=True, backend="inductor")(*args, kc, vc)
    want = step(args[0], r2, *args[2:], kc2, vc2)
    for g, e in zip(got, want):
        assert_close(g, e, torch.float32) if g.is_floating_point() else torch.equal(g, e)
    assert_close(args[1], r2, name="residual")
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


# ----------------------------------------------------------------------------------------------------------
# GPU only: the real kernels under CUDA graphs, and decode at the real head dims (both backends)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_kernels_replay_in_a_cuda_graph(kernel_backend, device):
    m = kernel_backend
    x, w = torch.randn(4, 576, device=device, dtype=torch.bfloat16), torch.rand(576, device=device).bfloat16()
    res = torch.randn_like(x)
    logits = torch.randn(4, 49152, device=device)
    q, kc, vc, table, lens = _paged_inputs(device, torch.bfloat16, batch=4, hq=9, hkv=3, d=64, max_blocks=8)
    lens.copy_(torch.tensor([1, 17, 100, 128], dtype=torch.int32))
    k = torch.randn(4, 3, 64, device=device, dtype=torch.bfloat16)
    slots = torch.tensor([0, 16, -1, 127], device=device)
    outs = dict(h=torch.empty_like(x), r=torch.empty_like(x), ids=torch.empty(4, dtype=torch.int64, device=device),
                lp=torch.empty(4, device=device), o=torch.empty_like(q))
    ws = torch.empty(tk.decode_workspace_numel(4, 9, 64, 128, 32), device=device)

    def step():
        m.fused_add_rms_norm(x, res, w, 1e-5, out=outs["r"])
        m.rms_norm(outs["r"], w, 1e-5, out=outs["h"])
        m.write_kv_cache(k, k, kc, vc, slots)
        m.paged_decode_attention(q, kc, vc, table, lens, 0.125, out=outs["o"], split_tokens=32, workspace=ws,
                                 max_seq_len=128)
        m.greedy_sample(logits, return_logprobs=True, out=(outs["ids"], outs["lp"]))

    res0 = res.clone()
    step()  # warm-up (Triton compiles) and the eager result
    torch.cuda.synchronize()
    eager = {n: t.clone() for n, t in outs.items()}
    res.copy_(res0)
    for t in outs.values():
        t.fill_(-1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    res.copy_(res0)
    graph.replay()
    torch.cuda.synchronize()
    for n in outs:
        assert torch.equal(outs[n], eager[n]), f"{n} differs between the graph replay and eager"


@pytest.fixture
def cuda_backend(_cuda_backend):
    module, reason = _cuda_backend
    if module is None:
        pytest.skip(f"CUDA C++ backend: {reason}")
    return module


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", ck.HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (28, 4), (32, 2)], ids=["g1", "g3", "g7", "g16"])
def test_decode_every_instantiation_and_batch_invariance(head_dim, dtype, hq, hkv, cuda_backend, device):
    """Each (head_dim, dtype, heads-per-CTA) kernel of the CUDA backend: GQA groups 1 (1 head per CTA), 3 (4, one
    masked), 7 (8, one masked) and 16 (two CTAs of 8), against the reference over poisoned caches, and bitwise
    the same when each sequence is decoded alone (the Triton kernel's own tests cover it the same way)."""
    from paged_cache import make_paged_batch

    kernel_backend = cuda_backend

    lens = [1, 15, 16, 17, 300, 1000]
    pb = make_paged_batch(lens, hkv, head_dim, dtype, device, block_size=16)
    q = torch.randn(len(lens), hq, head_dim, device=device).to(dtype)
    scale = head_dim ** -0.5
    got = kernel_backend.paged_decode_attention(q, pb.k_cache, pb.v_cache, pb.block_tables, pb.kv_lens, scale,
                                                out=poisoned(q.shape, dtype, device), split_tokens=256)
    want = paged_decode_attention_ref(q, pb.k_cache, pb.v_cache, pb.block_tables, pb.kv_lens, scale)
    assert_close(got, want, dtype)
    for s in range(len(lens)):  # alone, with its own (shorter) grid bound: the same bits
        alone = kernel_backend.paged_decode_attention(q[s:s + 1], pb.k_cache, pb.v_cache, pb.block_tables[s:s + 1],
                                                      pb.kv_lens[s:s + 1], scale, split_tokens=256,
                                                      max_seq_len=lens[s])
        assert torch.equal(alone, got[s:s + 1]), f"sequence {s} changes with the batch"
