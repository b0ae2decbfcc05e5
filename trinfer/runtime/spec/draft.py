"""Draft-model proposals: a smaller model with the target's tokenizer, run greedily on its own paged KV cache.

The draft's cache mirrors the target's: the same number of blocks, addressed by the same block tables, so block b
of a sequence holds the target's K/V in the target's cache and the draft's K/V of the same tokens in the draft's.
The scheduler's bookkeeping (growth, preemption, the prefix cache, the blocks returned after a verify pass)
thus covers both; the prefix cache publishes a block only once the draft's K/V in it is valid too (`kv_limit`),
so a hit serves both models.

Per sequence the draft's progress is: its K/V is valid below `end`; the last round wrote its proposals at
`base`, `base + 1`, ... (`written`), valid only as far as they match the tokens the target then confirmed. That is
settled lazily (`_valid`: the count of leading matches), so whatever the scheduler cut or the verify pass
rejected, the draft recomputes exactly the positions whose tokens it did not compute itself.

A round for a batch of sequences (`propose`): one prefill-style pass over each sequence's tokens the draft has not
computed (usually its newest token, or two after a fully accepted proposal; more after a back-off) gives the
first proposed token; then one decode step per further token (CUDA graphs on a GPU), each feeding the previous
proposal. Alongside the target's prefill, the draft computes the same chunks (`prefill`). All of it writes only
slots the scheduler gave the sequence for this step.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch

from ..loader import LoadedModel, expected_weight_shapes, load_model_files
from ..sequence import Sequence
from .stats import SpecState


def _num_params(config) -> int:
    total = 0
    for shape in expected_weight_shapes(config).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def load_draft(model, *, target: LoadedModel, device: torch.device, dtype: torch.dtype, keep_quantized: bool,
               max_model_len: int) -> LoadedModel:
    """The draft model (a path, or a LoadedModel on `device` in `dtype`), checked against the target: the same
    vocabulary and tokenizer (ValueError otherwise), a context of at least `max_model_len` (ValueError); a draft
    with more parameters than the target is allowed with a warning (it can only be slower)."""
    if isinstance(model, LoadedModel):
        w = model.weights["norm"]
        if w.device != device or w.dtype != dtype:
            raise ValueError(f"speculative: the draft LoadedModel is on {w.device} in {w.dtype}; the engine runs on "
                             f"{device} in {dtype}")
        draft = model
    elif isinstance(model, (str, os.PathLike)):
        draft = load_model_files(model, device=device, dtype=dtype, keep_quantized=keep_quantized, progress=False)
    else:
        raise TypeError(f"speculative: model expected a checkpoint path (or a LoadedModel), got {type(model).__name__}")
    tc, dc = target.config, draft.config
    if dc.vocab_size != tc.vocab_size:
        raise ValueError(f"speculative: the draft model's vocabulary has {dc.vocab_size} tokens, the target's "
                         f"{tc.vocab_size}; a draft must share the target's tokenizer")
    tt, dt = target.tokenizer, draft.tokenizer
    if (tt is None) != (dt is None):
        which = "draft" if dt is None else "target"
        raise ValueError(f"speculative: the {which} model has no tokenizer to compare with the other's; a draft must "
                         "share the target's tokenizer")
    if tt is not None and tt.backend.get_vocab(with_added_tokens=True) != dt.backend.get_vocab(with_added_tokens=True):
        raise ValueError("speculative: the draft model's tokenizer differs from the target's (another vocabulary "
                         "for the same ids); a draft must share the target's tokenizer")
    if dc.max_position_embeddings < max_model_len:
        raise ValueError(f"speculative: the draft model's context is {dc.max_position_embeddings} tokens, less than "
                         f"the engine's max_model_len {max_model_len}; lower max_model_len")
    dn, tn = _num_params(dc), _num_params(tc)
    if dn > tn:
        warnings.warn(f"speculative: the draft model has {dn / 1e6:.1f}M parameters, the target {tn / 1e6:.1f}M: "
                      "drafting will likely be slower than plain decoding", stacklevel=3)
    return draft


@dataclass(slots=True)
class _Progress:
    end: int = 0                                   # the draft's K/V is valid for positions < end
    base: int = 0                                  # first position of the last round's proposal writes
    written: list[int] = field(default_factory=list)  # the proposals written at base, base + 1, ...


class DraftProposer:
    """Greedy proposals of a draft model (module docstring). `runner`: a ModelRunner over the draft model whose
    KV cache has as many blocks as the target's, with the same block size."""

    name = "draft"
    writes_cache = True  # proposes after scheduling, into the slots the sequence got

    def __init__(self, runner):
        self.runner = runner

    @staticmethod
    def _progress(seq: Sequence) -> _Progress:
        if seq.spec is None:
            seq.spec = SpecState()
        if seq.spec.proposer is None:
            seq.spec.proposer = _Progress()
        return seq.spec.proposer

    def _valid(self, seq: Sequence) -> int:
        """Positions below which the draft's K/V of `seq` is valid (settling the last round's proposals against the
        tokens the target confirmed)."""
        p = self._progress(seq)
        if p.written:  # written at base, base + 1, ... (end == base): valid as far as they are the sequence's tokens
            tokens, matched = seq.token_ids, 0
            for i, t in enumerate(p.written):
                j = p.base + i
                if j >= len(tokens) or tokens[j] != t:
                    break
                matched += 1
            p.end, p.written = p.base + matched, []
        return p.end

    def kv_limit(self, seq: Sequence) -> int:
        return self._valid(seq)

    def prefill(self, seqs: list[Sequence], num_tokens: list[int]) -> None:
        """Compute the target's prefill chunks (from each sequence's num_computed_tokens on) into the draft's cache."""
        starts = [s.num_computed_tokens for s in seqs]
        self.runner.run(seqs, True, num_new_tokens=num_tokens)
        for seq, start, n in zip(seqs, starts, num_tokens):
            p = self._progress(seq)
            p.end, p.written = start + n, []

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """limits[i] (>= 1) tokens for seqs[i], all of whose tokens are on the host; slots up to position
        `len(token_ids) - 1 + limits[i]` must be allocated."""
        starts = [min(self._valid(s), s.num_computed_tokens) for s in seqs]
        firsts, _ = self.runner.run(seqs, True, num_new_tokens=[len(s.token_ids) - d for s, d in zip(seqs, starts)],
                                    starts=starts)
        proposals = [[t] for t in firsts]
        for seq in seqs:
            p = self._progress(seq)
            p.end = p.base = len(seq.token_ids)
            p.written = []
        active = [i for i, k in enumerate(limits) if k > 1]
        j = 1
        while active:  # feed proposal j (at position n + j - 1) to get proposal j + 1
            rows = [seqs[i] for i in active]
            lens = [len(seqs[i].token_ids) + j for i in active]
            fed = [proposals[i][j - 1] for i in active]
            for i, t in zip(active, self.runner.decode_rows(rows, lens, fed)):
                proposals[i].append(t)
                self._progress(seqs[i]).written.append(proposals[i][j - 1])
            j += 1
            active = [i for i in active if limits[i] > j]
        return proposals
