"""The `speculative=` option: which proposer, how many tokens per step, and its knobs, checked at start-up."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft")
MAX_NUM_TOKENS = 16  # proposals per sequence and step; a verify pass then has up to 17 rows per sequence
MAX_NGRAM = 16


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup: what followed an earlier occurrence of the sequence's last n tokens) or
        "draft" (a smaller model with the same tokenizer, run greedily on its own paged KV cache).
    num_tokens: most tokens proposed per sequence and step (k; the verify pass has k + 1 rows for it).
    model: the draft checkpoint (a Hugging Face directory or a .gguf file, or a LoadedModel on the engine's device
        in its dtype); method "draft" only.
    max_ngram / min_ngram: method "ngram": the longest and shortest suffix looked up (longest first).
    adaptive: adapt each sequence's proposals to how often they are accepted (`speculator.Speculator`): the length
        (the k-th token is proposed only while its estimated chance of acceptance, p^k, covers `row_cost`; at most
        num_tokens, at least 1), and a back-off: a sequence whose proposal is rejected at its first token skips
        proposing for 1, 2, 4, ... up to 16 steps (plain decode rows meanwhile), and proposes every step again once
        one is accepted. False: num_tokens every step.
    row_cost: what one more row costs a verify pass, as a fraction of a decode step (for the adaptive length);
        default per device (`DEFAULT_ROW_COST`).
    """

    method: str
    num_tokens: int = 4
    model: str | None = None
    max_ngram: int = 4
    min_ngram: int = 1
    adaptive: bool = True
    row_cost: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative: unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        for name, lo, hi in (("num_tokens", 1, MAX_NUM_TOKENS), ("max_ngram", 1, MAX_NGRAM),
                             ("min_ngram", 1, MAX_NGRAM)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"speculative: {name} expected an int in {lo}..{hi}, got {v!r}")
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"speculative: min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")
        if self.row_cost is not None and (isinstance(self.row_cost, bool) or not isinstance(self.row_cost, (int, float))
                                          or not 0 < self.row_cost < 1):
            raise ValueError(f"speculative: row_cost expected a number in (0, 1), got {self.row_cost!r}")
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"speculative: adaptive expected a bool, got {type(self.adaptive).__name__}")
        if self.method == "draft":
            if self.model is None:
                raise ValueError("speculative: method 'draft' needs 'model', the draft checkpoint's path (a Hugging "
                                 "Face directory or a .gguf file with the target's tokenizer)")
            from ..loader import LoadedModel

            if not isinstance(self.model, (str, os.PathLike, LoadedModel)):
                raise TypeError(f"speculative: model expected a path (or a LoadedModel), got "
                                f"{type(self.model).__name__}")
        elif self.model is not None:
            raise ValueError(f"speculative: 'model' is the draft checkpoint of method 'draft'; method "
                             f"{self.method!r} takes none")

    def describe(self) -> str:
        """Short form for logs and the CLI, e.g. "ngram k=4" or "draft k=4 (path)"."""
        if self.model is None:
            return f"{self.method} k={self.num_tokens}"
        what = os.fspath(self.model) if isinstance(self.model, (str, os.PathLike)) else "a loaded model"
        return f"{self.method} k={self.num_tokens} ({what})"


_KEYS = ("method", "num_tokens", "model", "max_ngram", "min_ngram", "adaptive", "row_cost")

# One more row of a verify pass, as a fraction of a decode step. CPU: measured with the default model (SmolLM2-135M,
# fp32, torch backend, one thread, AMD EPYC): a pass of 1/2/4/5/9 rows took 41/46/56/68/112 ms, ~0.17 per extra
# row (README, "Speculative decoding"). CUDA: not measured yet; a decode step of a small batch streams the weights
# once whatever its rows, so an extra row is nearly free: 0.05 is a guess the GPU check's rows will confirm or move.
DEFAULT_ROW_COST = {"cpu": 0.17, "cuda": 0.05}


def parse_speculative(value: Any) -> SpeculativeConfig | None:
    """`Engine(speculative=...)`: None (off), a SpeculativeConfig, or a dict such as {"method": "ngram",
    "num_tokens": 4} or {"method": "draft", "model": PATH, "num_tokens": 4}. ValueError/TypeError name the key."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"speculative: expected a dict such as {{'method': 'ngram', 'num_tokens': 4}} (or None), got "
                        f"{type(value).__name__}")
    unknown = [k for k in value if k not in _KEYS]
    if unknown:
        raise ValueError(f"speculative: unknown key {unknown[0]!r}; expected some of {', '.join(_KEYS)}")
    if "method" not in value:
        raise ValueError(f"speculative: 'method' is required ({' or '.join(map(repr, METHODS))})")
    return SpeculativeConfig(**value)
