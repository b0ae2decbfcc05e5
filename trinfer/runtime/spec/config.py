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
    adaptive: back off a sequence whose proposals are rejected at their first token: it skips proposing for 1,
        2, 4, ... up to 16 steps (plain decode rows meanwhile), and proposes every step again once one is accepted.
    """

    method: str
    num_tokens: int = 4
    model: str | None = None
    max_ngram: int = 4
    min_ngram: int = 2
    adaptive: bool = True

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


_KEYS = ("method", "num_tokens", "model", "max_ngram", "min_ngram", "adaptive")


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
