"""Per-request decoding parameters (greedy only: the most probable token is always taken)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    """How long to decode and when to stop. Validated on construction; errors name the field.

    Attributes:
        max_new_tokens: >= 1, the most tokens generated for this request.
        stop: stop strings; generation ends when the decoded text contains one, and the returned text
            ends just before it (the token ids keep the tokens that produced it). A str is one stop string.
        ignore_eos: keep decoding past the model's end-of-sequence ids (benchmarks, parity tests).
    """

    max_new_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"max_new_tokens: expected an int >= 1, got {type(n).__name__} {n!r}")
        if n < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {n}")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        for s in stop:
            if not isinstance(s, str):
                raise TypeError(f"stop: expected strings, got {type(s).__name__} {s!r}")
            if not s:
                raise ValueError("stop: expected non-empty strings, got ''")
        self.stop = stop
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos: expected a bool, got {type(self.ignore_eos).__name__}")
