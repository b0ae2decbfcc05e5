"""Test helper: csrc's CUDA C++ op schemas registered in this process with plain-PyTorch CPU stand-ins.

Only where the real library cannot load (a CPU build of torch): the `trinfer_cuda` namespace can be defined once per
process, so every test module shares the one registration of `register()`. The stand-ins keep the ops' contracts
(out-variants built from the references) and record each call's name and a few arguments in the returned list.

Use with `activate(monkeypatch)`: it marks trinfer.cuda_kernels as loaded and lifts its CUDA-tensor check for the
test, so the wrappers run their real checks and call the stand-ins on CPU tensors.
"""
from __future__ import annotations

import functools
import re

import torch

from trinfer import cuda_kernels as ck
from trinfer.cuda_kernels import _build
from trinfer.triton_kernels.references import (
    fused_add_rms_norm_ref,
    greedy_sample_ref,
    paged_decode_attention_ref,
    rms_norm_ref,
    write_kv_cache_ref,
)

CPU_TORCH = torch.version.cuda is None


def csrc_schemas() -> list[str]:
    """The op schemas of csrc/torch_bindings.cpp's TORCH_LIBRARY block."""
    text = (_build.CSRC_DIR / "torch_bindings.cpp").read_text()
    block = text[text.index(f"TORCH_LIBRARY({_build.OP_NAMESPACE}, m)"):]
    block = block[: block.index("\n}\n")]
    defs = re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", block)
    return ["".join(re.findall(r"\"([^\"]*)\"", d)) for d in defs]


def stand_in_impls(calls: list):
    """CPU implementations with the ops' contracts, built from the references; they record their arguments."""
    def rms_norm(x, weight, out, eps):
        calls.append(("rms_norm", x.shape, out.shape, eps))
        out.copy_(rms_norm_ref(x, weight, eps))

    def fused_add_rms_norm(x, residual, weight, out, eps):
        calls.append(("fused_add_rms_norm", x.shape))
        out.copy_(fused_add_rms_norm_ref(x, residual, weight, eps))

    def greedy_sample(logits, out_ids):
        calls.append(("greedy_sample", logits.shape))
        out_ids.copy_(greedy_sample_ref(logits))

    def greedy_sample_logprobs(logits, out_ids, out_logprobs):
        calls.append(("greedy_sample_logprobs", logits.shape))
        ids, lp = greedy_sample_ref(logits, return_logprobs=True)
        out_ids.copy_(ids)
        out_logprobs.copy_(lp)

    def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
        calls.append(("write_kv_cache", k.shape, slot_mapping.dtype))
        write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)

    def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out, workspace, scale, max_splits,
                               split_tokens):
        calls.append(("paged_decode_attention", max_splits, split_tokens, workspace.numel()))
        capacity = min(block_tables.shape[1] * k_cache.shape[1], max_splits * split_tokens)
        out.copy_(paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens.clamp(max=capacity), scale))

    return dict(rms_norm=rms_norm, fused_add_rms_norm=fused_add_rms_norm, greedy_sample=greedy_sample,
                greedy_sample_logprobs=greedy_sample_logprobs, write_kv_cache=write_kv_cache,
                paged_decode_attention=paged_decode_attention)


@functools.lru_cache(maxsize=1)
def register() -> list:
    """Define csrc's schemas with the stand-ins (once per process); return the list the stand-ins append to.

    Only with a CPU build of torch (a CUDA torch may load the real library in this process). The namespace stays
    registered for the rest of the process (fake kernels reference it); nothing else in a CPU-torch process uses it.
    """
    assert CPU_TORCH, "stand-in ops only where the real trinfer_cuda library cannot load"
    calls: list = []
    lib = torch.library.Library(_build.OP_NAMESPACE, "DEF")
    impls = stand_in_impls(calls)
    schemas = csrc_schemas()
    assert {s[: s.index("(")] for s in schemas} == set(ck._OPS) == set(impls)
    for schema in schemas:
        lib.define(schema)
        name = schema[: schema.index("(")]
        lib.impl(name, impls[name], "CPU")
    ck._register_fakes()
    register.library = lib  # keep the registration alive
    return calls


def activate(monkeypatch) -> list:
    """For one test: the wrappers of trinfer.cuda_kernels call the stand-ins on CPU tensors. Returns the (cleared)
    call record."""
    calls = register()
    monkeypatch.setattr(ck, "_loaded", ck._Library("CPU stand-in (test)"))
    monkeypatch.setattr(ck, "_require_cuda", lambda name, t: None)
    calls.clear()
    return calls
