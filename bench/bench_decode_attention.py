"""Benchmark paged decode attention: one query token per sequence over its paged K/V (memory-bound: GB/s).

Batch 1/8/64, contexts 512..32K, every sequence of the batch at the same context, blocks of 16 tokens drawn
from a shuffled pool. Bytes per call (B batch, L context, e element size):
    read K and V  2*B*L*Hkv*D*e  + read q and write out  2*B*Hq*D*e  + block tables and lengths (int32).
FLOPs: 4*B*Hq*L*D (q.K and p.V), shown as TFLOP/s; the headline is GB/s against the copy ceiling.

Library providers (`sdpa*`, `flex_attention`) get the same K/V gathered into a contiguous
`[B, Hkv, L, D]` tensor outside the timing: they do no paging, so they are a bandwidth yardstick rather
than a drop-in alternative. The reference and its compiled form gather and upcast all of K/V to fp32; they
are skipped where that would need more than REF_MAX_GIB (the check then uses the first library provider).

    python -m bench.bench_decode_attention [--quick] [--out DIR] [--cpu-smoke]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench import harness as H
from bench import shapes as S

REF_MAX_GIB = 6.0


def decode_attention_bytes(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int, elem: int,
                           block_size: int) -> int:
    kv = 2 * batch * context * kv_heads * head_dim * elem
    q_out = 2 * batch * q_heads * head_dim * elem
    meta = batch * math.ceil(context / block_size) * 4 + batch * 4
    return kv + q_out + meta


def decode_attention_flops(batch: int, context: int, q_heads: int, head_dim: int) -> int:
    return 4 * batch * q_heads * context * head_dim


def _ref_gib(batch: int, context: int, q_heads: int, head_dim: int) -> float:
    # fp32 K and V expanded to every query head, plus the scores: what a plain reference materializes.
    return (2 * batch * context * q_heads * head_dim * 4 + batch * q_heads * context * 4) / 2**30


def gather_contiguous_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of each sequence (equal lengths) as contiguous `[B, Hkv, L, D]` tensors, for the library providers."""
    bs, h, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    n = lens[0]
    if any(x != n for x in lens):
        raise ValueError(f"lens: expected equal lengths for a contiguous batch, got {lens}")
    pos = torch.arange(n, device=k_cache.device)
    slots = block_tables[:, pos // bs].long() * bs + pos % bs          # [B, L]
    k = k_cache.view(-1, h, d)[slots.flatten()].view(len(lens), n, h, d).transpose(1, 2).contiguous()
    v = v_cache.view(-1, h, d)[slots.flatten()].view(len(lens), n, h, d).transpose(1, 2).contiguous()
    return k, v


def _make(device, dtype, m: S.ModelShape, batch: int, context: int, bs: int) -> dict:
    tables, num_blocks = H.paged_block_tables([context] * batch, bs, device, spare_blocks=4)
    shape = (num_blocks, bs, m.n_kv_heads, m.head_dim)
    q = H.randn((batch, m.n_heads, m.head_dim), dtype, device)
    return {
        "q": q, "k_cache": H.randn(shape, dtype, device), "v_cache": H.randn(shape, dtype, device),
        "block_tables": tables, "seq_lens": torch.full((batch,), context, dtype=torch.int32, device=device),
        "scale": m.head_dim ** -0.5, "out": torch.empty_like(q), "context": context,
    }


def cases(size: str, dtype: torch.dtype) -> list[H.Case]:
    models = H.size_set(size, S.MODELS, S.QUICK_MODELS, (S.TINY,))
    batches = H.size_set(size, S.DECODE_BATCHES, S.QUICK_DECODE_BATCHES, S.TINY_BATCHES)
    contexts = H.size_set(size, S.CONTEXTS, S.QUICK_CONTEXTS, S.TINY_CONTEXTS)
    bs, e = S.BLOCK_SIZE, H.itemsize(dtype)
    out = []
    for m in models:
        for b in batches:
            for ctx in contexts:
                out.append(H.Case(
                    label=f"{m.name} b={b} ctx={ctx}", group=f"{m.name} b={b}", x=ctx, x_name="context (tokens)",
                    params={"model": m.name, "batch": b, "context": ctx, "q_heads": m.n_heads,
                            "kv_heads": m.n_kv_heads, "head_dim": m.head_dim, "block_size": bs},
                    make_inputs=lambda device, m=m, b=b, ctx=ctx: _make(device, dtype, m, b, ctx, bs),
                    bytes_moved=decode_attention_bytes(b, ctx, m.n_heads, m.n_kv_heads, m.head_dim, e, bs),
                    flops=decode_attention_flops(b, ctx, m.n_heads, m.head_dim), dtype=dtype))
    return out


def _ref_skip(case: H.Case) -> str | None:
    p = case.params
    gib = _ref_gib(p["batch"], p["context"], p["q_heads"], p["head_dim"])
    return f"reference would materialize ~{gib:.0f} GiB of fp32 K/V (> {REF_MAX_GIB} GiB)" if gib > REF_MAX_GIB else None


def _args(i):
    return i["q"], i["k_cache"], i["v_cache"], i["block_tables"], i["seq_lens"], i["scale"]


def _with_workspace(get_op):
    """Build a call of `get_op()` (ours: Triton or CUDA C++) as the engine makes it: preallocated `out` and
    split workspace, `max_seq_len` given on the host (no allocation, no sync per call)."""
    return lambda i: _paged_decode(get_op(), i)


def _paged_decode(op, i):
    kwargs = {"out": i["out"], "max_seq_len": i["context"]}
    try:  # a preallocated split workspace, as the engine passes it (no allocation per call)
        from trinfer.triton_kernels.attention import decode_workspace_numel
    except ImportError:
        pass
    else:
        b, hq, d = i["q"].shape
        n = decode_workspace_numel(b, hq, d, i["context"])
        kwargs["workspace"] = torch.empty(max(n, 1), dtype=torch.float32, device=i["q"].device)
    return lambda: op(*_args(i), **kwargs)


def _sdpa_builder(attend: Callable[[dict], Callable], backend_name: str | None):
    def build(i):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        call = attend(i)
        if backend_name is None:
            return call
        backend = getattr(SDPBackend, backend_name)

        def forced():
            with sdpa_kernel([backend]):
                return call()

        return forced

    return build


def _flex_builder(attend: Callable[[Callable, dict], Callable]):
    holder: list = []

    def build(i):
        from torch.nn.attention.flex_attention import flex_attention

        if not holder:
            holder.append(torch.compile(flex_attention))
        return attend(holder[0], i)

    return build


def attention_library_providers(sdpa_attend: Callable[[dict], Callable],
                                flex_attend: Callable[[Callable, dict], Callable], note: str) -> list[H.Provider]:
    """The library providers of the attention benchmarks: `sdpa` (backend chosen by torch), `sdpa_flash`,
    `sdpa_cudnn`, `sdpa_efficient` (each forced), from `sdpa_attend(inputs) -> call`, and `flex_attention`
    (compiled once, on first use), from `flex_attend(flex, inputs) -> call`."""
    return [
        H.Provider("sdpa", _sdpa_builder(sdpa_attend, None), "library", note=note + "; backend chosen by torch"),
        H.Provider("sdpa_flash", _sdpa_builder(sdpa_attend, "FLASH_ATTENTION"), "library", requires_cuda=True,
                   note=note),
        H.Provider("sdpa_cudnn", _sdpa_builder(sdpa_attend, "CUDNN_ATTENTION"), "library", requires_cuda=True,
                   note=note),
        H.Provider("sdpa_efficient", _sdpa_builder(sdpa_attend, "EFFICIENT_ATTENTION"), "library",
                   requires_cuda=True, note=note),
        H.Provider("flex_attention", _flex_builder(flex_attend), "library", requires_cuda=True,
                   note=note + "; torch.compile", costly=True),
    ]


def _contiguous(i):
    """q as [B, Hq, 1, D] and K/V as contiguous [B, Hkv, L, D]."""
    b, hq, d = i["q"].shape
    k, v = gather_contiguous_kv(i["k_cache"], i["v_cache"], i["block_tables"], [i["context"]] * b)
    return i["q"].view(b, hq, 1, d), k, v


def _sdpa_attend(i):
    q4, k, v = _contiguous(i)
    scale, shape = i["scale"], i["q"].shape
    return lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True).view(shape)


def _flex_attend(flex, i):
    q4, k, v = _contiguous(i)
    scale, shape = i["scale"], i["q"].shape
    return lambda: flex(q4, k, v, scale=scale, enable_gqa=True).view(shape)


def library_providers() -> list[H.Provider]:
    return attention_library_providers(_sdpa_attend, _flex_attend, "contiguous K/V [B,Hkv,L,D], no paging")


def benchmarks() -> list[H.Benchmark]:
    providers = H.standard_providers(ref="paged_decode_attention_ref", op="paged_decode_attention", args=_args,
                                     ref_skip=_ref_skip, libraries=library_providers())
    for p in providers:
        if p.name == "triton":
            p.build = _with_workspace(lambda: H.triton_op("paged_decode_attention"))
        elif p.name == "cuda":
            p.build = _with_workspace(lambda: H.cuda_op("paged_decode_attention"))
    return [H.Benchmark("paged_decode_attention", "one query per sequence over its paged K/V", cases, providers)]


def main(argv=None) -> dict:
    return H.run_cli(benchmarks(), argv, stem="decode_attention", title="Paged decode attention",
                     description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
