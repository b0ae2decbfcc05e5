"""Benchmark paged prefill attention: causal attention of a prompt's queries to its paged K/V (TFLOP/s).

Three kinds of case, one sequence each, blocks of 16 tokens drawn from a shuffled pool:
    prompt  a fresh prompt of L tokens (q_len = kv_len = L), contexts 512..32K;
    chunk   512 new tokens continuing a cached prefix (q_len = 512, kv_len = L): chunked prefill (full sweep);
    short   16 new tokens after a long cached prefix (q_len = 16, kv_len = L): a prefix-cache hit or a small chunk,
            where the kernel splits the keys (also in --quick).
`triton` runs the launch plan the engine makes (`plan_prefill_attention`: KV splits where they apply);
`triton_unsplit` the same kernel without a plan, on the chunk and short cases, to show what the split buys.
FLOPs: 4 * Hq * D * (number of causal (query, key) pairs); pairs = q_len*(kv_len - q_len) + q_len*(q_len+1)/2.
Bytes: q and out 2*q_len*Hq*D*e + K and V 2*kv_len*Hkv*D*e (+ the block table), also shown as GB/s.

Library providers get the same K/V gathered into contiguous `[1, Hkv, L, D]` tensors outside the timing (no
paging): `sdpa` (backend chosen by torch), `sdpa_flash`, `sdpa_cudnn`, `sdpa_efficient` (each forced),
and `flex_attention` (compiled, causal block mask). For chunks the mask is causal aligned to the bottom right
(`torch.nn.attention.bias.causal_lower_right`). The reference materializes fp32 scores and is skipped above
REF_MAX_GIB (the check then uses the first library provider that ran).

    python -m bench.bench_prefill_attention [--quick] [--out DIR] [--cpu-smoke]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench import harness as H
from bench import shapes as S
from bench.bench_decode_attention import attention_library_providers, gather_contiguous_kv

REF_MAX_GIB = 6.0
CHUNK = 512
TINY_CHUNK = 8
SHORT = 16
TINY_SHORT = 4


def causal_pairs(q_len: int, kv_len: int) -> int:
    """(query, key) pairs a causal mask keeps when query i sits at position kv_len - q_len + i."""
    if q_len > kv_len:
        raise ValueError(f"q_len: expected <= kv_len {kv_len}, got {q_len}")
    return q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2


def prefill_attention_flops(q_len: int, kv_len: int, q_heads: int, head_dim: int) -> int:
    return 4 * q_heads * head_dim * causal_pairs(q_len, kv_len)


def prefill_attention_bytes(q_len: int, kv_len: int, q_heads: int, kv_heads: int, head_dim: int, elem: int,
                            block_size: int) -> int:
    return (2 * q_len * q_heads * head_dim * elem + 2 * kv_len * kv_heads * head_dim * elem
            + math.ceil(kv_len / block_size) * 4 + 3 * 4)


def _ref_gib(q_len: int, kv_len: int, q_heads: int, head_dim: int) -> float:
    # fp32 scores and probabilities, plus fp32 K/V expanded to every query head.
    return (2 * q_heads * q_len * kv_len * 4 + 2 * kv_len * q_heads * head_dim * 4) / 2**30


def _make(device, dtype, m: S.ModelShape, q_len: int, kv_len: int, bs: int) -> dict:
    from trinfer.triton_kernels import plan_prefill_attention

    tables, num_blocks = H.paged_block_tables([kv_len], bs, device, spare_blocks=4)
    shape = (num_blocks, bs, m.n_kv_heads, m.head_dim)
    q = H.randn((q_len, m.n_heads, m.head_dim), dtype, device)
    plan = plan_prefill_attention([q_len], [kv_len], num_q_heads=m.n_heads, num_kv_heads=m.n_kv_heads,
                                  head_dim=m.head_dim, dtype=dtype, device=device)
    return {
        "q": q, "k_cache": H.randn(shape, dtype, device), "v_cache": H.randn(shape, dtype, device),
        "block_tables": tables, "cu_seqlens_q": torch.tensor([0, q_len], dtype=torch.int32, device=device),
        "kv_lens": torch.tensor([kv_len], dtype=torch.int32, device=device), "scale": m.head_dim ** -0.5,
        "out": torch.empty_like(q), "q_len": q_len, "kv_len": kv_len, "plan": plan,
    }


def cases(size: str, dtype: torch.dtype) -> list[H.Case]:
    models = H.size_set(size, S.MODELS, S.QUICK_MODELS, (S.TINY,))
    contexts = H.size_set(size, S.PREFILL_CONTEXTS, S.QUICK_PREFILL_CONTEXTS, S.TINY_CONTEXTS)
    new_tokens = {"chunk": TINY_CHUNK if size == "tiny" else CHUNK, "short": TINY_SHORT if size == "tiny" else SHORT}
    kinds = ("prompt", "chunk", "short") if size in ("full", "tiny") else ("prompt", "short")
    bs, e = S.BLOCK_SIZE, H.itemsize(dtype)
    out = []
    for m in models:
        for kind in kinds:
            for kv_len in contexts:
                q_len = kv_len if kind == "prompt" else new_tokens[kind]
                if kind != "prompt" and kv_len <= q_len:
                    continue
                label = f"{m.name} prompt L={kv_len}" if kind == "prompt" else f"{m.name} {kind} {q_len}@{kv_len}"
                out.append(H.Case(
                    label=label, group=f"{m.name} {kind}" + (f" {q_len}" if kind != "prompt" else ""),
                    x=kv_len, x_name="context (kv tokens)",
                    params={"model": m.name, "kind": kind, "q_len": q_len, "kv_len": kv_len, "q_heads": m.n_heads,
                            "kv_heads": m.n_kv_heads, "head_dim": m.head_dim, "block_size": bs},
                    make_inputs=lambda device, m=m, q_len=q_len, kv_len=kv_len: _make(device, dtype, m, q_len,
                                                                                       kv_len, bs),
                    bytes_moved=prefill_attention_bytes(q_len, kv_len, m.n_heads, m.n_kv_heads, m.head_dim, e, bs),
                    flops=prefill_attention_flops(q_len, kv_len, m.n_heads, m.head_dim), metric="TFLOP/s",
                    dtype=dtype))
    return out


def _ref_skip(case: H.Case) -> str | None:
    p = case.params
    gib = _ref_gib(p["q_len"], p["kv_len"], p["q_heads"], p["head_dim"])
    return f"reference would materialize ~{gib:.0f} GiB of fp32 scores (> {REF_MAX_GIB} GiB)" if gib > REF_MAX_GIB \
        else None


def _args(i):
    return i["q"], i["k_cache"], i["v_cache"], i["block_tables"], i["cu_seqlens_q"], i["kv_lens"], i["scale"]


def _triton_kwargs(i):
    return {"out": i["out"], "plan": i["plan"]}


def _unsplit_kwargs(i):
    return {"out": i["out"], "max_q_len": i["q_len"]}


def _contiguous(i):
    """q as [1, Hq, q_len, D] and K/V as contiguous [1, Hkv, kv_len, D]; the output view back to [q_len, Hq, D]."""
    k, v = gather_contiguous_kv(i["k_cache"], i["v_cache"], i["block_tables"], [i["kv_len"]])
    q4 = i["q"].transpose(0, 1).unsqueeze(0)
    return q4, k, v


def _sdpa_attend(i):
    from torch.nn.attention.bias import causal_lower_right

    q4, k, v = _contiguous(i)
    scale, q_len, kv_len = i["scale"], i["q_len"], i["kv_len"]
    mask_kw = {"is_causal": True} if q_len == kv_len else {"attn_mask": causal_lower_right(q_len, kv_len)}
    return lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True, **mask_kw)[0].transpose(0, 1)


def _flex_attend(flex, i):
    from torch.nn.attention.flex_attention import create_block_mask

    q4, k, v = _contiguous(i)
    q_len, kv_len, scale = i["q_len"], i["kv_len"], i["scale"]
    offset = kv_len - q_len

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    mask = create_block_mask(causal, None, None, q_len, kv_len, device=q4.device)
    return lambda: flex(q4, k, v, block_mask=mask, scale=scale, enable_gqa=True)[0].transpose(0, 1)


def library_providers() -> list[H.Provider]:
    return attention_library_providers(_sdpa_attend, _flex_attend, "contiguous K/V [1,Hkv,L,D], no paging")


def benchmarks() -> list[H.Benchmark]:
    providers = H.standard_providers(ref="paged_prefill_attention_ref", op="paged_prefill_attention", args=_args,
                                     kwargs=_triton_kwargs, ref_skip=_ref_skip, libraries=library_providers())
    for p in providers:
        if p.name == "cuda":
            p.build = H.bind(lambda: H.cuda_op("paged_prefill_attention"), _args)
    unsplit = H.Provider("triton_unsplit", H.bind(lambda: H.triton_op("paged_prefill_attention"), _args,
                                                  _unsplit_kwargs), "ours",
                         skip=lambda c: "a fresh prompt is never split" if c.params["kind"] == "prompt" else None,
                         note="no launch plan: never split over keys")
    providers.insert(2, unsplit)
    return [H.Benchmark("paged_prefill_attention", "causal attention of new tokens over their paged K/V", cases,
                        providers)]


def main(argv=None) -> dict:
    return H.run_cli(benchmarks(), argv, stem="prefill_attention", title="Paged prefill attention",
                     description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
