"""Speculative decoding for greedy: proposals verified by the target in one pass, output identical to plain greedy.

Layout (vLLM v1's spec_decode, written for this engine):
    config      `speculative=` checked: method, tokens per step, the draft checkpoint, n-gram sizes
    ngram       prompt lookup: what followed the last earlier occurrence of the sequence's last n tokens
    draft       a smaller model with the same tokenizer, run greedily on its own paged KV cache
    accept      the verdict: the longest prefix of the proposal the target decodes itself
    stats       counters per request and per engine
    speculator  the engine's side: who proposes how much this step, back-off, statistics

Each proposer has `propose(seqs, limits) -> token ids per sequence`, `prefill(seqs, num_tokens)` (runs alongside
the target's prefill chunks) and `kv_limit(seq)` (how far its own cache is valid, for the prefix cache). The
scheduler only learns that a decoding sequence has 1 + k query tokens this step (`Sequence.spec_token_ids`); the
model runner scores them in one verify pass, each row a decode row of its own length.
"""
from .accept import num_accepted
from .config import METHODS, SpeculativeConfig, parse_speculative
from .ngram import NgramProposer, ngram_propose
from .speculator import Speculator
from .stats import SpecDecodeStats, SpecState

__all__ = ["METHODS", "SpeculativeConfig", "parse_speculative", "num_accepted", "NgramProposer", "ngram_propose",
           "Speculator", "SpecDecodeStats", "SpecState"]
