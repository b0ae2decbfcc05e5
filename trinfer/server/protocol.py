"""OpenAI request bodies -> a validated `GenerationRequest`, or a `RequestError` naming the field.

Two endpoints, one shape of request once parsed:
    POST /v1/chat/completions   messages (system / user / assistant; "developer" is read as system), rendered
                                with the model's chat template; max_tokens or max_completion_tokens (default:
                                up to the context length); logprobs (bool) and top_logprobs (0 or 1)
    POST /v1/completions        prompt (a string, token ids, or a one-element list of either); max_tokens
                                (default 16, as OpenAI); logprobs (null, 0 or 1)
Both: model (the served name), stream, stream_options.include_usage, stop (a string or a list of strings).

trinfer decodes greedily (always the most probable token), so a request that asks for sampling is refused with
a 400 saying so: temperature > 0, top_p < 1 without temperature 0, n > 1, best_of > 1, non-zero presence or
frequency penalties, a logit bias, more than one top log-probability. `seed` and `user` are accepted and have
no effect (greedy decoding is deterministic). Any other field, known to OpenAI or not, is refused by name.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# Fields OpenAI defines that trinfer cannot honour, with the reason given back.
_UNSUPPORTED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning models are not supported",
    "web_search_options": "web search is not supported",
}


class RequestError(Exception):
    """An error answered in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated request. `prompt` is text or token ids (completions) or a list of {"role", "content"}
    messages with the roles normalised (chat). `max_tokens` None means up to the context length."""

    kind: str                   # "chat" | "completion"
    model: str
    prompt: str | list[int] | list[dict]
    max_tokens: int | None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False      # return the chosen token's log-probability
    top_logprobs: int = 0       # 0 or 1: the top-1 alternative, which for greedy decoding is the chosen token
    chat_template_kwargs: dict | None = None  # chat: extra variables of the chat template (e.g. enable_thinking)

    @property
    def chat(self) -> bool:
        return self.kind == "chat"


# ---------------------------------------------------------------------------------------------- body decoding
def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def decode_json_body(body: bytes) -> dict:
    """Bytes -> the JSON object of a request; malformed JSON and non-objects are a 400."""
    if not body:
        raise RequestError("body: expected a JSON object, got an empty body")
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise RequestError(f"body: expected UTF-8 JSON, got undecodable bytes ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"body: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise RequestError(f"body: malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(f"body: expected a JSON object, got {_json_type(data)}")
    return data


# ---------------------------------------------------------------------------------------------- field checks
def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"number {v!r}"
    if isinstance(v, str):
        return f"string {json.dumps(v[:40])}"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _bad(param: str, expected: str, got: Any) -> RequestError:
    return RequestError(f"{param}: expected {expected}, got {_json_type(got)}", param=param)


def _int(body: dict, name: str, *, minimum: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _bad(name, "an integer" + (f" >= {minimum}" if minimum is not None else ""), v)
    if minimum is not None and v < minimum:
        raise RequestError(f"{name}: expected an integer >= {minimum}, got {v}", param=name)
    return v


def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, "a number", v)
    return float(v)


def _bool(body: dict, name: str, prefix: str = "") -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise _bad(prefix + name, "a boolean", v)
    return v


def _str(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise _bad(name, "a string", v)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise _bad("stop", "a string or an array of strings", v)
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise _bad(f"stop[{i}]", "a string", s)
        if not s:
            raise RequestError(f"stop[{i}]: expected a non-empty string, got \"\"", param="stop")
    return tuple(items)


def _stream_options(body: dict, stream: bool) -> bool:
    v = body.get("stream_options")
    if v is None:
        return False
    if not isinstance(v, dict):
        raise _bad("stream_options", "an object", v)
    if not stream:
        raise RequestError("stream_options: only allowed when stream is true", param="stream_options")
    for key in v:
        if key != "include_usage":
            raise RequestError(f"stream_options.{key}: unknown field (trinfer knows include_usage)",
                               param=f"stream_options.{key}")
    return bool(_bool(v, "include_usage", "stream_options."))


def _greedy_only(body: dict) -> None:
    """Refuse every field that asks for sampling or a changed distribution."""
    greedy = "trinfer decodes greedily (always the most probable token)"
    temperature = _number(body, "temperature")
    if temperature is not None:
        if not 0 <= temperature <= 2:
            raise RequestError(f"temperature: expected a number in [0, 2], got {temperature}", param="temperature")
        if temperature > 0:
            raise RequestError(f"temperature: {greedy}; expected 0 or null, got {temperature}", param="temperature")
    top_p = _number(body, "top_p")
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise RequestError(f"top_p: expected a number in (0, 1], got {top_p}", param="top_p")
        if top_p < 1 and temperature != 0:
            raise RequestError(f"top_p: {top_p} asks for nucleus sampling, but {greedy}; send temperature 0 or "
                               f"leave top_p out", param="top_p")
    for name in ("n", "best_of"):
        n = _int(body, name, minimum=1)
        if n is not None and n > 1:
            raise RequestError(f"{name}: {greedy}, so every choice would be the same; expected 1, got {n}",
                               param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        p = _number(body, name)
        if p is not None and p != 0:
            raise RequestError(f"{name}: not supported ({greedy} from the model's own distribution); expected 0, "
                               f"got {p}", param=name)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise _bad("logit_bias", "an object", bias)
        if bias:
            raise RequestError(f"logit_bias: not supported ({greedy} from the model's own distribution); expected "
                               f"{{}} or null", param="logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError('response_format: only {"type": "text"} is supported', param="response_format")


# ---------------------------------------------------------------------------------------------- the endpoints
_COMMON = {"model", "stream", "stream_options", "stop", "max_tokens", "seed", "user", "temperature", "top_p", "n",
           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                          "chat_template_kwargs"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "best_of", "echo", "suffix"}


def _check_fields(body: dict, allowed: set[str], endpoint: str) -> None:
    for key in body:
        if key in allowed:
            continue
        if key in _UNSUPPORTED:
            raise RequestError(f"{key}: {_UNSUPPORTED[key]} by trinfer", param=key)
        raise RequestError(f"{key}: unknown field for {endpoint}", param=key)


def _common(body: dict, served_model: str) -> dict:
    model = body.get("model")
    if model is None:
        raise RequestError("model: required (this server serves " + json.dumps(served_model) + ")", param="model")
    if not isinstance(model, str):
        raise _bad("model", "a string", model)
    if model != served_model:
        raise RequestError(f"model: {json.dumps(model)} does not exist; this server serves {json.dumps(served_model)}",
                           param="model", status=404, code="model_not_found")
    _greedy_only(body)
    _int(body, "seed")  # accepted, no effect: greedy decoding is deterministic
    _str(body, "user")
    stream = bool(_bool(body, "stream"))
    return dict(model=model, stream=stream, include_usage=_stream_options(body, stream), stop=_stop(body))


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}[{j}]: expected a text part {{\"type\": \"text\", \"text\": ...}} "
                                   f"(trinfer reads text only), got {_json_type(part)}", param=f"{where}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(where, "a string or an array of text parts", content)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise RequestError("messages: required", param="messages")
    if not isinstance(msgs, list):
        raise _bad("messages", "an array of messages", msgs)
    if not msgs:
        raise RequestError("messages: expected at least one message, got an empty array", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "an object with role and content", m)
        for key in m:
            if key not in ("role", "content", "name"):
                raise RequestError(f"messages[{i}].{key}: unknown or unsupported message field (trinfer reads role, "
                                   f"content and name)", param=f"messages[{i}].{key}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(f"messages[{i}].role: expected one of system, user, assistant (or developer), got "
                               f"{_json_type(role)}", param=f"messages[{i}].role")
        if "name" in m and not isinstance(m["name"], str):
            raise _bad(f"messages[{i}].name", "a string", m["name"])
        out.append({"role": CHAT_ROLES[role], "content": _content(m, i)})
    return out


def parse_chat_request(body: dict, served_model: str) -> GenerationRequest:
    """POST /v1/chat/completions body -> GenerationRequest, or RequestError naming the field."""
    _check_fields(body, _CHAT_FIELDS, "/v1/chat/completions")
    common = _common(body, served_model)
    messages = _messages(body)
    max_tokens = _int(body, "max_tokens", minimum=1)
    max_completion = _int(body, "max_completion_tokens", minimum=1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise RequestError(f"max_completion_tokens: {max_completion} disagrees with max_tokens {max_tokens}; send one",
                           param="max_completion_tokens")
    logprobs = bool(_bool(body, "logprobs"))
    top = _int(body, "top_logprobs", minimum=0)
    if top is not None:
        if not logprobs:
            raise RequestError("top_logprobs: only allowed when logprobs is true", param="top_logprobs")
        if top > 1:
            raise RequestError(f"top_logprobs: trinfer returns only the chosen token's log-probability (the top-1, "
                               f"as it decodes greedily); expected 0 or 1, got {top}", param="top_logprobs")
    template_kwargs = body.get("chat_template_kwargs")
    if template_kwargs is not None and not isinstance(template_kwargs, dict):  # names are checked by the engine
        raise _bad("chat_template_kwargs", "an object of chat-template variables, e.g. {\"enable_thinking\": false}",
                   template_kwargs)
    return GenerationRequest("chat", prompt=messages, max_tokens=max_completion or max_tokens, logprobs=logprobs,
                             top_logprobs=top or 0, chat_template_kwargs=template_kwargs or None, **common)


def _prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if p is None:
        raise RequestError("prompt: required", param="prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise RequestError("prompt: expected a non-empty string, got \"\"", param="prompt")
        return p
    if isinstance(p, list):
        if not p:
            raise RequestError("prompt: expected a non-empty string or token ids, got an empty array", param="prompt")
        if all(isinstance(t, (str, list)) for t in p):
            raise RequestError(f"prompt: trinfer serves one prompt per request, got {len(p)}", param="prompt")
        for i, t in enumerate(p):
            if isinstance(t, bool) or not isinstance(t, int):
                raise _bad(f"prompt[{i}]", "a token id (integer)", t)
        return list(p)
    raise _bad("prompt", "a string or an array of token ids", p)


def parse_completion_request(body: dict, served_model: str) -> GenerationRequest:
    """POST /v1/completions body -> GenerationRequest, or RequestError naming the field."""
    _check_fields(body, _COMPLETION_FIELDS, "/v1/completions")
    common = _common(body, served_model)
    prompt = _prompt(body)
    if _bool(body, "echo"):
        raise RequestError("echo: not supported; expected false", param="echo")
    suffix = body.get("suffix")
    if suffix is not None:
        raise RequestError("suffix: insertion (text after the completion) is not supported; expected null",
                           param="suffix")
    logprobs = _int(body, "logprobs", minimum=0)
    if logprobs is not None and logprobs > 1:
        raise RequestError(f"logprobs: trinfer returns only the chosen token's log-probability (the top-1, as it "
                           f"decodes greedily); expected 0 or 1, got {logprobs}", param="logprobs")
    max_tokens = _int(body, "max_tokens", minimum=1)
    return GenerationRequest("completion", prompt=prompt,
                             max_tokens=COMPLETION_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                             logprobs=logprobs is not None, top_logprobs=logprobs or 0, **common)
