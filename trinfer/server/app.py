"""The ASGI app (Starlette): OpenAI's completions and chat completions over one engine, plus models, health,
metrics.

    app = build_app(engine, ServerConfig(model_name="my-model"))    # any ASGI server; `trinfer serve` uses uvicorn

Routes: POST /v1/chat/completions, POST /v1/completions (JSON, or server-sent events with "stream": true),
GET /v1/models, GET /health, GET /metrics (Prometheus text). Every error is OpenAI's
{"error": {"message", "type", "param", "code"}}: 400 for a bad body (naming the field), 404 for an unknown model
or path, 413 for a body over `max_body_bytes`, 429 when `max_num_seqs + max_waiting` requests are in flight and
503 while shutting down (both with Retry-After), 504 when a non-streamed request times out.

A generation response waits on its own queue (engine_loop.py) and watches the connection meanwhile: a client
that goes away aborts its request, which frees its KV blocks before the engine's next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from trinfer.runtime import SamplingParams

from .engine_loop import Accepted, Delta, EngineLoop, Refused, RequestHandle, Rejected, check_loop_options
from .metrics import ServerMetrics
from .protocol import (GenerationRequest, RequestError, decode_json_body, parse_chat_request,
                       parse_completion_request)
from .render import ResponseWriter

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the server treats requests (the engine's own options are the engine's).

    model_name: the id clients send as "model" and GET /v1/models lists.
    max_waiting: requests that may wait beyond the engine's max_num_seqs running ones; more get 429.
    request_timeout: seconds from a request's arrival to its abort (None: no limit).
    max_body_bytes: larger request bodies get 413.
    shutdown_grace: seconds in-flight requests may go on after SIGTERM/SIGINT before they are aborted.
    retry_after: seconds, sent in Retry-After with 429 and 503.
    """

    model_name: str = "trinfer"
    max_waiting: int = 64
    request_timeout: float | None = 600.0
    max_body_bytes: int = 4 * 1024 * 1024
    shutdown_grace: float = 5.0
    retry_after: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name: expected a non-empty string, got {self.model_name!r}")
        for name in ("max_body_bytes", "retry_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if not isinstance(self.shutdown_grace, (int, float)) or not self.shutdown_grace >= 0:
            raise ValueError(f"shutdown_grace: expected seconds >= 0, got {self.shutdown_grace!r}")
        check_loop_options(self.max_waiting, self.request_timeout)


def _json_response(status: int, body: dict, headers: dict | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status_code=status, headers=headers,
                    media_type="application/json")


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return b"data: " + data.encode() + b"\n\n"


def _refused(err: Refused) -> RequestError:
    kind = "rate_limit_exceeded" if err.status == 429 else "service_unavailable"
    return RequestError(str(err), status=err.status, type=kind, code=kind)


async def _wait_disconnect(receive) -> None:
    """Returns when the client has gone (or the connection broke)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a broken connection counts as gone
        return


class TrinferServer:
    """The app's state: the engine loop, the metrics, the config; `build_app` wires its handlers into routes."""

    def __init__(self, engine, config: ServerConfig | None = None):
        self.engine = engine
        self.config = cfg = config if config is not None else ServerConfig()
        self.metrics = ServerMetrics()
        self.loop = EngineLoop(engine, self.metrics, max_waiting=cfg.max_waiting, request_timeout=cfg.request_timeout)
        self.created = int(time.time())

    def begin_shutdown(self, grace: float | None = None) -> None:
        """Refuse new requests with 503 and abort those in flight after `grace` seconds (config default)."""
        self.loop.begin_shutdown(self.config.shutdown_grace if grace is None else grace)

    # ------------------------------------------------------------------ errors
    def error_response(self, err: RequestError | Refused) -> Response:
        if isinstance(err, Refused):
            err = _refused(err)
        headers = {"Retry-After": str(self.config.retry_after)} if err.status in (429, 503) else None
        return _json_response(err.status, err.body(), headers)

    def rejection(self, error: Exception, req: GenerationRequest) -> RequestError:
        """add_request's refusal -> a 400 naming the OpenAI field; a shutdown -> 503; anything else -> 500."""
        if isinstance(error, Refused):
            return _refused(error)
        if isinstance(error, (ValueError, TypeError)):
            message = str(error)
            head = message.split(":", 1)[0]
            prompt_field = "messages" if req.chat else "prompt"
            param = {"prompt": prompt_field, "chat template": "messages", "request": "max_tokens",
                     "max_new_tokens": "max_tokens", "stop": "stop",
                     "chat_template_kwargs": "chat_template_kwargs"}.get(head)
            code = "context_length_exceeded" if head == "prompt" and "context" in message else None
            return RequestError(message, param=param, code=code)
        return RequestError(f"internal error: {type(error).__name__}: {error}", status=500, type="server_error")

    # ------------------------------------------------------------------ handlers
    async def health(self, request: Request) -> Response:
        self.loop.start()
        if not self.loop.alive:
            return _json_response(503, {"status": "error", "message": "the engine loop has stopped"})
        if not self.loop.accepting:
            return _json_response(503, {"status": "shutting down"}, {"Retry-After": str(self.config.retry_after)})
        return _json_response(200, {"status": "ok"})

    async def models(self, request: Request) -> Response:
        return _json_response(200, {"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "trinfer",
            "max_model_len": self.engine.max_model_len}]})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat_request)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion_request)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(f"body: {int(length)} bytes exceed the limit of {limit} bytes", status=413,
                               code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"body: more than the limit of {limit} bytes", status=413, code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _generate(self, request: Request, parse) -> Response:
        received = time.perf_counter()
        try:
            body = decode_json_body(await self._read_body(request))
            req = parse(body, self.config.model_name)
            max_new = req.max_tokens if req.max_tokens is not None else self.engine.max_model_len
            writer = ResponseWriter(req, self.engine.tokenizer, self.config.model_name)
            handle = self.loop.submit(writer.id, req.prompt, SamplingParams(max_new_tokens=max_new, stop=req.stop),
                                      chat=req.chat, received=received,
                                      chat_template_kwargs=req.chat_template_kwargs)
        except (RequestError, Refused) as e:
            return self.error_response(e)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody reads it
        return _GenerationResponse(self, req, writer, handle)


class _GenerationResponse:
    """An ASGI response that waits for the engine's verdict, then sends JSON or a server-sent event stream,
    and aborts the request if the client disconnects at any point."""

    def __init__(self, server: TrinferServer, req: GenerationRequest, writer: ResponseWriter, handle: RequestHandle):
        self.server = server
        self.req = req
        self.writer = writer
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        handle = self.handle
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(lambda t: t.cancelled() or handle.abort("disconnect"))
        self._gone = watcher.done
        try:
            first = await handle.get()
            if isinstance(first, Rejected):
                await self._send_error(send, self.server.rejection(first.error, self.req))
            elif isinstance(first, Accepted):
                await (self._stream(send) if self.req.stream else self._whole(send))
        except OSError:  # the client went away while we wrote
            pass
        finally:
            watcher.cancel()
            handle.abort("disconnect")  # no-op once finished

    async def _send_error(self, send, err: RequestError) -> None:
        headers = [(b"retry-after", str(self.server.config.retry_after).encode())] if err.status in (429, 503) else []
        if not self._gone():
            await _send_json(send, err.status, err.body(), headers)

    async def _whole(self, send) -> None:
        text, ids, logprobs = [], [], []
        while True:
            d: Delta = await self.handle.get()
            text.append(d.text)
            ids += d.token_ids
            logprobs += d.logprobs
            if d.finish_reason is not None:
                break
        reason = d.finish_reason
        if reason == "timeout":
            err = RequestError(f"the request did not finish within {self.server.config.request_timeout} s "
                               f"(the server's request timeout)", status=504, type="timeout", code="timeout")
        elif reason == "shutdown":
            err = RequestError("the server shut down before the request finished", status=503,
                               type="service_unavailable", code="service_unavailable")
        elif reason == "error":
            err = RequestError("internal error: the engine failed during this request (see the server log)",
                               status=500, type="server_error")
        elif reason == "disconnect":
            return
        else:
            if not self._gone():
                await _send_json(send, 200, self.writer.full("".join(text), ids, logprobs, reason, d.prompt_tokens))
            return
        await self._send_error(send, err)

    async def _stream(self, send) -> None:
        w, chat = self.writer, self.req.chat

        async def emit(obj) -> bool:
            if self._gone():
                return False
            await send({"type": "http.response.body", "body": _sse(obj), "more_body": True})
            return True

        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})
        if chat and not await emit(w.chunk("", [], [], None, role=True)):
            return
        n_tokens = 0
        while True:
            d: Delta = await self.handle.get()
            n_tokens += len(d.token_ids)
            if d.text or (d.token_ids and self.req.logprobs):
                if not await emit(w.chunk(d.text, d.token_ids, d.logprobs, None)):
                    return
            if d.finish_reason is not None:
                break
        if d.finish_reason == "disconnect":
            return
        if not await emit(w.chunk(None if chat else "", [], [], d.finish_reason)):
            return
        if self.req.include_usage and not await emit(w.usage_chunk(d.prompt_tokens, n_tokens)):
            return
        if await emit("[DONE]"):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class _CountResponses:
    """ASGI middleware: count every HTTP response by path (known ones; "other") and status code; "499" when the
    client left before any response was sent (nginx's "client closed request"), "500" for an exception."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = None

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            status = 500 if status is None else status
            raise
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.http_requests.inc(path=path, code=str(499 if status is None else status))


def build_app(engine, config: ServerConfig | None = None) -> Starlette:
    """An OpenAI-compatible ASGI app over `engine` (a trinfer.runtime.Engine that nothing else calls).

    Its lifespan starts the engine loop and stops it; mounted where lifespans do not run, the loop starts with
    the first request. `app.state.trinfer` is the TrinferServer (its `loop`, `metrics`, `begin_shutdown()`).
    """
    server = TrinferServer(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.loop.stop)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _json_response(exc.status_code, RequestError(
            f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code, type=kind).body(),
            getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> Response:
        return _json_response(500, RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                                type="server_error").body())

    routes = [
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(_CountResponses, metrics=server.metrics)],
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.trinfer = server
    return app
