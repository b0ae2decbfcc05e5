"""Benchmark greedy sampling: argmax over the vocabulary, with and without the chosen token's logprob.

Memory-bound: one read of the logits. Bytes per call (B batch, V vocab, e element size):
    greedy_sample             read logits B*V*e + write ids B*8
    greedy_sample+logprobs    the same + write logprobs B*4
    lm_head_greedy            read the LM-head weight V*Hd*e + hidden B*Hd*e + write ids B*8 (2*B*Hd*V flops)
Vocabularies: 49,152 (SmolLM2) and 128,256 (Llama-3); decode batches 1/8/64; logits in the run's dtype and,
in the full sweep, also fp32 (an engine may keep logits in fp32). `lm_head_greedy` is the fused final step of
decode (LM head + argmax, logits never written), against cuBLAS + torch.argmax and cuBLAS + our sampler.

    python -m bench.bench_sampling [--quick] [--out DIR] [--cpu-smoke]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H
from bench import shapes as S


def greedy_sample_bytes(batch: int, vocab: int, elem: int, logprobs: bool) -> int:
    return batch * vocab * elem + batch * 8 + (batch * 4 if logprobs else 0)


def _vocabs(size: str) -> list[tuple[str, int]]:
    models = H.size_set(size, S.MODELS, S.QUICK_ROW_MODELS, (S.TINY,))
    seen: dict[int, str] = {}
    for m in models:
        seen.setdefault(m.vocab, m.name)
    return [(name, vocab) for vocab, name in seen.items()]


def _cases(logprobs: bool):
    def cases(size: str, dtype: torch.dtype) -> list[H.Case]:
        dtypes = [dtype] + ([torch.float32] if size == "full" and dtype != torch.float32 else [])
        batches = H.size_set(size, S.DECODE_BATCHES, S.QUICK_DECODE_BATCHES, S.TINY_BATCHES)
        out = []
        for dt in dtypes:
            for name, vocab in _vocabs(size):
                for b in batches:
                    def make(device, b=b, vocab=vocab, dt=dt):
                        # Logits of a real scale (std ~3); randn on bf16 gives ties, which must go to the
                        # lowest index in every provider.
                        logits = H.randn((b, vocab), dt, device, 3.0)
                        return {"logits": logits, "ids": torch.empty(b, dtype=torch.int64, device=device),
                                "lp": torch.empty(b, dtype=torch.float32, device=device)}

                    dn = H.DTYPE_NAMES[dt]
                    out.append(H.Case(
                        label=f"V={vocab} b={b} {dn}", group=f"V={vocab} ({name}) {dn}", x=b, x_name="batch",
                        params={"model": name, "vocab": vocab, "batch": b}, make_inputs=make,
                        bytes_moved=greedy_sample_bytes(b, vocab, H.itemsize(dt), logprobs), dtype=dt))
        return out

    return cases


def _argmax(logits, out):
    return torch.argmax(logits, -1, out=out)


def _max_logsumexp(logits):
    values, ids = torch.max(logits, dim=-1)
    return ids, values.float() - torch.logsumexp(logits.float(), dim=-1)


def _greedy_providers() -> list[H.Provider]:
    return H.standard_providers(
        ref="greedy_sample_ref", op="greedy_sample", args=lambda i: (i["logits"],),
        kwargs=lambda i: {"out": i["ids"]},
        libraries=[H.Provider("torch.argmax", H.bind(lambda: _argmax, lambda i: (i["logits"], i["ids"])), "library")],
    )


def _logprob_providers() -> list[H.Provider]:
    return H.standard_providers(
        ref="greedy_sample_ref", op="greedy_sample", args=lambda i: (i["logits"],),
        kwargs=lambda i: {"return_logprobs": True, "out": (i["ids"], i["lp"])},
        ref_kwargs=lambda i: {"return_logprobs": True},
        libraries=[H.Provider("torch.max+logsumexp", H.bind(lambda: _max_logsumexp, lambda i: (i["logits"],)),
                              "library", note="torch.max, then an fp32 logsumexp (two reads)")],
    )


def lm_head_greedy_bytes(batch: int, hidden: int, vocab: int, elem: int) -> int:
    return vocab * hidden * elem + batch * hidden * elem + batch * 8


def _lm_head_cases(size: str, dtype: torch.dtype) -> list[H.Case]:
    models = H.size_set(size, S.MODELS, S.QUICK_ROW_MODELS, (S.TINY,))
    batches = H.size_set(size, S.DECODE_BATCHES, S.QUICK_DECODE_BATCHES, S.TINY_BATCHES)
    out = []
    for m in models:
        for b in batches:
            def make(device, b=b, m=m):
                # Weight scaled like a trained LM head (std 1/sqrt(hidden)); final-normed hidden states ~ N(0, 1).
                return {"hidden": H.randn((b, m.hidden), dtype, device),
                        "weight": H.randn((m.vocab, m.hidden), dtype, device, m.hidden ** -0.5),
                        "ids": torch.empty(b, dtype=torch.int64, device=device)}

            out.append(H.Case(
                label=f"{m.name} b={b}", group=m.name, x=b, x_name="batch",
                params={"model": m.name, "batch": b, "hidden": m.hidden, "vocab": m.vocab}, make_inputs=make,
                bytes_moved=lm_head_greedy_bytes(b, m.hidden, m.vocab, H.itemsize(dtype)),
                flops=2 * b * m.hidden * m.vocab, dtype=dtype))
    return out


def _linear_argmax(hidden, weight):
    return torch.argmax(torch.nn.functional.linear(hidden, weight), -1)


def _linear_then_greedy(hidden, weight):
    return H.triton_op("greedy_sample")(torch.nn.functional.linear(hidden, weight))


def _lm_head_providers() -> list[H.Provider]:
    args = lambda i: (i["hidden"], i["weight"])  # noqa: E731
    return H.standard_providers(
        ref="lm_head_greedy_ref", op="lm_head_greedy", args=args, kwargs=lambda i: {"out": i["ids"]},
        libraries=[
            H.Provider("F.linear+argmax", H.bind(lambda: _linear_argmax, args), "library",
                       note="cuBLAS logits in the activation dtype, then torch.argmax"),
            H.Provider("F.linear+greedy_sample", H.bind(lambda: _linear_then_greedy, args), "ours",
                       note="cuBLAS logits, then our greedy_sample (unfused)"),
        ])


def _chosen_logits(inputs: dict, ret) -> torch.Tensor:
    """What the lm_head check compares: the exact (fp64) logit of the token each provider chose.

    Logits in bf16/fp16 often tie at the top of a large vocabulary, and a different summation order (cuBLAS,
    the fused kernel, the fp32 reference) can break a near-tie the other way: comparing ids would flag a
    correct kernel. A wrong choice, though, lands on a clearly smaller logit."""
    ids = ret[0] if isinstance(ret, tuple) else ret
    logits = inputs["hidden"].double() @ inputs["weight"].double().T
    return logits.gather(1, ids.long().view(-1, 1)).view(-1)


def _tol(dtype: torch.dtype) -> float:
    # Any differing id is a mismatch (the error is then >= 1/batch); logprobs are fp32 math on equal inputs.
    return 1e-5


def benchmarks() -> list[H.Benchmark]:
    return [
        H.Benchmark("greedy_sample", "argmax over the vocabulary", _cases(False), _greedy_providers(), tol=_tol),
        H.Benchmark("greedy_sample+logprobs", "argmax and the chosen token's log-probability", _cases(True),
                    _logprob_providers(), tol=_tol),
        H.Benchmark("lm_head_greedy", "LM-head matmul fused with greedy sampling (logits never written)",
                    _lm_head_cases, _lm_head_providers(), output=_chosen_logits),
    ]


def main(argv=None) -> dict:
    return H.run_cli(benchmarks(), argv, stem="sampling", title="Greedy sampling",
                     description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
