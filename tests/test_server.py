"""`trinfer serve`: the OpenAI-compatible server over the default model, on 127.0.0.1, spoken to with the official
`openai` client and raw HTTP (httpx, sockets). Every generated text is compared with the offline `LLM.generate`
output for the same prompt; /metrics is parsed here with its own small reader and checked against what was sent.

In-process servers run uvicorn in a thread (`ServerThread`, stopped by the fixtures whatever happens); the
SIGTERM test runs `python -m trinfer serve` in a subprocess. Generations are kept short (the 32-stream load test
is ~10 s on 2 busy cores); long ones (the counting prompt) are always cut by the test.
"""
import asyncio
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

for _module in ("starlette", "uvicorn", "httpx", "openai"):  # requirements(-dev).txt; absent: skip, saying which
    pytest.importorskip(_module)

import httpx  # noqa: E402
import openai  # noqa: E402

from smol import default_model, one_torch_thread  # noqa: E402,F401  (autouse fixture)
from trinfer.runtime import LLM, Engine, SamplingParams  # noqa: E402
from trinfer.server import EngineLoop, ServerConfig, ServerThread, build_app  # noqa: E402
from trinfer.server.engine_loop import Accepted  # noqa: E402
from trinfer.server.metrics import Counter, Histogram, ServerMetrics  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2-test"
MAX_LEN = 1024
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # the model goes on counting: a long generation that a test cuts
WORDS = ("the cat sat on a mat while rain fell over quiet hills and rivers ran to the sea . why is the sky blue ? "
         "tell me a story about a small robot who learns to paint").split()


def make_engine(loaded, **kw):
    kw.setdefault("max_num_seqs", 32)
    kw.setdefault("num_kv_blocks", 256)
    return Engine(loaded, backend="torch", device="cpu", max_model_len=MAX_LEN, **kw)


@pytest.fixture(scope="module")
def loaded():
    return default_model()[1]


@pytest.fixture(scope="module")
def llm(loaded):
    """The offline reference: the same weights, its own engine."""
    return LLM(loaded, backend="torch", device="cpu", max_num_seqs=32, max_model_len=MAX_LEN, num_kv_blocks=256)


@pytest.fixture(scope="module")
def server(loaded):
    app = build_app(make_engine(loaded), ServerConfig(model_name=MODEL, max_body_bytes=64 * 1024, shutdown_grace=0))
    with ServerThread(app) as s:
        yield s


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


# ------------------------------------------------------------------------------------------------ helpers
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict:
    """{(name, ((label, value), ...)): value} from the text format; checks HELP/TYPE precede each family."""
    samples, typed = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            typed[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
        assert family in typed, f"{name} has no # TYPE line before it"
        samples[(name, tuple(sorted(_LABEL.findall(m.group(2) or ""))))] = float(m.group(3))
    return samples


def scrape(http) -> dict:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_prometheus(r.text)


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def settled(http) -> dict:
    """Metrics once nothing is in flight and every KV block is free (the server is idle)."""
    def idle():
        s = scrape(http)
        ok = (metric(s, "trinfer_requests_in_flight") == 0 and metric(s, "trinfer_kv_cache_blocks_used") == 0
              and metric(s, "trinfer_requests_running") == 0)
        return s if ok else None
    return wait_for(idle, what="an idle server (no request in flight, all KV blocks free)")


def finish_of(out) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}[out.finish_reason]


def chat_ids(llm, messages) -> list[int]:
    """The prompt tokens of a chat, computed here: the template's text, encoded without added specials."""
    tok = llm.tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def sse_events(raw: bytes) -> list:
    """The `data:` payloads of a server-sent event stream (JSON objects, and the final "[DONE]")."""
    out = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def http_body(raw: bytes) -> bytes:
    """The body of a raw HTTP/1.1 response, chunked transfer encoding undone (as far as it was received)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return rest
    out = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, rest = out + rest[:n], rest[n + 2:]
    return out


def raw_request(host: str, port: int, path: str, body: dict, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(60)
    sock.connect((host, port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), host.encode(), len(data)) + data)
    return sock


def recv_until(sock: socket.socket, marker: bytes, count: int = 1) -> bytes:
    buf = b""
    while buf.count(marker) < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {count} x {marker!r}: {buf[-300:]!r}"
        buf += chunk
    return buf


# ------------------------------------------------------------------------------------------------ endpoints
def test_models_health_and_unknown_routes(http):
    assert http.get("/health").json() == {"status": "ok"}
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == MAX_LEN
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/completions", 405)):
        r = http.request(method, path)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_chat_matches_offline(client, llm):
    q = "What is the capital of France?"
    ref = llm.generate(q, max_new_tokens=24, chat=True)[0]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=24,
                                       temperature=0, seed=7)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    assert "Paris" in ref.text and r.choices[0].finish_reason == finish_of(ref)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                 max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish_of(ref)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert all(c.usage is None for c in chunks[:-1])

    # System + user messages, max_completion_tokens; the reference gets the template's tokens computed here.
    msgs = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a color."}]
    ref = llm.generate(chat_ids(llm, msgs), max_new_tokens=12)[0]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=12)
    assert r.choices[0].message.content == ref.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))


def test_completion_matches_offline_with_stops_and_token_ids(client, llm):
    prompt = "The capital of France is"
    plain = llm.generate(prompt, max_new_tokens=16)[0]  # also OpenAI's default max_tokens (16)
    r = client.completions.create(model=MODEL, prompt=prompt)
    assert r.object == "text_completion" and r.choices[0].text == plain.text
    assert r.usage.completion_tokens == len(plain.token_ids) and r.choices[0].finish_reason == finish_of(plain)

    stop = plain.text[len(plain.text) // 2:][:3]  # a string the text does contain
    ref = llm.generate(prompt, max_new_tokens=16, stop=[stop, "never seen"])[0]
    assert ref.finish_reason == "stop" and stop not in ref.text
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stop=[stop, "never seen"])
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == ref.text
    assert streamed[-1].choices[0].finish_reason == "stop"

    ids = llm.tokenizer.encode("def fib(n):")
    ref = llm.generate(ids, max_new_tokens=5)[0]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5)
    assert r.choices[0].text == ref.text and r.usage.prompt_tokens == len(ids)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 5) == (finish_of(ref), 5)


def test_logprobs_are_the_chosen_tokens(client, llm):
    q = "Say hello."
    ref = llm.generate(q, max_new_tokens=8, chat=True)[0]
    pieces = [llm.tokenizer.decode([t], skip_special_tokens=False) for t in ref.token_ids]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=8,
                                       logprobs=True, top_logprobs=1)
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == pieces
    assert [e.logprob for e in content] == pytest.approx(ref.logprobs, abs=1e-4)
    assert all(len(e.top_logprobs) == 1 and e.top_logprobs[0].token == e.token for e in content)
    assert all(e.logprob <= 0 for e in content)

    ref = llm.generate("Once upon a time", max_new_tokens=6)[0]
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, logprobs=1,
                                            stream=True))
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    lps = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert len(tokens) == 6 and "".join(tokens) == ref.text
    assert lps == pytest.approx(ref.logprobs, abs=1e-4)


# ------------------------------------------------------------------------------------------------ bad requests
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
COMP = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}


def _msgs(*messages):
    return {**CHAT, "messages": list(messages)}


BAD = [  # (endpoint, body, status, param, in the message, code)
    ("chat", b"{", 400, None, "malformed JSON", None),
    ("chat", b"[1, 2]", 400, None, "expected a JSON object", None),
    ("chat", b"", 400, None, "empty body", None),
    ("completions", b'{"model": "x", "max_tokens": NaN}', 400, None, "malformed JSON", None),
    ("chat", {**CHAT, "foo": 1}, 400, "foo", "unknown field", None),
    ("chat", {**CHAT, "tools": []}, 400, "tools", "not supported", None),
    ("chat", {**CHAT, "max_tokens": "ten"}, 400, "max_tokens", "expected an integer", None),
    ("chat", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "expected an integer >= 1, got 0", None),
    ("chat", {**CHAT, "max_tokens": 4, "max_completion_tokens": 5}, 400, "max_completion_tokens", "disagrees", None),
    ("completions", {**COMP, "stream": "yes"}, 400, "stream", "expected a boolean", None),
    ("completions", {**COMP, "stop": 5}, 400, "stop", "a string or an array", None),
    ("completions", {**COMP, "stop": ["a", 3]}, 400, "stop[1]", "expected a string", None),
    ("completions", {**COMP, "stream_options": {"include_usage": True}}, 400, "stream_options", "stream is true", None),
    ("chat", {"model": MODEL}, 400, "messages", "required", None),
    ("chat", {**CHAT, "messages": []}, 400, "messages", "at least one message", None),
    ("chat", {**CHAT, "messages": "hi"}, 400, "messages", "expected an array", None),
    ("chat", _msgs({"role": "robot", "content": "x"}), 400, "messages[0].role", "robot", None),
    ("chat", _msgs({"role": "user", "content": "x"}, {"content": "y"}), 400, "messages[1].role", "got null", None),
    ("chat", _msgs({"role": "user", "content": 5}), 400, "messages[0].content", "got number 5", None),
    ("chat", _msgs({"role": "user", "content": "x", "tool_calls": []}), 400, "messages[0].tool_calls", "unknown", None),
    ("chat", _msgs({"role": "user", "content": "word " * 1500}), 400, "messages", "context",
     "context_length_exceeded"),
    ("completions", {**COMP, "prompt": [1] * 1500}, 400, "prompt", "context", "context_length_exceeded"),
    ("completions", {**COMP, "prompt": {"a": 1}}, 400, "prompt", "a string or an array of token ids", None),
    ("completions", {**COMP, "prompt": [1, "a"]}, 400, "prompt[1]", "token id", None),
    ("completions", {**COMP, "prompt": ["a", "b"]}, 400, "prompt", "one prompt per request", None),
    ("completions", {**COMP, "prompt": [10 ** 9]}, 400, "prompt", "outside the vocabulary", None),
    ("completions", {**COMP, "prompt": ""}, 400, "prompt", "non-empty", None),
    ("completions", {**COMP, "temperature": 0.7}, 400, "temperature", "greedily", None),
    ("completions", {**COMP, "top_p": 0.5}, 400, "top_p", "greedily", None),
    ("chat", {**CHAT, "n": 2}, 400, "n", "greedily", None),
    ("completions", {**COMP, "best_of": 3}, 400, "best_of", "greedily", None),
    ("chat", {**CHAT, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported", None),
    ("completions", {**COMP, "logprobs": 3}, 400, "logprobs", "expected 0 or 1", None),
    ("chat", {**CHAT, "logprobs": True, "top_logprobs": 2}, 400, "top_logprobs", "expected 0 or 1", None),
    ("completions", {**COMP, "echo": True}, 400, "echo", "not supported", None),
    ("completions", {**COMP, "model": "gpt-4"}, 404, "model", "does not exist", "model_not_found"),
    ("completions", {**COMP, "prompt": "x" * 70_000}, 413, None, "limit", "request_too_large"),
]


@pytest.mark.parametrize("endpoint, body, status, param, text, code", BAD,
                         ids=[f"{i}-{b[3] or b[4]}" for i, b in enumerate(BAD)])
def test_bad_request_names_the_field_and_the_server_keeps_serving(http, endpoint, body, status, param, text, code):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    r = http.post(path, content=body if isinstance(body, bytes) else json.dumps(body),
                  headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and text in err["message"] and err["code"] == code, err
    ok = http.post("/v1/completions", json={**COMP, "temperature": 0, "top_p": 0.9, "seed": 1, "n": 1})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


def test_openai_client_sees_the_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0.8)
    assert e.value.param == "temperature" and "greedily" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert e.value.code == "model_not_found"


# ------------------------------------------------------------------------------------------------ load
def test_32_concurrent_streams_match_offline_and_metrics_agree(server, llm, http):
    rng = random.Random(14)
    reqs = [dict(chat=i % 2 == 0, prompt=" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))),
                 max_tokens=rng.randint(1, 12), stop=["."] if i % 5 == 0 else None) for i in range(32)]
    before = settled(http)

    async def one(client, r):
        kw = dict(model=MODEL, max_tokens=r["max_tokens"], stop=r["stop"], stream=True,
                  stream_options={"include_usage": True})
        if r["chat"]:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": r["prompt"]}],
                                                          logprobs=True, **kw)
        else:
            stream = await client.completions.create(prompt=r["prompt"], logprobs=0, **kw)
        text, lps, finish, usage = [], [], [], None
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                text.append((c.delta.content or "") if r["chat"] else c.text)
                if c.logprobs is not None:
                    lps += [e.logprob for e in c.logprobs.content] if r["chat"] else c.logprobs.token_logprobs
                finish.append(c.finish_reason)
        return "".join(text), lps, [f for f in finish if f], usage

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, r) for r in reqs)), 300)

    results = asyncio.run(main())
    refs = {}
    for chat in (True, False):
        group = [i for i, r in enumerate(reqs) if r["chat"] == chat]
        outs = llm.generate([reqs[i]["prompt"] for i in group], chat=chat, sampling_params=[
            SamplingParams(max_new_tokens=reqs[i]["max_tokens"], stop=reqs[i]["stop"]) for i in group])
        refs.update(zip(group, outs))
    for i, (text, lps, finish, usage) in enumerate(results):
        ref = refs[i]
        assert text == ref.text, f"request {i}"
        assert finish == [finish_of(ref)], f"request {i}"
        # Every token once: one log-probability per generated token, as the offline run made them.
        assert len(lps) == usage.completion_tokens == len(ref.token_ids), f"request {i}"
        assert lps == pytest.approx(ref.logprobs, abs=1e-3), f"request {i}"
        assert usage.prompt_tokens == len(ref.prompt_token_ids), f"request {i}"

    n_gen = sum(len(refs[i].token_ids) for i in range(32))
    n_prompt = sum(len(refs[i].prompt_token_ids) for i in range(32))

    def agree():
        s = settled(http)
        return s if metric(s, "trinfer_http_requests_total", path="/v1/completions", code="200") - metric(
            before, "trinfer_http_requests_total", path="/v1/completions", code="200") == 16 else None
    after = wait_for(agree, what="the HTTP counters of the 32 streams")

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("trinfer_http_requests_total", path="/v1/chat/completions", code="200") == 16
    assert delta("trinfer_generation_tokens_total") == n_gen
    assert delta("trinfer_prompt_tokens_total") == n_prompt
    for reason in ("eos", "stop", "length"):
        assert delta("trinfer_requests_finished_total", reason=reason) == sum(
            refs[i].finish_reason == reason for i in range(32))
    assert delta("trinfer_time_to_first_token_seconds_count") == 32
    assert delta("trinfer_inter_token_latency_seconds_count") == n_gen - 32
    assert delta("trinfer_request_duration_seconds_count") == 32
    assert metric(after, "trinfer_kv_cache_blocks_used") == 0 and metric(after, "trinfer_requests_waiting") == 0
    assert metric(after, "trinfer_kv_cache_blocks_total") == 256
    assert metric(after, "trinfer_preemptions_total") == server.app.state.trinfer.engine.num_preemptions
    assert server.app.state.trinfer.loop.in_flight == 0


# ------------------------------------------------------------------------------------------------ cancellation
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_killed_client_frees_its_blocks(server, http, stream):
    before = settled(http)
    sock = raw_request(server.host, server.port, "/v1/completions",
                       {"model": MODEL, "prompt": COUNTING, "max_tokens": 900, "stream": stream})
    try:
        if stream:
            recv_until(sock, b"data: ", 3)
        else:  # nothing comes back before the end: wait until it generates
            wait_for(lambda: metric(scrape(http), "trinfer_generation_tokens_total")
                     > metric(before, "trinfer_generation_tokens_total") + 2, what="tokens")
        assert metric(scrape(http), "trinfer_kv_cache_blocks_used") > 0  # it holds blocks while it runs
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST, as a kill
        sock.close()
    after = settled(http)
    reason = ("trinfer_requests_finished_total", (("reason", "disconnect"),))
    assert after.get(reason, 0) - before.get(reason, 0) == 1
    assert metric(after, "trinfer_generation_tokens_total") - metric(before, "trinfer_generation_tokens_total") < 900


def test_engine_failure_fails_its_requests_and_the_server_goes_on(server, http, monkeypatch):
    engine = server.app.state.trinfer.engine
    before = settled(http)
    real_step, calls = engine.step, []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_once)
    r = http.post("/v1/completions", json={**COMP, "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    after = settled(http)
    assert metric(after, "trinfer_requests_finished_total", reason="error") - metric(
        before, "trinfer_requests_finished_total", reason="error") == 1
    r = http.post("/v1/completions", json={**COMP, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_abort_frees_the_blocks_within_one_step(loaded):
    """The engine loop applies an abort before its next step: the request's final message comes at most one
    step after the abort, with every KV block free."""
    engine = make_engine(loaded, max_num_seqs=2, num_kv_blocks=128)
    loop = EngineLoop(engine, max_waiting=0, request_timeout=None)

    async def main():
        handle = loop.submit("r1", COUNTING, SamplingParams(max_new_tokens=500), chat=False)
        assert isinstance(await handle.get(), Accepted)
        for _ in range(3):
            assert (await handle.get()).finish_reason is None
        used, steps = loop.metrics.kv_blocks_used.value(), loop.steps
        handle.abort("disconnect")
        while (d := await handle.get()).finish_reason is None:
            pass
        return used, steps, d, loop.steps, loop.metrics.kv_blocks_used.value()

    try:
        used, steps, final, steps_after, used_after = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        loop.stop()
    assert used > 0 and used_after == 0 and steps_after - steps <= 1
    assert final.finish_reason == "disconnect" and loop.in_flight == 0
    assert engine.scheduler.block_manager.num_free_blocks == 128 and not engine.has_unfinished()


def test_slow_client_does_not_hold_up_the_engine(server, client, http):
    """A client that reads nothing: its request still finishes in the engine, others are served meanwhile,
    and its whole stream is there when it reads at last."""
    before = settled(http)
    sock = raw_request(server.host, server.port, "/v1/chat/completions",
                       {**CHAT, "messages": [{"role": "user", "content": COUNTING}], "max_tokens": 64,
                        "logprobs": True, "top_logprobs": 1, "stream": True}, rcvbuf=2048)
    try:
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
        assert r.usage.completion_tokens == 3
        finished = ("trinfer_requests_finished_total",)
        wait_for(lambda: sum(v for k, v in scrape(http).items() if k[0] == finished[0])
                 - sum(v for k, v in before.items() if k[0] == finished[0]) == 2,
                 what="the unread request to finish in the engine")
        sock.settimeout(60)
        events = sse_events(http_body(recv_until(sock, b"data: [DONE]")))
    finally:
        sock.close()
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    n = sum(len(e["choices"][0]["logprobs"]["content"]) for e in events[:-1] if e["choices"][0]["logprobs"])
    assert 0 < n <= 64


# ------------------------------------------------------------------------------------------------ limits
def test_full_queue_is_429_then_served(loaded):
    app = build_app(make_engine(loaded, max_num_seqs=1, num_kv_blocks=96),
                    ServerConfig(model_name=MODEL, max_waiting=0, retry_after=3, shutdown_grace=0))
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**COMP, "prompt": COUNTING, "max_tokens": 900,
                                                          "stream": True}) as long:
            lines = long.iter_lines()  # (kept: a dropped iterator closes the stream)
            next(lines)  # it runs: the one slot is taken
            r = http.post("/v1/completions", json=COMP)
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert http.get("/health").status_code == 200
        wait_for(lambda: app.state.trinfer.loop.in_flight == 0, what="the closed stream to be aborted")
        r = http.post("/v1/completions", json=COMP)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_timeout_ends_the_request(loaded):
    app = build_app(make_engine(loaded, max_num_seqs=2, num_kv_blocks=128),
                    ServerConfig(model_name=MODEL, request_timeout=0.5, shutdown_grace=0))
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        long = {**COMP, "prompt": COUNTING, "max_tokens": 900}
        r = http.post("/v1/completions", json=long)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        events = sse_events(http.post("/v1/completions", json={**long, "stream": True, "logprobs": 0,
                                                               "stream_options": {"include_usage": True}}).content)
        assert events[-1] == "[DONE]" and events[-3]["choices"][0]["finish_reason"] == "abort"
        # The usage of an aborted stream: the tokens it streamed (one log-probability each), no more.
        streamed = sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events[:-3])
        assert events[-2]["usage"]["completion_tokens"] == streamed
        s_ = parse_prometheus(http.get("/metrics").text)
        assert metric(s_, "trinfer_requests_finished_total", reason="timeout") == 2
        assert metric(s_, "trinfer_kv_cache_blocks_used") == 0


def test_shutdown_refuses_new_requests_and_lets_streams_finish(loaded):
    app = build_app(make_engine(loaded, max_num_seqs=2, num_kv_blocks=128),
                    ServerConfig(model_name=MODEL, shutdown_grace=120))
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**COMP, "prompt": COUNTING, "max_tokens": 12,
                                                          "stream": True}) as stream:
            lines = stream.iter_lines()
            next(lines)
            app.state.trinfer.begin_shutdown()  # what SIGTERM does first (its grace: 120 s)
            r = http.post("/v1/completions", json=COMP)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert http.get("/health").status_code == 503
            events = sse_events("\n\n".join(lines).encode() + b"\n\n")
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"


def test_sigterm_ends_streams_with_a_final_chunk_and_exits_0(default_gguf, tmp_path):
    """`python -m trinfer serve` in a subprocess: two streams in flight, SIGTERM, each stream gets its final chunk
    and [DONE], the process exits with status 0."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trinfer", "serve", "--port", "0", "--device", "cpu", "--threads", "1",
             "--max-model-len", str(MAX_LEN), "--num-kv-blocks", "128", "--shutdown-grace", "0",
             "--served-model-name", MODEL, "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        m = wait_for(lambda: re.search(r"trinfer serve: (http://127\.0\.0\.1:\d+)/v1", log_path.read_text()),
                     timeout=180, what="the server to start")
        url = m.group(1)
        with httpx.Client(base_url=url, timeout=60) as http, \
                openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            wait_for(lambda: http.get("/health").status_code == 200, what="/health")
            with http.stream("POST", "/v1/completions", json={**COMP, "prompt": COUNTING, "max_tokens": 900,
                                                              "stream": True}) as raw:
                lines = raw.iter_lines()
                next(lines)
                chunks = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=900, stream=True)
                it = iter(chunks)
                first = next(it)
                proc.send_signal(signal.SIGTERM)
                rest = list(it)
                events = sse_events("\n\n".join(lines).encode() + b"\n\n")
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "abort"
        assert first.choices[0].finish_reason is None and rest[-1].choices[0].finish_reason == "abort"
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ pieces
class _Pieces:
    """A tokenizer stand-in: token id -> its text piece."""

    PIECES = {10: "Hé", 11: "llo", 12: " 世", 13: "\ufffd", 14: "!"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def test_response_objects_by_hand():
    """The OpenAI objects of trinfer/server/render.py, worked by hand from OpenAI's API reference: each engine finish
    reason's OpenAI name, usage totals, completions log-probabilities (`text_offset` counts characters and runs on
    across chunks; top_logprobs {token: logprob}), chat log-probabilities (UTF-8 bytes, None for a piece that is
    part of a character; top_logprobs only when asked)."""
    from trinfer.server.protocol import GenerationRequest
    from trinfer.server.render import ResponseWriter

    w = ResponseWriter(GenerationRequest("completion", MODEL, "x", 8, stream=True, include_usage=True, logprobs=True,
                                         top_logprobs=1), _Pieces(), MODEL)
    c = w.chunk("Héllo", [10, 11], [-0.5, -0.25], None)
    assert c["object"] == "text_completion" and c["usage"] is None and c["id"].startswith("cmpl-")
    assert c["choices"] == [{"index": 0, "text": "Héllo", "finish_reason": None, "logprobs": {
        "tokens": ["Hé", "llo"], "token_logprobs": [-0.5, -0.25], "top_logprobs": [{"Hé": -0.5}, {"llo": -0.25}],
        "text_offset": [0, 2]}}]
    c = w.chunk(" 世!", [12, 14], [-1.0, -0.125], None)
    assert c["choices"][0]["logprobs"]["text_offset"] == [5, 7]  # "Hé" + "llo" = 5 characters (6 bytes), " 世" 2
    for reason, openai_reason in (("eos", "stop"), ("stop", "stop"), ("length", "length"), ("context", "length"),
                                  ("timeout", "abort"), ("shutdown", "abort"), ("abort", "abort")):
        end = w.chunk("", [], [], reason)["choices"][0]
        assert (end["finish_reason"], end["text"], end["logprobs"]) == (openai_reason, "", None), reason
    assert w.usage_chunk(3, 5)["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert w.usage_chunk(3, 5)["choices"] == []

    chat = ResponseWriter(GenerationRequest("chat", MODEL, [], 8, logprobs=True), _Pieces(), MODEL)
    full = chat.full("Hé\ufffd", [10, 13], [-0.5, -2.0], "context", prompt_tokens=4)
    assert full["object"] == "chat.completion" and full["id"].startswith("chatcmpl-")
    assert full["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    choice = full["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"] == {"role": "assistant", "content": "Hé\ufffd",
                                                                          "refusal": None}
    assert choice["logprobs"] == {"refusal": None, "content": [
        {"token": "Hé", "logprob": -0.5, "bytes": [72, 195, 169], "top_logprobs": []},
        {"token": "\ufffd", "logprob": -2.0, "bytes": None, "top_logprobs": []}]}
    plain = ResponseWriter(GenerationRequest("completion", MODEL, "x", 8), _Pieces(), MODEL)
    assert plain.full("Hé", [10], [-0.5], "eos", prompt_tokens=1)["choices"][0]["logprobs"] is None


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """A tiny random Llama (tests/checkpoints.py) behind the server, with a context of 48 tokens and no end-of-sequence
    token (so generations end where worked out by hand)."""
    from checkpoints import make_hf_checkpoint

    path = make_hf_checkpoint(str(tmp_path_factory.mktemp("tiny-serve")), "llama", seed=1)
    engine = Engine(path, backend="torch", device="cpu", block_size=4, num_kv_blocks=32, max_model_len=48)
    engine.eos_token_ids = frozenset()
    with ServerThread(build_app(engine, ServerConfig(model_name=MODEL, shutdown_grace=0))) as s:
        yield s, path


def test_tiny_model_stream_bytes_usage_and_context_end_by_hand(tiny_server):
    """Raw bytes of a streamed completion of a 37-token prompt with no max_tokens on a 48-token context: every event
    is `data: <json>` + a blank line; 11 tokens (48 - 37), one chunk each (logprobs asked), then the finish chunk
    ("length": the context is full), the usage chunk (37 + 11 = 48), `data: [DONE]`. The same request whole gives the
    same usage; a chat's prompt_tokens are those of the ChatML text written here, encoded by `tokenizers` itself."""
    server, path = tiny_server
    prompt = [1] + list(range(20, 56))
    body = {"model": MODEL, "prompt": prompt, "logprobs": 1}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
        whole = http.post("/v1/completions", json=body).json()
        chat = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3, "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]}).json()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    raw = r.content
    assert raw.endswith(b"\n\n")
    blocks = raw[:-2].split(b"\n\n")
    assert all(b.startswith(b"data: ") and b"\n" not in b for b in blocks), raw[:300]
    assert blocks[-1] == b"data: [DONE]" and len(blocks) == 11 + 3
    events = [json.loads(b[len(b"data: "):]) for b in blocks[:-1]]
    tokens = [e["choices"][0]["logprobs"] for e in events[:11]]
    assert all(len(t["tokens"]) == 1 and t["token_logprobs"][0] <= 0 for t in tokens)
    offsets = [t["text_offset"][0] for t in tokens]
    assert offsets == [sum(len(t["tokens"][0]) for t in tokens[:i]) for i in range(11)]
    assert [e["choices"][0]["finish_reason"] for e in events[:11]] == [None] * 11
    assert events[11]["choices"][0]["finish_reason"] == "length" and events[11]["choices"][0]["text"] == ""
    assert events[12]["choices"] == [] and events[12]["usage"] == {"prompt_tokens": 37, "completion_tokens": 11,
                                                                   "total_tokens": 48}
    assert whole["usage"] == events[12]["usage"] and whole["choices"][0]["finish_reason"] == "length"
    assert whole["choices"][0]["text"] == "".join(e["choices"][0]["text"] for e in events[:11])
    assert len(whole["choices"][0]["logprobs"]["tokens"]) == 11

    from tokenizers import Tokenizer

    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    n_prompt = len(Tokenizer.from_file(os.path.join(path, "tokenizer.json")).encode(chatml, add_special_tokens=False))
    assert chat["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 3, "total_tokens": n_prompt + 3}
    assert chat["choices"][0]["finish_reason"] == "length"


def test_chat_template_kwargs_reach_the_template(tmp_path):
    """`chat_template_kwargs` (as vLLM's server takes it) are variables of the model's chat template: a template that
    greets with `greeting` renders the text written here, whose token count (by `tokenizers` itself) is the usage's
    prompt_tokens; a non-object or a reserved name is a 400 naming chat_template_kwargs, and the server goes on."""
    from checkpoints import make_hf_checkpoint
    from tokenizers import Tokenizer

    path = make_hf_checkpoint(str(tmp_path), "llama", seed=1)
    cfg_file = os.path.join(path, "tokenizer_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["chat_template"] = ("{{ greeting | default('Hello') }}:{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                            "\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    engine = Engine(path, backend="torch", device="cpu", block_size=4, num_kv_blocks=64, max_model_len=96)
    messages = [{"role": "user", "content": "Hi there"}]

    def n_tokens(text):
        return len(tok.encode(text, add_special_tokens=False))

    with ServerThread(build_app(engine, ServerConfig(model_name=MODEL, shutdown_grace=0))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        def chat(**extra):
            return http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": messages,
                                                           **extra})

        plain, ahoy = chat().json(), chat(chat_template_kwargs={"greeting": "Ahoy matey"}).json()
        assert plain["usage"]["prompt_tokens"] == n_tokens("Hello:[user] Hi there\n[assistant] ")
        assert ahoy["usage"]["prompt_tokens"] == n_tokens("Ahoy matey:[user] Hi there\n[assistant] ")
        assert ahoy["usage"]["prompt_tokens"] != plain["usage"]["prompt_tokens"]
        for bad in ([1, 2], "x", {"messages": []}, {"add_generation_prompt": False}, {"not a name": 1}):
            r = chat(chat_template_kwargs=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", (bad, r.text)
        assert chat().json()["usage"] == plain["usage"]
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "chat_template_kwargs": {}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_prometheus_text_by_hand():
    h = Histogram("lat_seconds", "latency", buckets=(0.25, 0.5, 1.0))
    for v in (0.125, 0.25, 0.375, 0.75, 4.0):  # 0.25 falls in le=0.25 (upper bounds are inclusive)
        h.observe(v)
    assert h.lines() == ["# HELP lat_seconds latency", "# TYPE lat_seconds histogram",
                         'lat_seconds_bucket{le="0.25"} 2', 'lat_seconds_bucket{le="0.5"} 3',
                         'lat_seconds_bucket{le="1"} 4', 'lat_seconds_bucket{le="+Inf"} 5',
                         "lat_seconds_sum 5.5", "lat_seconds_count 5"]
    c = Counter("hits_total", "hits", ("path",))
    c.inc(path='a"b\\c\nd')
    c.inc(2, path="x")
    assert c.lines()[2:] == ['hits_total{path="a\\"b\\\\c\\nd"} 1', 'hits_total{path="x"} 2']
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1, path="x")
    with pytest.raises(ValueError, match="_total"):
        Counter("hits", "bad name")
    samples = parse_prometheus(ServerMetrics().render())  # every family typed, every sample parsable
    assert metric(samples, "trinfer_time_to_first_token_seconds_count") == 0


def test_serve_cli_refuses_bad_options_before_loading(capsys):
    from trinfer.cli import build_parser, main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port: expected 0-65535, got 70000" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--backend", "torch", "--max-num-seqs", "4", "--port", "0"])
    assert (args.backend, args.max_num_seqs, args.port, args.host, args.model) == ("torch", 4, 0, "127.0.0.1", None)
    with pytest.raises(ValueError, match="max_waiting"):
        ServerConfig(max_waiting=-1)
