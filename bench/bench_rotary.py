"""Benchmark rotary embedding, alone and fused with the KV-cache write (memory-bound: GB/s).

q `[T, Hq, D]` and k `[T, Hkv, D]` are strided views into one fused qkv projection output, as in the model,
rotated in place with rows of the fp32 table of `build_rope_cache` (Llama-3 theta). Decode: one token for
each of 1/8/64 sequences at random positions below 4096; prefill: a prompt's positions 0..T-1.
Bytes per call (e element size, table rows fp32 of D values):
    apply_rotary             read+write q and k 2*T*(Hq+Hkv)*D*e + table rows T*D*4 + positions T*8
    rotary_write_kv_cache    the same + read v T*Hkv*D*e + write k, v to the cache 2*T*Hkv*D*e + slots T*8
    qk_norm_rotary_write_kv_cache   the same + the two q/k norm weights 2*D*e (Qwen3-8B's shape; one pass: the
                             norm reads nothing more)

Library: Hugging Face transformers' `apply_rotary_pos_emb` (what LlamaAttention runs eagerly; out of place,
with cos/sin prepared in the activation dtype outside the timing), plus `index_copy_` for the cache write.
The fused op is also timed as our two unfused launches (`triton_unfused`: apply_rotary then write_kv_cache).
With the q/k norm the library is transformers' Qwen3 prologue: Qwen3RMSNorm on q and on k (out of place, in the
activation dtype), apply_rotary_pos_emb, index_copy_.

    python -m bench.bench_rotary [--quick] [--out DIR] [--cpu-smoke]
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H
from bench import shapes as S

MAX_POSITION = 4096


def apply_rotary_bytes(tokens: int, q_heads: int, kv_heads: int, head_dim: int, elem: int) -> int:
    return 2 * tokens * (q_heads + kv_heads) * head_dim * elem + tokens * head_dim * 4 + tokens * 8


def rotary_write_kv_cache_bytes(tokens: int, q_heads: int, kv_heads: int, head_dim: int, elem: int) -> int:
    return (apply_rotary_bytes(tokens, q_heads, kv_heads, head_dim, elem)
            + 3 * tokens * kv_heads * head_dim * elem + tokens * 8)


def qk_norm_rotary_write_kv_cache_bytes(tokens: int, q_heads: int, kv_heads: int, head_dim: int, elem: int) -> int:
    return rotary_write_kv_cache_bytes(tokens, q_heads, kv_heads, head_dim, elem) + 2 * head_dim * elem


def _make(device, dtype, m: S.ModelShape, decode: bool, n: int, with_cache: bool, qk_norm: bool = False) -> dict:
    from trinfer.triton_kernels import build_rope_cache

    qkv = H.randn((n, (m.n_heads + 2 * m.n_kv_heads) * m.head_dim), dtype, device)
    q = qkv[:, : m.q_size].view(n, m.n_heads, m.head_dim)
    k = qkv[:, m.q_size: m.q_size + m.kv_size].view(n, m.n_kv_heads, m.head_dim)
    v = qkv[:, m.q_size + m.kv_size:].view(n, m.n_kv_heads, m.head_dim)
    max_pos = MAX_POSITION if n <= MAX_POSITION else n
    if decode:
        rng = random.Random(0)
        pos = [rng.randrange(max_pos) for _ in range(n)]
    else:
        pos = list(range(n))
    d = {"qkv": qkv, "q": q, "k": k, "v": v, "positions": torch.tensor(pos, dtype=torch.int64, device=device),
         "table": build_rope_cache(m.head_dim, max_pos, m.rope_theta, device=device)}
    if with_cache:
        bs = S.BLOCK_SIZE
        lens = [p + 1 for p in pos] if decode else [n]
        tables, num_blocks = H.paged_block_tables(lens, bs, "cpu", spare_blocks=4)
        slots = [H.slots_of(tables, s, [p], bs)[0] for s, p in enumerate(pos)] if decode \
            else H.slots_of(tables, 0, range(n), bs)
        shape = (num_blocks, bs, m.n_kv_heads, m.head_dim)
        d.update(k_cache=H.randn(shape, dtype, device), v_cache=H.randn(shape, dtype, device),
                 slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device))
    if qk_norm:  # Qwen3's per-head RMSNorm weights (near 1, as trained ones are)
        d.update(q_norm_weight=(1 + 0.1 * H.randn((m.head_dim,), torch.float32, device)).to(dtype),
                 k_norm_weight=(1 + 0.1 * H.randn((m.head_dim,), torch.float32, device)).to(dtype), norm_eps=m.rms_eps)
    return d


def _cases(fused: bool, qk_norm: bool = False):
    def cases(size: str, dtype: torch.dtype) -> list[H.Case]:
        if qk_norm:
            models = H.size_set(size, S.QK_NORM_MODELS, S.QK_NORM_MODELS, (S.TINY,))
        else:
            models = H.size_set(size, S.MODELS, S.QUICK_ROW_MODELS, (S.TINY,))
        batches = H.size_set(size, S.DECODE_BATCHES, S.QUICK_DECODE_BATCHES, S.TINY_BATCHES)
        prompts = H.size_set(size, S.PREFILL_TOKENS, S.QUICK_PREFILL_TOKENS, S.TINY_TOKENS)
        count = (qk_norm_rotary_write_kv_cache_bytes if qk_norm else
                 rotary_write_kv_cache_bytes if fused else apply_rotary_bytes)
        out = []
        for m in models:
            for decode, ns in ((True, batches), (False, prompts)):
                for n in ns:
                    out.append(H.Case(
                        label=f"{m.name} decode b={n}" if decode else f"{m.name} prefill T={n}", group=m.name,
                        x=n, x_name="tokens",
                        params={"model": m.name, "tokens": n, "phase": "decode" if decode else "prefill",
                                "q_heads": m.n_heads, "kv_heads": m.n_kv_heads, "head_dim": m.head_dim},
                        make_inputs=lambda device, m=m, decode=decode, n=n: _make(device, dtype, m, decode, n, fused,
                                                                                  qk_norm),
                        bytes_moved=count(n, m.n_heads, m.n_kv_heads, m.head_dim, H.itemsize(dtype)), dtype=dtype))
        return out

    return cases


def _hf_cos_sin(i):
    """cos/sin `[1, T, D]` in the activation dtype, as HF's LlamaRotaryEmbedding hands them to every layer."""
    half = i["q"].shape[-1] // 2
    rows = i["table"][i["positions"]]
    cos, sin = rows[:, :half], rows[:, half:]
    dt = i["q"].dtype
    return torch.cat([cos, cos], -1)[None].to(dt), torch.cat([sin, sin], -1)[None].to(dt)


def _hf_build(with_cache: bool):
    def build(i):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = _hf_cos_sin(i)
        q4, k4 = i["q"].transpose(0, 1)[None], i["k"].transpose(0, 1)[None]   # [1, H, T, D] views, as HF has them
        if not with_cache:
            def call():
                qe, ke = apply_rotary_pos_emb(q4, k4, cos, sin)
                return qe[0].transpose(0, 1), ke[0].transpose(0, 1)

            return call
        write = _hf_rotate_and_write(i)

        def call_with_cache():
            return write(q4, k4, cos, sin)

        return call_with_cache

    return build


def _hf_rotate_and_write(i):
    """A function of (q4, k4, cos, sin): transformers' rotation of the `[1, H, T, D]` q and k, then k and v stored
    at their slots with `index_copy_`; it returns the rotated (q, k) as `[T, H, D]`."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    k_cache, v_cache, slots, v = i["k_cache"], i["v_cache"], i["slot_mapping"], i["v"]
    h, d = k_cache.shape[2], k_cache.shape[3]

    def write(q4, k4, cos, sin):
        qe, ke = apply_rotary_pos_emb(q4, k4, cos, sin)
        ke = ke[0].transpose(0, 1)
        k_cache.view(-1, h, d).index_copy_(0, slots, ke)
        v_cache.view(-1, h, d).index_copy_(0, slots, v)
        return qe[0].transpose(0, 1), ke

    return write


def _hf_qwen3_build(i):
    """transformers' Qwen3 attention prologue: q_norm / k_norm on the projection's head views, the rotation,
    the cache write."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    cos, sin = _hf_cos_sin(i)
    q, k = i["q"], i["k"]
    norms = []
    for name in ("q_norm_weight", "k_norm_weight"):
        norm = Qwen3RMSNorm(q.shape[-1], eps=i["norm_eps"]).to(device=q.device, dtype=q.dtype)
        with torch.no_grad():
            norm.weight.copy_(i[name])
        norms.append(norm)
    write = _hf_rotate_and_write(i)  # Qwen3's apply_rotary_pos_emb is Llama's

    @torch.no_grad()
    def call():
        return write(norms[0](q).transpose(0, 1)[None], norms[1](k).transpose(0, 1)[None], cos, sin)

    return call


def _norm_kwargs(i):
    return {"q_norm_weight": i["q_norm_weight"], "k_norm_weight": i["k_norm_weight"], "norm_eps": i["norm_eps"]}


def _rot_args(i):
    return i["q"], i["k"], i["positions"], i["table"]


def _fused_args(i):
    return i["q"], i["k"], i["v"], i["positions"], i["table"], i["k_cache"], i["v_cache"], i["slot_mapping"]


def _unfused(i):
    apply_rotary, write_kv_cache = H.triton_op("apply_rotary"), H.triton_op("write_kv_cache")
    q, k, v, pos, table = i["q"], i["k"], i["v"], i["positions"], i["table"]
    k_cache, v_cache, slots = i["k_cache"], i["v_cache"], i["slot_mapping"]

    def call():
        apply_rotary(q, k, pos, table)
        write_kv_cache(k, v, k_cache, v_cache, slots)
        return q, k

    return call


def _written(i, ret):
    """The check of the fused op: the rotated q and k every provider returns, and the cache rows at the
    written slots."""
    h, d = i["k_cache"].shape[2], i["k_cache"].shape[3]
    s = i["slot_mapping"]
    return ret[0], ret[1], i["k_cache"].view(-1, h, d)[s], i["v_cache"].view(-1, h, d)[s]


def benchmarks() -> list[H.Benchmark]:
    hf_note = "transformers apply_rotary_pos_emb (eager, out of place)"
    rot = H.standard_providers(
        ref="apply_rotary_ref", op="apply_rotary", args=_rot_args,
        libraries=[H.Provider("hf_apply_rotary_pos_emb", _hf_build(False), "library", note=hf_note)])
    fused = H.standard_providers(
        ref="rotary_write_kv_cache_ref", op="rotary_write_kv_cache", args=_fused_args,
        libraries=[H.Provider("triton_unfused", _unfused, "ours", note="apply_rotary then write_kv_cache"),
                   H.Provider("hf_rotary+index_copy_", _hf_build(True), "library", note=hf_note + " + index_copy_")])
    qk_norm = H.standard_providers(
        ref="rotary_write_kv_cache_ref", op="rotary_write_kv_cache", args=_fused_args, kwargs=_norm_kwargs,
        ref_kwargs=_norm_kwargs, cuda=False,
        libraries=[H.Provider("hf_qwen3_norm+rotary+index_copy_", _hf_qwen3_build, "library",
                              note="transformers Qwen3RMSNorm x2 + apply_rotary_pos_emb (eager) + index_copy_")])
    return [
        # Every provider returns the rotated (q, k): in place for ours and the reference, new tensors for HF.
        H.Benchmark("apply_rotary", "rotary embedding of q and k, in place", _cases(False), rot),
        H.Benchmark("rotary_write_kv_cache", "rotary embedding fused with the KV-cache write", _cases(True), fused,
                    output=_written),
        H.Benchmark("qk_norm_rotary_write_kv_cache", "Qwen3's per-head q/k RMSNorm, rotary and KV-cache write, "
                    "one kernel", _cases(True, qk_norm=True), qk_norm, output=_written),
    ]


def main(argv=None) -> dict:
    return H.run_cli(benchmarks(), argv, stem="rotary", title="Rotary embedding (+ KV-cache write)",
                     description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
