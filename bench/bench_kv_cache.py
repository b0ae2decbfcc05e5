"""Benchmark the paged KV-cache write: new keys/values scattered into their cache slots (memory-bound).

`k, v [tokens, kv_heads, head_dim]` go to `k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim]` at
`slot_mapping [tokens]` (int64). Decode: one token for each of 1/8/64 sequences, each at a random position of
its own shuffled blocks. Prefill: one prompt's tokens, filling its blocks in order.
Bytes per call (T tokens, e element size): read k, v 2*T*Hkv*D*e + write the same into the caches
2*T*Hkv*D*e + read the slots T*8.

    python -m bench.bench_kv_cache [--quick] [--out DIR] [--cpu-smoke]
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


def write_kv_cache_bytes(tokens: int, kv_heads: int, head_dim: int, elem: int) -> int:
    return 4 * tokens * kv_heads * head_dim * elem + tokens * 8


def _make(device, dtype, m: S.ModelShape, decode: bool, n: int, context: int, block_size: int) -> dict:
    if decode:
        lens = [context] * n                       # n sequences of `context` tokens; write the last one
    else:
        lens = [n]                                 # one prompt of n tokens
    tables, num_blocks = H.paged_block_tables(lens, block_size, device="cpu", spare_blocks=8)
    if decode:
        rng = random.Random(0)
        slots = []
        for s in range(n):
            pos = rng.randrange(context)  # a random position, so writes land in scattered blocks
            slots += H.slots_of(tables, s, [pos], block_size)
    else:
        slots = H.slots_of(tables, 0, range(n), block_size)
    shape = (num_blocks, block_size, m.n_kv_heads, m.head_dim)
    return {
        "k": H.randn((n, m.n_kv_heads, m.head_dim), dtype, device),
        "v": H.randn((n, m.n_kv_heads, m.head_dim), dtype, device),
        "k_cache": H.randn(shape, dtype, device), "v_cache": H.randn(shape, dtype, device),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64, device=device),
    }


def cases(size: str, dtype: torch.dtype) -> list[H.Case]:
    models = H.size_set(size, S.MODELS, S.QUICK_ROW_MODELS, (S.TINY,))
    batches = H.size_set(size, S.DECODE_BATCHES, S.QUICK_DECODE_BATCHES, S.TINY_BATCHES)
    prompts = H.size_set(size, S.PREFILL_TOKENS, S.QUICK_PREFILL_TOKENS, S.TINY_TOKENS)
    context = 4096 if size != "tiny" else 40
    bs = S.BLOCK_SIZE
    out = []
    for m in models:
        for decode, ns in ((True, batches), (False, prompts)):
            for n in ns:
                label = f"{m.name} decode b={n}" if decode else f"{m.name} prefill T={n}"
                out.append(H.Case(
                    label=label, group=m.name, x=n, x_name="tokens written",
                    params={"model": m.name, "tokens": n, "phase": "decode" if decode else "prefill",
                            "kv_heads": m.n_kv_heads, "head_dim": m.head_dim, "block_size": bs},
                    make_inputs=lambda device, m=m, decode=decode, n=n: _make(device, dtype, m, decode, n, context, bs),
                    bytes_moved=write_kv_cache_bytes(n, m.n_kv_heads, m.head_dim, H.itemsize(dtype)), dtype=dtype))
    return out


def _index_copy(k, v, k_cache, v_cache, slot_mapping):
    h, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, h, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, h, d).index_copy_(0, slot_mapping, v)


def _written(inputs: dict, ret) -> tuple[torch.Tensor, torch.Tensor]:
    """What the check compares: the cache rows at the written slots."""
    h, d = inputs["k_cache"].shape[2], inputs["k_cache"].shape[3]
    slots = inputs["slot_mapping"]
    return inputs["k_cache"].view(-1, h, d)[slots], inputs["v_cache"].view(-1, h, d)[slots]


def _args(i):
    return i["k"], i["v"], i["k_cache"], i["v_cache"], i["slot_mapping"]


def benchmarks() -> list[H.Benchmark]:
    providers = H.standard_providers(
        ref="write_kv_cache_ref", op="write_kv_cache", args=_args,
        libraries=[H.Provider("index_copy_", H.bind(lambda: _index_copy, _args), "library",
                              note="Tensor.index_copy_ on the flattened caches (slots >= 0 only)")],
    )
    return [H.Benchmark("write_kv_cache", "scatter new K/V into the paged cache", cases, providers,
                        output=_written)]


def main(argv=None) -> dict:
    return H.run_cli(benchmarks(), argv, stem="kv_cache", title="Paged KV-cache write",
                     description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
