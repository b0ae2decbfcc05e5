"""Every kernel once against its reference, on small inputs that sit on the edges; and one end-to-end generate.

    python -m bench.gpu_cases                     # every case, Triton and (where it loads) CUDA C++, on the GPU
    python -m bench.gpu_cases --backend cuda      # the CUDA C++ cases only (compute-sanitizer's racecheck/synccheck)
    python -m bench.gpu_cases --shard 1/4         # cases 1, 5, 9, ...: the smoke stage runs 4 shards at once
    python -m bench.gpu_cases --e2e               # one generate: trinfer (CUDA graphs, async loop) vs transformers
    python -m bench.gpu_cases --e2e prefix        # the same with Qwen3, prefix-cache hits and chunked prefill
    python -m bench.gpu_cases --cpu --quick       # on the CPU, kernels under the Triton interpreter (the test suite)

The GPU check (bench/gpu_check.sh) runs the cases natively in its smoke stage (a verdict per kernel within a
minute, and every Triton kernel compiled before the sanitizer runs) and again under compute-sanitizer
(bench/gpu_sanitize.sh). The edges: padding rows (a decode sequence of length 0, KV slot -1, a prefill sequence
with no new query), block_size 1 and 256, head_dim 64, 80, 96 and 128 with GQA groups 1 to 4, decode lengths 255,
256 and 257 around the 256-token split, a prefill chunk over a cached prefix, the prefill's KV split as the engine
plans it (a short chunk over 1100 keys beside unsplit sequences), Qwen3's q/k norm in the rotary + KV write; the
decode matrix product `linear` in every weight format (dense, int8, int4, GGUF Q8_0/Q4_0/Q4_1) over 70 rows (two
launches), its rows alone bitwise equal to the batch's (batch invariance), `dequantize`, and the LM head's fused
argmax on quantized weights. Inputs are made on the CPU from a
fixed seed and copied to the device, and the fp32 references run on the CPU: under the sanitizer nearly every
kernel launched is one of ours. Every output starts as NaN and every cache slot no sequence owns holds NaN, so an
unwritten output or a read past a sequence fails. Error: per row (a token's head, a norm row) the relative L2
error ||got - expected|| / ||expected||, the largest over rows (a row the reference leaves at zero must be exactly
zero), against ROW_TOL of the dtype: an all-zero output scores 1, never a pass.

End to end (`--e2e NAME`, E2E_CHECKS): random fp32 models served by the engine, every prompt's greedy tokens against
transformers' on the same weights: `staggered` (head_dim 64, GQA 3, prompts arriving one per step) and `prefix`
(Qwen3 with head_dim 128, prefix-cache hits over a 600-token shared stem, 128-token chunks, KV splits).

Prints one line per case (`ok   NAME`, `FAIL NAME`, `SKIP NAME`) and a last line `gpu_cases: N ok, M failed, K
skipped`; exits 1 when a case failed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

if not torch.cuda.is_available():  # the kernels run on CPU tensors only under the interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROW_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
LP_TOL = 1e-4  # log-probabilities (fp32)


@dataclass(frozen=True)
class Case:
    name: str
    backend: str                                  # "triton" | "cuda"
    run: Callable[[torch.device, object], list]   # (device, kernel module) -> [(label, got, expected, tol)]
    quick: bool = False                           # in the --quick subset (the CPU test)


def row_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest relative L2 error over the rows (`bench.harness.row_rel_errors`)."""
    from bench.harness import row_rel_errors

    err = row_rel_errors(got, expected)
    return float(err.max()) if err.numel() else 0.0


def _randn(*shape, dtype=torch.float32, scale=1.0, gen):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype).to(device)


def _on(t: torch.Tensor, device) -> torch.Tensor:
    """A copy on the device (on the CPU, .to() would alias the input the reference reads afterwards)."""
    return t.to(device, copy=True)


# ----------------------------------------------------------------------------------------------------------
# Row-wise kernels, sampling, rotary, KV writes
# ----------------------------------------------------------------------------------------------------------

def rms_norm_case(dtype, rows, hidden):
    def run(dev, k):
        from trinfer.triton_kernels.references import fused_add_rms_norm_ref, rms_norm_ref

        g = torch.Generator().manual_seed(1)
        x, w, res = _randn(rows, hidden, dtype=dtype, gen=g), 1 + _randn(hidden, dtype=dtype, scale=0.1, gen=g), \
            _randn(rows, hidden, dtype=dtype, gen=g)
        got = k.rms_norm(_on(x, dev), _on(w, dev), 1e-5, out=_nan(x.shape, dtype, dev))
        res_dev = _on(res, dev)
        got_fused = k.fused_add_rms_norm(_on(x, dev), res_dev, _on(w, dev), 1e-5, out=_nan(x.shape, dtype, dev))
        res_ref = res.clone()
        fused = fused_add_rms_norm_ref(x, res_ref, w, 1e-5)
        tol = ROW_TOL[dtype]
        return [("rms_norm", got, rms_norm_ref(x, w, 1e-5), tol), ("fused_add_rms_norm", got_fused, fused, tol),
                ("fused residual", res_dev, res_ref, tol)]
    return run


def silu_case(dtype, rows, inter):
    def run(dev, k):
        from trinfer.triton_kernels.references import silu_and_mul_ref

        x = _randn(rows, 2 * inter, dtype=dtype, scale=2.0, gen=torch.Generator().manual_seed(2))
        got = k.silu_and_mul(_on(x, dev), out=_nan((rows, inter), dtype, dev))
        return [("silu_and_mul", got, silu_and_mul_ref(x), ROW_TOL[dtype])]
    return run


def _exact_check(label, got, expected):
    """Compared exactly (token ids; a result that must be bitwise the same): as a 'row error' of 0 (equal) or inf."""
    same = torch.equal(got.cpu(), expected.cpu())
    return (label, torch.zeros(1) if same else torch.full((1,), math.inf), torch.zeros(1), 0.0)


def greedy_case(rows, vocab):
    def run(dev, k):
        from trinfer.triton_kernels.references import greedy_sample_ref

        logits = _randn(rows, vocab, scale=3.0, gen=torch.Generator().manual_seed(3))
        ids, lp = k.greedy_sample(_on(logits, dev), return_logprobs=True)
        only = k.greedy_sample(_on(logits, dev))
        ref_ids, ref_lp = greedy_sample_ref(logits, return_logprobs=True)
        return [_exact_check("ids", ids, ref_ids), _exact_check("ids (no logprobs)", only, ref_ids),
                ("logprobs", lp[None], ref_lp[None], LP_TOL)]
    return run


def lm_head_case(rows, hidden, vocab):
    def run(dev, k):
        from trinfer.triton_kernels.references import lm_head_greedy_ref

        g = torch.Generator().manual_seed(4)
        h, w = _randn(rows, hidden, gen=g), _randn(vocab, hidden, scale=hidden ** -0.5, gen=g)
        ids, lp = k.lm_head_greedy(_on(h, dev), _on(w, dev), return_logprobs=True)
        ref_ids, ref_lp = lm_head_greedy_ref(h, w, return_logprobs=True)
        return [_exact_check("ids", ids, ref_ids), ("logprobs", lp[None], ref_lp[None], LP_TOL)]
    return run


def rotary_case(dtype, tokens, hq, hk, d):
    def run(dev, k):
        from trinfer.triton_kernels import build_rope_cache
        from trinfer.triton_kernels.references import apply_rotary_ref

        g = torch.Generator().manual_seed(5)
        q, kk = _randn(tokens, hq, d, dtype=dtype, gen=g), _randn(tokens, hk, d, dtype=dtype, gen=g)
        pos = torch.randint(0, 512, (tokens,), generator=g)
        cache = build_rope_cache(d, 512, 500000.0)
        qd, kd = _on(q, dev), _on(kk, dev)
        k.apply_rotary(qd, kd, _on(pos, dev), _on(cache, dev))
        apply_rotary_ref(q, kk, pos, cache)
        return [("q", qd, q, ROW_TOL[dtype]), ("k", kd, kk, ROW_TOL[dtype])]
    return run


def _slots(tokens, num_slots, gen, pad_every=3):
    """Distinct random slots, every `pad_every`-th token -1 (a padding row: no write)."""
    slots = torch.randperm(num_slots, generator=gen)[:tokens]
    slots[::pad_every] = -1
    return slots


def kv_write_case(dtype, tokens, hk, d, block_size, num_blocks, rotary=False, hq=0, qk_norm=False):
    """write_kv_cache (or, with rotary, rotary_write_kv_cache; with qk_norm, Qwen3's per-head q/k RMSNorm fused
    into it) into caches holding a sentinel: the written slots equal the reference's, the others still hold the
    sentinel."""
    def run(dev, k):
        from trinfer.triton_kernels import build_rope_cache
        from trinfer.triton_kernels.references import rotary_write_kv_cache_ref, write_kv_cache_ref

        g = torch.Generator().manual_seed(6)
        kk, v = _randn(tokens, hk, d, dtype=dtype, gen=g), _randn(tokens, hk, d, dtype=dtype, gen=g)
        slots = _slots(tokens, num_blocks * block_size, g)
        kc = torch.full((num_blocks, block_size, hk, d), 7.0, dtype=dtype)
        vc = kc.clone()
        kcd, vcd = _on(kc, dev), _on(vc, dev)
        tol = ROW_TOL[dtype]
        if not rotary:
            k.write_kv_cache(_on(kk, dev), _on(v, dev), kcd, vcd, _on(slots, dev))
            write_kv_cache_ref(kk, v, kc, vc, slots)
            return [("k_cache", kcd, kc, tol), ("v_cache", vcd, vc, tol)]
        q = _randn(tokens, hq, d, dtype=dtype, gen=g)
        pos = torch.randint(0, 300, (tokens,), generator=g)
        cache = build_rope_cache(d, 300)
        qd, kd = _on(q, dev), _on(kk, dev)
        norm = {}
        if qk_norm:
            norm = dict(q_norm_weight=1 + _randn(d, dtype=dtype, scale=0.1, gen=g),
                        k_norm_weight=1 + _randn(d, dtype=dtype, scale=0.1, gen=g), norm_eps=1e-6)
        k.rotary_write_kv_cache(qd, kd, _on(v, dev), _on(pos, dev), _on(cache, dev), kcd, vcd, _on(slots, dev),
                                **{n: _on(w, dev) if isinstance(w, torch.Tensor) else w for n, w in norm.items()})
        rotary_write_kv_cache_ref(q, kk, v, pos, cache, kc, vc, slots, **norm)
        return [("q", qd, q, tol), ("k", kd, kk, tol), ("k_cache", kcd, kc, tol), ("v_cache", vcd, vc, tol)]
    return run


# ----------------------------------------------------------------------------------------------------------
# Decode matrix products (linear) and dequantization, every weight format
# ----------------------------------------------------------------------------------------------------------

def _weight(fmt, group, n, k, dtype, gen):
    """A `[n, k]` weight on the CPU: dense in `dtype`, or random quantized words/blocks (std ~1/sqrt(k))."""
    if fmt == "dense":
        return _randn(n, k, dtype=dtype, scale=k ** -0.5, gen=gen)
    from trinfer.runtime.quantization import random_weight

    return random_weight(fmt, (n, k), device="cpu", scale=k ** -0.5, generator=gen, group_size=group or 128)


def linear_case(fmt, group, dtype, rows, n, k, alone=(0,)):
    """linear(x, W, bias) for one weight format against the float64 reference (a strided x, NaN-filled output;
    more than 64 rows run as two launches); the rows in `alone` computed alone are bitwise their rows of the batch
    (batch invariance); for a quantized W, dequantize against the float64 decode."""
    def run(dev, k_):
        from trinfer.triton_kernels.references import dequantize_ref, linear_ref

        g = torch.Generator().manual_seed(9)
        w = _weight(fmt, group, n, k, dtype, g)
        wd = w.to(dev) if fmt != "dense" else _on(w, dev)
        x = _randn(rows, 2 * k, dtype=dtype, gen=g)[:, ::2]  # strides (2k, 2)
        bias = _randn(n, dtype=dtype, gen=g)
        xd = torch.empty(rows, 2 * k, dtype=dtype, device=dev)[:, ::2].copy_(x)
        got = k_.linear(xd, wd, _on(bias, dev), out=_nan((rows, n), dtype, dev))
        tol = ROW_TOL[dtype]
        out = [(f"linear[{fmt}]", got, linear_ref(x, w, bias), tol)]
        for r in alone:
            out.append(_exact_check(f"row {r} alone (bitwise)", k_.linear(xd[r:r + 1], wd, _on(bias, dev)),
                                    got[r:r + 1]))
        if fmt != "dense":
            deq = k_.dequantize(wd, dtype, out=_nan((n, k), dtype, dev))
            out.append(("dequantize", deq, dequantize_ref(w).to(dtype), tol))
        return out
    return run


def lm_head_quantized_case(fmt, rows, hidden, vocab):
    """lm_head_greedy on a quantized LM head (its tiles decoded in the kernel, the argmax fused) against the
    reference on the float64-decoded matrix."""
    def run(dev, k):
        from trinfer.triton_kernels.references import dequantize_ref, lm_head_greedy_ref

        g = torch.Generator().manual_seed(10)
        h, w = _randn(rows, hidden, gen=g), _weight(fmt, 0, vocab, hidden, torch.float32, g)
        ids, lp = k.lm_head_greedy(_on(h, dev), w.to(dev), return_logprobs=True)
        ref_ids, ref_lp = lm_head_greedy_ref(h, dequantize_ref(w).float(), return_logprobs=True)
        return [_exact_check("ids", ids, ref_ids), ("logprobs", lp[None], ref_lp[None], LP_TOL)]
    return run


# ----------------------------------------------------------------------------------------------------------
# Paged attention
# ----------------------------------------------------------------------------------------------------------

def paged_batch(kv_lens, hk, d, dtype, block_size, gen):
    """(k_cache, v_cache, block_tables) on the CPU: each sequence's tokens in blocks of one shuffled pool,
    random; every slot no sequence owns NaN; table entries past a sequence's blocks -1."""
    from bench.harness import paged_block_tables

    tables, num_blocks = paged_block_tables(kv_lens, block_size, torch.device("cpu"), spare_blocks=2)
    kc = torch.full((num_blocks, block_size, hk, d), float("nan"), dtype=dtype)
    vc = kc.clone()
    for s, n in enumerate(kv_lens):
        t = torch.arange(n)
        blocks, offs = tables[s, t // block_size].long(), t % block_size
        kc[blocks, offs] = _randn(n, hk, d, dtype=dtype, gen=gen)
        vc[blocks, offs] = _randn(n, hk, d, dtype=dtype, gen=gen)
    return kc, vc, tables


def prefill_case(dtype, d, hq, hk, block_size, lens, split_keys=0):
    """lens: (q_len, kv_len) per sequence; q_len 0 is a sequence with no new query, kv_len > q_len a chunk.
    split_keys > 0: launched with the engine's plan (`plan_prefill_attention`, splits of at least that many
    keys), which must split some sequence: the KV-split kernel and its reduce."""
    def run(dev, k):
        from trinfer.triton_kernels.references import paged_prefill_attention_ref

        g = torch.Generator().manual_seed(7)
        q_lens, kv_lens = [a for a, _ in lens], [b for _, b in lens]
        kc, vc, tables = paged_batch(kv_lens, hk, d, dtype, block_size, g)
        q = _randn(sum(q_lens), hq, d, dtype=dtype, gen=g)
        cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
        kv = torch.tensor(kv_lens, dtype=torch.int32)
        scale = d ** -0.5
        launch = dict(max_q_len=max(q_lens))
        if split_keys:
            from trinfer.triton_kernels import plan_prefill_attention

            plan = plan_prefill_attention(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hk, head_dim=d, dtype=dtype,
                                          device=dev, min_split_keys=split_keys)
            if not plan.split:
                raise AssertionError(f"the plan splits no sequence of {lens}: the case tests nothing")
            launch = dict(plan=plan)
        got = k.paged_prefill_attention(_on(q, dev), _on(kc, dev), _on(vc, dev), _on(tables, dev), _on(cu, dev),
                                        _on(kv, dev), scale, out=_nan(q.shape, dtype, dev), **launch)
        return [("out", got, paged_prefill_attention_ref(q, kc, vc, tables, cu, kv, scale), ROW_TOL[dtype])]
    return run


def decode_case(dtype, d, hq, hk, block_size, lens):
    """lens: keys per sequence; 0 is a padding row (zeros out)."""
    def run(dev, k):
        from trinfer.triton_kernels.references import paged_decode_attention_ref

        g = torch.Generator().manual_seed(8)
        kc, vc, tables = paged_batch(lens, hk, d, dtype, block_size, g)
        q = _randn(len(lens), hq, d, dtype=dtype, gen=g)
        n = torch.tensor(lens, dtype=torch.int32)
        scale = d ** -0.5
        got = k.paged_decode_attention(_on(q, dev), _on(kc, dev), _on(vc, dev), _on(tables, dev), _on(n, dev), scale,
                                       out=_nan(q.shape, dtype, dev))
        return [("out", got, paged_decode_attention_ref(q, kc, vc, tables, n, scale), ROW_TOL[dtype])]
    return run


# (head_dim, q heads, kv heads, dtype, block_size): GQA groups 4, 3, 3, 1; the two odd head dims with the extreme
# block sizes.
ATTENTION = [(64, 8, 2, torch.bfloat16, 16), (80, 6, 2, torch.float16, 1), (96, 12, 4, torch.float16, 256),
             (128, 4, 4, torch.bfloat16, 16)]
DECODE_LENS = [257, 0, 256, 1, 255]                      # around the 256-token split; a padding row
PREFILL_LENS = [(17, 17), (0, 5), (1, 1), (40, 300)]     # a fresh prompt, no new query, one token, a chunk
SPLIT_LENS = [(16, 1100), (0, 40), (300, 300), (1, 700)]  # 4 splits; no query; unsplit; 2 splits
# (format, int4 group, activation dtype): every format the linear kernel reads
LINEAR = [("dense", 0, torch.bfloat16), ("int8", 0, torch.bfloat16), ("int4", 128, torch.float16),
          ("int4", 32, torch.bfloat16), ("q8_0", 0, torch.bfloat16), ("q4_0", 0, torch.float16),
          ("q4_1", 0, torch.bfloat16)]


def cases() -> list[Case]:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    out = [
        Case("rms_norm + fused_add_rms_norm bf16 [5, 576]", "triton", rms_norm_case(bf16, 5, 576), quick=True),
        Case("rms_norm + fused_add_rms_norm fp16 [3, 4096]", "triton", rms_norm_case(fp16, 3, 4096)),
        Case("silu_and_mul bf16 [5, 2x1536]", "triton", silu_case(bf16, 5, 1536), quick=True),
        Case("greedy_sample fp32 [3, 49152]", "triton", greedy_case(3, 49152)),
        Case("lm_head_greedy fp32 [3, 256] x [5003, 256]", "triton", lm_head_case(3, 256, 5003), quick=True),
        Case("apply_rotary bf16 9/3 heads d64", "triton", rotary_case(bf16, 6, 9, 3, 64), quick=True),
        Case("rotary_write_kv_cache fp16 d96 bs1 (slot -1 rows)", "triton",
             kv_write_case(fp16, 7, 2, 96, 1, 16, rotary=True, hq=6), quick=True),
        Case("rotary_write_kv_cache bf16 d80 bs256 (slot -1 rows)", "triton",
             kv_write_case(bf16, 9, 2, 80, 256, 2, rotary=True, hq=4)),
        Case("write_kv_cache bf16 d80 bs1 (slot -1 rows)", "triton", kv_write_case(bf16, 7, 2, 80, 1, 12), quick=True),
        Case("write_kv_cache fp16 d128 bs256 (slot -1 rows)", "triton", kv_write_case(fp16, 9, 8, 128, 256, 2)),
        Case("rotary_write_kv_cache + q/k norm (Qwen3) bf16 d128 8/4 heads bs16 (slot -1 rows)", "triton",
             kv_write_case(bf16, 9, 4, 128, 16, 4, rotary=True, hq=8, qk_norm=True)),
        Case("rotary_write_kv_cache + q/k norm (Qwen3) fp16 d64 4/2 heads bs1 (slot -1 rows)", "triton",
             kv_write_case(fp16, 5, 2, 64, 1, 8, rotary=True, hq=4, qk_norm=True), quick=True),
    ]
    # linear: 70 rows (a 64-row launch and a 6-row one), N 200 (a partial column tile), K 300 (GGUF: 320, ten
    # blocks), rows 0, 37 and 69 alone bitwise; and dequantize.
    for fmt, group, dt in LINEAR:
        k = 320 if fmt.startswith("q") else 300
        tag = f"{fmt}{f'-g{group}' if group else ''} {str(dt)[6:]}"
        out.append(Case(f"linear[{tag}] + dequantize [70, {k}] x [200, {k}]", "triton",
                        linear_case(fmt, group, dt, 70, 200, k, alone=(0, 37, 69))))
    out += [
        Case("linear[dense fp32] [5, 300] x [200, 300]", "triton", linear_case("dense", 0, fp32, 5, 200, 300)),
        Case("linear[int4-g32 fp16] + dequantize [5, 96] x [24, 96]", "triton",
             linear_case("int4", 32, fp16, 5, 24, 96, alone=(0, 4)), quick=True),
        Case("linear[q4_1 fp32] + dequantize [3, 64] x [16, 64]", "triton", linear_case("q4_1", 0, fp32, 3, 16, 64),
             quick=True),
        Case("lm_head_greedy[q8_0] fp32 [3, 256] x [3001, 256]", "triton", lm_head_quantized_case("q8_0", 3, 256, 3001)),
        Case("lm_head_greedy[q4_0] fp32 [2, 64] x [300, 64]", "triton", lm_head_quantized_case("q4_0", 2, 64, 300),
             quick=True),
    ]
    for d, hq, hk, dt, bs in ATTENTION:
        tag = f"d{d} {hq}/{hk} heads {str(dt)[6:]} bs{bs}"
        out.append(Case(f"paged_prefill_attention {tag} q/kv lens {PREFILL_LENS}", "triton",
                        prefill_case(dt, d, hq, hk, bs, PREFILL_LENS)))
        out.append(Case(f"paged_decode_attention {tag} lens {DECODE_LENS}", "triton",
                        decode_case(dt, d, hq, hk, bs, DECODE_LENS)))
    # The KV split (a short chunk over a long cached prefix, as the engine plans it: splits of >= 256 keys) beside
    # unsplit sequences in one launch.
    for d, hq, hk, dt, bs in (ATTENTION[0], ATTENTION[3]):
        out.append(Case(f"paged_prefill_attention KV split d{d} {hq}/{hk} heads {str(dt)[6:]} bs{bs} q/kv lens "
                        f"{SPLIT_LENS}", "triton", prefill_case(dt, d, hq, hk, bs, SPLIT_LENS, split_keys=256)))
    # The same edges, shorter, for the interpreter (the test suite): no query, block size 1, head_dim 80.
    out.append(Case("paged_prefill_attention KV split d64 4/2 heads fp16 bs4 q/kv lens [(3, 40), (0, 5), (2, 2)]",
                    "triton", prefill_case(fp16, 64, 4, 2, 4, [(3, 40), (0, 5), (2, 2)], split_keys=8), quick=True))
    out.append(Case("paged_prefill_attention d80 6/2 heads fp16 bs1 q/kv lens [(3, 3), (0, 2), (2, 9)]", "triton",
                    prefill_case(fp16, 80, 6, 2, 1, [(3, 3), (0, 2), (2, 9)]), quick=True))
    out.append(Case("paged_decode_attention d96 6/2 heads fp16 bs1 lens [0, 3, 17]", "triton",
                    decode_case(fp16, 96, 6, 2, 1, [0, 3, 17]), quick=True))
    out += [
        Case("cuda rms_norm + fused_add_rms_norm bf16 [5, 576]", "cuda", rms_norm_case(bf16, 5, 576)),
        Case("cuda rms_norm + fused_add_rms_norm fp32 [3, 8192]", "cuda", rms_norm_case(fp32, 3, 8192)),
        Case("cuda greedy_sample fp32 [3, 49152]", "cuda", greedy_case(3, 49152)),
        Case("cuda write_kv_cache bf16 d80 bs1 (slot -1 rows)", "cuda", kv_write_case(bf16, 7, 2, 80, 1, 12)),
        Case("cuda write_kv_cache fp16 d96 bs256 (slot -1 rows)", "cuda", kv_write_case(fp16, 9, 4, 96, 256, 2)),
    ]
    for d, hq, hk, dt, bs in ATTENTION:
        out.append(Case(f"cuda paged_decode_attention d{d} {hq}/{hk} heads {str(dt)[6:]} bs{bs} lens {DECODE_LENS}",
                        "cuda", decode_case(dt, d, hq, hk, bs, DECODE_LENS)))
    return out


def kernel_module(backend: str):
    """(module, None) or (None, why it cannot run here)."""
    if backend == "triton":
        import trinfer.triton_kernels as tk

        return tk, None
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    import trinfer.cuda_kernels as ck

    if not ck.is_available():
        try:
            ck.load_jit(build=False)  # only a finished build (bench/gpu_check.sh builds in its own stage)
        except RuntimeError as exc:
            return None, f"CUDA C++ backend not loaded: {str(exc).splitlines()[0]}"
    return ck, None


def run_cases(selected: list[Case], device: torch.device, log=print) -> tuple[int, int, int]:
    ok = failed = skipped = 0
    for case in selected:
        module, why = kernel_module(case.backend)
        if module is None:
            log(f"SKIP {case.name}: {why}")
            skipped += 1
            continue
        t0 = time.perf_counter()
        try:
            checks = case.run(device, module)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            worst = [(label, row_error(got, exp), tol) for label, got, exp, tol in checks]
            bad = [f"{label} {err:.3g} > {tol:g}" for label, err, tol in worst if not err <= tol]
        except Exception:  # noqa: BLE001 - a crash is this case's failure; the next case still runs
            bad = ["raised:\n" + traceback.format_exc(limit=6)]
            worst = []
        secs = time.perf_counter() - t0
        if bad:
            failed += 1
            log(f"FAIL {case.name} ({secs:.1f}s): " + "; ".join(bad))
        else:
            ok += 1
            errs = ", ".join(f"{label} {err:.2g}" for label, err, _ in worst)
            log(f"ok   {case.name} ({secs:.1f}s): {errs}")
    return ok, failed, skipped


# ----------------------------------------------------------------------------------------------------------
# End to end: one staggered generate against transformers
# ----------------------------------------------------------------------------------------------------------

E2E_CONFIG = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, vocab_size=4000, max_position_embeddings=1024)
E2E_NEW = 12


@dataclass(frozen=True)
class E2E:
    """One end-to-end check: a random fp32 model of `shape` (with `config` overrides), prompts made of the first
    `stem` tokens of one shared stem and `own` tokens of their own, each added at its arrival step, served with
    `engine` options on top of the check's (Triton, CUDA graphs, async loop on CUDA)."""
    name: str
    shape: str
    config: dict
    prompts: tuple[tuple[int, int], ...]   # (stem tokens, own tokens) per prompt
    arrivals: tuple[int, ...]
    engine: dict
    expect_hits: bool = False              # prefix-cache hits must happen


E2E_CHECKS = {
    # SmolLM2's head layout (head_dim 64, 9 query / 3 KV heads), prompts arriving one per step.
    "staggered": E2E("e2e", "tiny", E2E_CONFIG, ((0, 5), (0, 300), (0, 40), (0, 17)), (0, 1, 2, 3),
                     {}),
    # Qwen3 (q/k norm fused into the rotary + KV write; head_dim 128, twice hidden / heads; GQA 2) with prefix
    # caching and 128-token chunks: prompt 0 (610 tokens) is prefilled in 5 chunks, the last over 512 cached keys
    # (a KV split); prompts 1 and 2 arrive after it and reuse 37 and 18 of its blocks (prompt 1's 33 new tokens
    # over 625 keys: a split); prompt 3 shares nothing.
    "prefix": E2E("e2e-prefix", "tiny-qwen3", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                                   num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                                   vocab_size=4000, max_position_embeddings=1024),
                  ((600, 10), (600, 25), (300, 150), (0, 40)), (0, 8, 9, 10),
                  dict(enable_prefix_caching=True, max_num_batched_tokens=128), expect_hits=True),
}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def e2e_prompts(check: E2E, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(12)
    stem = torch.randint(3, vocab, (max(s for s, _ in check.prompts),), generator=g).tolist()
    return [stem[:s] + torch.randint(3, vocab, (n,), generator=g).tolist() for s, n in check.prompts]


def e2e_check(device: torch.device, log=print, *, check: E2E = E2E_CHECKS["staggered"], near_tie: float = 1e-3,
              new: int = E2E_NEW) -> bool:
    """`check`'s random fp32 model served by the engine (on CUDA: Triton backend, CUDA graphs, async loop; on the
    CPU the torch backend), each prompt's greedy tokens against transformers' generate on the same weights (each
    prompt alone). A difference is accepted only at a near-tie: transformers' logits of the two tokens within
    `near_tie` (random weights can have them; then the rest is not compared). With `expect_hits`, prompts must
    have been served from the prefix cache."""
    from trinfer.runtime import Engine
    from trinfer.runtime.random_model import hf_config_dict, hf_model, random_model

    raw = hf_config_dict(check.shape, **check.config)
    loaded = random_model(raw, device=device, dtype=torch.float32, seed=11)
    cuda = device.type == "cuda"
    eng = Engine(loaded, backend="triton" if cuda else "torch", block_size=16, max_num_seqs=4, max_model_len=1024,
                 cuda_graphs=True, async_decode=True, **check.engine)
    prompts = e2e_prompts(check, raw["vocab_size"])
    final, step = {}, 0
    t0 = time.perf_counter()
    while len(final) < len(prompts):
        for i, at in enumerate(check.arrivals):
            if at == step:
                eng.add_request(prompts[i], max_new_tokens=new, ignore_eos=True, request_id=i)
        final.update((o.request_id, o.token_ids) for o in eng.step() if o.finished)
        step += 1
        if step > 1000:
            raise RuntimeError(f"{check.name}: not finished after 1000 steps")
    secs = time.perf_counter() - t0
    hf = hf_model(loaded, raw)
    hf.generation_config.eos_token_id = None
    ok = True
    for i, p in enumerate(prompts):
        ids = torch.tensor([p], device=device)
        with torch.inference_mode():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
        k = first_divergence(final[i], ref)
        if k is None:
            continue
        with torch.inference_mode():
            logits = hf(torch.tensor([p + ref[:k]], device=device)).logits[0, -1].float()
        gap = float(logits[ref[k]] - logits[final[i][k]])
        if gap > near_tie:
            ok = False
            log(f"FAIL {check.name} prompt {i} ({len(p)} tokens): token {k} is {final[i][k]}, transformers' {ref[k]} "
                f"(logit gap {gap:.3g}); trinfer {final[i]} vs {ref}")
        else:
            log(f"note {check.name} prompt {i}: a near-tie at token {k} (logit gap {gap:.2g}); the rest not compared")
    r = eng.runner
    graphs = f"{r.num_graph_replays} graph replays, {r.num_eager_decodes} eager decode steps" if cuda else "no graphs"
    if cuda and (not r.graphs or r.num_graph_replays == 0):
        ok = False
        log(f"FAIL {check.name}: CUDA graphs were not replayed ({graphs})")
    hits = eng.prefix_cache_stats.hit_tokens
    if check.expect_hits and hits == 0:
        ok = False
        log(f"FAIL {check.name}: no prompt token was served from the prefix cache")
    verdict = "equal to" if ok else "against"
    log(f"{'ok  ' if ok else 'FAIL'} {check.name}: {len(prompts)} prompts of {[len(p) for p in prompts]} tokens "
        f"({check.shape}, head_dim {raw['head_dim']}) arriving at steps {list(check.arrivals)}, {new} new tokens "
        f"each, {verdict} transformers' greedy tokens; {graphs}; async steps {eng.decode_stats['continued']}/"
        f"{eng.decode_stats['launched']}; {hits} prompt tokens from the prefix cache; served in {secs:.1f}s")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("all", "triton", "cuda"), default="all")
    p.add_argument("--shard", default="0/1", help="I/N: run cases I, I+N, I+2N, ...")
    p.add_argument("--quick", action="store_true", help="the small subset (for the CPU interpreter)")
    p.add_argument("--e2e", nargs="?", const="staggered", choices=sorted(E2E_CHECKS), default=None,
                   help="one end-to-end check only: staggered (default) or prefix (Qwen3, prefix cache, chunks)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (kernels under the Triton interpreter)")
    args = p.parse_args(argv)
    device = torch.device("cpu") if args.cpu or not torch.cuda.is_available() else torch.device("cuda")
    if args.e2e:
        check = E2E_CHECKS[args.e2e]
        try:
            return 0 if e2e_check(device, log=lambda s: print(s, flush=True), check=check) else 1
        except Exception:  # noqa: BLE001 - a crash is the check's failure, said in its own line
            print(f"FAIL {check.name}: raised:\n{traceback.format_exc(limit=8)}", flush=True)
            return 1
    i, n = (int(x) for x in args.shard.split("/"))
    selected = [c for c in cases() if args.backend in ("all", c.backend) and (c.quick or not args.quick)][i::n]
    ok, failed, skipped = run_cases(selected, device, log=lambda s: print(s, flush=True))
    print(f"gpu_cases: {ok} ok, {failed} failed, {skipped} skipped (device {device}, shard {args.shard})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
