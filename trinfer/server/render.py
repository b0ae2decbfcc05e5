"""OpenAI response objects (completions, chat completions, their stream chunks, usage, log-probabilities).

Finish reasons: the engine's `eos` and `stop` are OpenAI's "stop", `length` and `context` (the context
window is full) are "length". A request the server ends itself (its timeout, a shutdown after the grace period)
ends with "abort", trinfer's own value (vLLM uses the same).
"""
from __future__ import annotations

import time
import uuid

from .protocol import GenerationRequest

OPENAI_FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def openai_finish_reason(reason: str) -> str:
    return OPENAI_FINISH_REASON.get(reason, "abort")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseWriter:
    """Builds the JSON objects of one response, streamed or not. Keeps the running text offset that the
    completions log-probabilities (`text_offset`) need across chunks."""

    def __init__(self, req: GenerationRequest, tokenizer, model: str):
        self.req = req
        self.tokenizer = tokenizer
        self.model = model
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._offset = 0

    # ------------------------------------------------------------------ pieces
    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer is not None else ""

    def logprobs(self, token_ids: list[int], logprobs: list[float]) -> dict | None:
        """The `logprobs` of a choice for these tokens, or None when the request did not ask for them."""
        if not self.req.logprobs:
            return None
        pieces = [self._piece(t) for t in token_ids]
        top = self.req.top_logprobs
        if self.req.chat:
            entries = []
            for piece, lp in zip(pieces, logprobs):
                raw = None if "\ufffd" in piece else list(piece.encode("utf-8"))  # part of a character: unknown
                entry = {"token": piece, "logprob": lp, "bytes": raw}
                entry["top_logprobs"] = [dict(entry)] if top else []  # greedy: the top-1 is the chosen token
                entries.append(entry)
            return {"content": entries, "refusal": None}
        offsets = []
        for piece in pieces:
            offsets.append(self._offset)
            self._offset += len(piece)
        return {"tokens": pieces, "token_logprobs": list(logprobs),
                "top_logprobs": [{p: lp} for p, lp in zip(pieces, logprobs)] if top else None,
                "text_offset": offsets}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ------------------------------------------------------------------ streaming
    def chunk(self, text: str | None, token_ids: list[int], logprobs: list[float], finish_reason: str | None,
              *, role: bool = False) -> dict:
        """One stream chunk. For chat, `role=True` opens the message ({"role": "assistant", "content": ""})."""
        lp = self.logprobs(token_ids, logprobs) if token_ids else None
        reason = openai_finish_reason(finish_reason) if finish_reason is not None else None
        if self.req.chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": reason}
            out = self._head("text_completion")
        out["choices"] = [choice]
        if self.req.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last chunk when stream_options.include_usage: no choices, the usage of the whole request."""
        out = self._head("chat.completion.chunk" if self.req.chat else "text_completion")
        out["choices"] = []
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return out

    # ------------------------------------------------------------------ whole response
    def full(self, text: str, token_ids: list[int], logprobs: list[float], finish_reason: str,
             prompt_tokens: int) -> dict:
        lp = self.logprobs(token_ids, logprobs)
        reason = openai_finish_reason(finish_reason)
        if self.req.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": lp, "finish_reason": reason}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}
            out = self._head("text_completion")
        out["choices"] = [choice]
        out["usage"] = usage(prompt_tokens, len(token_ids))
        return out
