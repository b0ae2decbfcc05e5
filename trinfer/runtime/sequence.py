"""A request as the scheduler sees it: token ids, KV blocks, status, finish reason, timings, text state."""
from __future__ import annotations

import enum
import time
from typing import Any

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued for (re)prefill: new, or preempted and to be recomputed
    RUNNING = "running"    # holds KV blocks; computes a chunk of its prompt, or one token, per scheduled step
    FINISHED = "finished"  # blocks freed; nothing more will be generated


class FinishReason(str, enum.Enum):
    EOS = "eos"          # the model produced one of its end-of-sequence ids
    LENGTH = "length"    # max_new_tokens reached
    STOP = "stop"        # a stop string appeared in the text
    CONTEXT = "context"  # prompt + output reached the model's context length
    ABORT = "abort"      # Engine.abort()

    def __str__(self) -> str:
        return self.value


class Sequence:
    """One request. `token_ids` holds the prompt then the generated tokens.

    The KV cache holds the K/V of the first `num_computed_tokens` tokens (0 while waiting; on admission, the
    tokens of the cached blocks it starts from). A step computes a run of the next uncomputed tokens: a chunk of
    the prompt (chunked prefill), or the newest token alone (decode: all but the newest are computed, and its
    K/V is written when it is fed). Preemption frees the blocks and resets `num_computed_tokens`; the sequence
    is then recomputed (prompt + generated tokens), from whatever the prefix cache still holds.

    Prefix cache: `block_hashes` are the chained keys of its full blocks (computed once, from host tokens:
    tokens are only ever appended, so they never change), `num_published_blocks` how many of its blocks have
    been offered to the cache, `prefix_hit_tokens` the prompt tokens its first admission took from the cache
    (None before it).

    `num_pending` counts tokens a launched decode step is producing on the device that have not reached the
    host yet (0, 1, or 2 while the engine runs one step ahead). They count in `num_tokens` (their KV slots
    are reserved and the next step feeds them from the device) but not in `token_ids`, `num_output_tokens`
    or `last_token_id`, which hold only tokens the host has seen.

    Speculative decoding: `num_spec_tokens` is how many proposed tokens it takes this step (asked before
    scheduling, cut by the scheduler to the slots it got: the step has 1 + num_spec_tokens query tokens for it),
    `spec_token_ids` the proposal itself (unverified: never in `token_ids`; the verify pass checks it), and `spec`
    its statistics and proposer state (`spec.SpecState`; None in an engine without speculation).
    """

    __slots__ = (
        "request_id", "prompt", "token_ids", "num_prompt_tokens", "params", "status", "block_table",
        "num_computed_tokens", "num_pending", "block_hashes", "num_published_blocks", "prefix_hit_tokens",
        "logprobs", "finish_reason", "num_preemptions",
        "arrival_time", "token_times", "detokenizer", "text", "num_text_sent", "num_tokens_sent",
        "num_spec_tokens", "spec_token_ids", "spec",
    )

    def __init__(self, request_id: Any, prompt_token_ids: list[int], params: SamplingParams, *,
                 prompt: str | None = None, detokenizer=None, arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.block_hashes: list[bytes] = []
        self.num_published_blocks = 0
        self.prefix_hit_tokens: int | None = None
        self.num_pending = 0
        self.logprobs: list[float] = []
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.token_times: list[float] = []  # perf_counter() when each output token reached the host
        self.detokenizer = detokenizer
        self.text = ""           # decoded output text, cut before a stop string once one is found
        self.num_text_sent = 0   # characters of `text` already handed out as deltas
        self.num_tokens_sent = 0  # output tokens already handed out as deltas
        self.num_spec_tokens = 0  # proposed tokens this step takes (speculative decoding)
        self.spec_token_ids: list[int] = []  # this step's proposed tokens, unverified
        self.spec = None  # spec.SpecState: statistics and proposer state (speculative decoding only)

    @property
    def num_tokens(self) -> int:
        """Tokens the KV cache and the scheduler account for: those on the host plus the pending ones."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V is not in the cache yet: 1 for a decoding sequence (its newest token)."""
        return len(self.token_ids) + self.num_pending - self.num_computed_tokens

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens the host has seen (pending ones excluded)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float, now: float) -> None:
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        self.token_times.append(now)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, blocks={len(self.block_table)})")
