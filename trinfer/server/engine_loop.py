"""The one thread that owns the engine; HTTP handlers talk to it through queues only.

    handlers (asyncio)  --submit/abort-->  commands (queue.SimpleQueue, thread-safe)  -->  loop thread
    loop thread  --call_soon_threadsafe-->  each request's own asyncio.Queue  -->  its handler

The engine is not thread-safe, so only the loop thread calls it. Each loop iteration applies every queued
command (add, abort, drain, stop), runs one `engine.step()` when there is work, and hands each output to its
request's queue. Handing over is `call_soon_threadsafe` (one call per event loop per step) onto an unbounded
queue, so a slow client never blocks the loop: its tokens wait in its own queue. Aborts (a client gone, a
timeout) are applied before the next step, so an aborted request's KV blocks are free within one step.

What a request's queue receives: `Accepted` or `Rejected` (add_request refused it: a ValueError/TypeError
from the engine, such as a prompt too long for the context), then `Delta`s, the last one with a
`finish_reason`: the engine's (eos, stop, length, context) or the server's (timeout, shutdown, disconnect,
error).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from trinfer.runtime import SamplingParams

from .metrics import ServerMetrics

logger = logging.getLogger("trinfer.server")


@dataclass(frozen=True, slots=True)
class Accepted:
    """The engine took the request (it passed add_request's checks)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    error: Exception  # what add_request raised (ValueError / TypeError), or the engine's failure


@dataclass(frozen=True, slots=True)
class Delta:
    """What a request gained in one step. `prompt_tokens` is the prompt's length (the same in every Delta)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    prompt_tokens: int


class Refused(Exception):
    """The server cannot take a request now: 429 (queue full) or 503 (shutting down), with Retry-After."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class RequestHandle:
    """The handler's side of one request: `await get()` its messages; `abort(reason)` at most once."""

    def __init__(self, owner: "EngineLoop", request_id: str, aio_loop: asyncio.AbstractEventLoop):
        self.owner = owner
        self.request_id = request_id
        self.aio_loop = aio_loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False  # a final Delta or a Rejected has been read
        self._aborted = False

    async def get(self) -> Accepted | Rejected | Delta:
        item = await self.queue.get()
        if isinstance(item, Rejected) or (isinstance(item, Delta) and item.finish_reason is not None):
            self.finished = True
        return item

    def abort(self, reason: str) -> None:
        if not self.finished and not self._aborted:
            self._aborted = True
            self.owner.abort(self.request_id, reason)


class _Active:
    """Loop-thread bookkeeping of a request the engine holds."""

    __slots__ = ("handle", "deadline", "received", "last_token_time", "prompt_tokens")

    def __init__(self, handle: RequestHandle, deadline: float | None, received: float):
        self.handle = handle
        self.deadline = deadline
        self.received = received
        self.last_token_time: float | None = None
        self.prompt_tokens: int | None = None


def check_loop_options(max_waiting: int, request_timeout: float | None) -> None:
    if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
        raise ValueError(f"max_waiting: expected an int >= 0, got {max_waiting!r}")
    if request_timeout is not None and (isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float))
                                        or not request_timeout > 0):
        raise ValueError(f"request_timeout: expected seconds > 0 or None, got {request_timeout!r}")


def engine_kv_blocks(engine) -> tuple[int, int]:
    """(total, free) KV cache blocks of the engine."""
    bm = engine.scheduler.block_manager
    return bm.num_blocks, bm.num_free_blocks


class EngineLoop:
    """Owns `engine` on a background thread.

    Args:
        engine: a `trinfer.runtime.Engine`; nothing else may call it while the loop runs.
        metrics: where to count requests, tokens, latencies, queue depth and KV usage.
        max_waiting: requests that may wait beyond the `max_num_seqs` the engine runs at once; past
            `max_num_seqs + max_waiting` requests in flight, `submit` raises Refused(429).
        request_timeout: seconds from arrival after which a request is aborted ("timeout"); None: never.
    """

    def __init__(self, engine, metrics: ServerMetrics | None = None, *, max_waiting: int = 64,
                 request_timeout: float | None = 600.0):
        check_loop_options(max_waiting, request_timeout)
        self.engine = engine
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.capacity = engine.scheduler.max_num_seqs + max_waiting
        self.request_timeout = request_timeout
        self.steps = 0  # engine steps run; read by tests and /metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _in_flight and _thread
        self._in_flight = 0
        self._accepting = True
        self._thread: threading.Thread | None = None
        # Loop-thread state.
        self._active: dict[str, _Active] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        self._drain_deadline: float | None = None
        total, free = engine_kv_blocks(engine)
        self.metrics.kv_blocks_total.set(total)

    # ------------------------------------------------------------------ any thread
    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="trinfer-engine-loop", daemon=True)
                self._thread.start()

    def submit(self, request_id: str, prompt: Any, params: SamplingParams, *, chat: bool,
               received: float | None = None, chat_template_kwargs: dict | None = None) -> RequestHandle:
        """Queue a request (call from a coroutine: its queue belongs to the running event loop)."""
        self.start()
        if not self._accepting:
            raise Refused("the server is shutting down", 503)
        if not self.alive:
            raise Refused("the engine loop has stopped (see the server log)", 503)
        with self._lock:
            if self._in_flight >= self.capacity:
                raise Refused(f"the server is at capacity ({self._in_flight} requests in flight, at most "
                              f"{self.capacity}); retry later", 429)
            self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        handle = RequestHandle(self, request_id, asyncio.get_running_loop())
        received = time.perf_counter() if received is None else received
        self._commands.put(("add", handle, prompt, params, chat, received, chat_template_kwargs))
        return handle

    def abort(self, request_id: str, reason: str) -> None:
        """Abort a request (any thread); its final Delta carries `reason`. Unknown or finished ids are ignored."""
        self._commands.put(("abort", request_id, reason))

    def begin_shutdown(self, grace: float) -> None:
        """Refuse new requests (503); let those in flight run `grace` seconds more, then abort them ("shutdown").
        Safe to call from a signal handler (no lock taken)."""
        self._accepting = False
        self._commands.put(("drain", time.perf_counter() + max(0.0, grace)))

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort what is left, end the thread and wait for it."""
        self._accepting = False
        self._commands.put(("stop",))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------------ the loop thread
    def _run(self) -> None:
        engine = self.engine
        while True:
            try:
                if not self._apply_commands(block=not engine.has_unfinished()):
                    break
                if self._drain_deadline is not None and time.perf_counter() >= self._drain_deadline:
                    self._abort_all("shutdown")
                if engine.has_unfinished():
                    self._step()
                self._expire()
            except Exception:  # the engine failed: fail what is in flight, keep serving
                logger.exception("engine loop: step failed; aborting %d requests", len(self._active))
                self._abort_all("error")
            self._publish()
            self._flush()
        self._abort_all("shutdown")
        while True:  # requests queued behind the stop command still get an answer
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                self._finish_rejected(cmd[1], Refused("the server is shutting down", 503))
        self._publish()
        self._flush()

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one when `block`); False once told to stop."""
        timeout = None
        if block and self._drain_deadline is not None and self._active:
            timeout = max(0.0, self._drain_deadline - time.perf_counter())
        try:
            cmd = self._commands.get(timeout=timeout) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind = cmd[0]
            if kind == "add":
                self._add(*cmd[1:])
            elif kind == "abort":
                self._abort(cmd[1], cmd[2])
            elif kind == "drain":
                self._drain_deadline = cmd[1] if self._drain_deadline is None else min(self._drain_deadline, cmd[1])
            elif kind == "stop":
                return False
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, handle: RequestHandle, prompt, params: SamplingParams, chat: bool, received: float,
             chat_template_kwargs: dict | None = None) -> None:
        if not self._accepting and self._drain_deadline is not None and time.perf_counter() >= self._drain_deadline:
            self._finish_rejected(handle, Refused("the server is shutting down", 503))
            return
        try:
            self.engine.add_request(prompt, params, chat=chat, request_id=handle.request_id,
                                    chat_template_kwargs=chat_template_kwargs)
        except Exception as e:  # ValueError/TypeError: a bad request (400); anything else: the server's fault
            if not isinstance(e, (ValueError, TypeError)):
                logger.exception("engine loop: add_request failed")
            self._finish_rejected(handle, e)
            return
        deadline = None if self.request_timeout is None else received + self.request_timeout
        self._active[handle.request_id] = _Active(handle, deadline, received)
        self._post(handle, Accepted())

    def _finish_rejected(self, handle: RequestHandle, error: Exception) -> None:
        self._post(handle, Rejected(error))
        self._release()

    def _abort(self, request_id: str, reason: str) -> None:
        if request_id not in self._active:
            return  # finished in the meantime (or never accepted)
        try:
            out = self.engine.abort(request_id)  # (a request that had just finished returns that final output)
        except KeyError:  # its final output was handed out already
            return
        self._on_output(out, reason)

    def _abort_all(self, reason: str) -> None:
        for request_id in list(self._active):
            try:
                self._abort(request_id, reason)
            except Exception:  # the engine is broken: still end the request
                logger.exception("engine loop: abort of %s failed", request_id)
                active = self._active.pop(request_id)
                self._post(active.handle, Delta("", [], [], reason, active.prompt_tokens or 0))
                self.metrics.requests_finished.inc(reason=reason)
                self._release()

    def _step(self) -> None:
        outputs = self.engine.step()
        self.steps += 1
        self.metrics.engine_steps.inc()
        for out in outputs:
            self._on_output(out)

    def _on_output(self, out, reason: str | None = None) -> None:
        """Record and hand over one RequestOutput; `reason` overrides an abort's finish reason."""
        active = self._active.get(out.request_id)
        if active is None:
            return
        m = self.metrics
        if active.prompt_tokens is None:
            active.prompt_tokens = len(out.prompt_token_ids)
            m.prompt_tokens.inc(active.prompt_tokens)
        new = list(out.delta_token_ids)
        logprobs = out.logprobs[len(out.logprobs) - len(new):] if new else []
        if new:
            m.generation_tokens.inc(len(new))
            for t in out.timings.token_times[-len(new):]:
                if active.last_token_time is None:
                    m.ttft.observe(t - active.received)
                else:
                    m.itl.observe(t - active.last_token_time)
                active.last_token_time = t
        finish = None
        if out.finish_reason is not None:
            finish = reason if reason is not None and out.finish_reason == "abort" else out.finish_reason
            del self._active[out.request_id]
            m.requests_finished.inc(reason=finish)
            m.e2e.observe((active.last_token_time or time.perf_counter()) - active.received)
            self._release()
        if new or out.delta_text or finish is not None:
            self._post(active.handle, Delta(out.delta_text, new, logprobs, finish, active.prompt_tokens))

    def _expire(self) -> None:
        if self.request_timeout is None or not self._active:
            return
        now = time.perf_counter()
        for request_id in [r for r, a in self._active.items() if a.deadline is not None and now >= a.deadline]:
            self._abort(request_id, "timeout")

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _publish(self) -> None:
        """Gauges from the engine's state, read here (the only thread that may read it)."""
        m, engine = self.metrics, self.engine
        m.in_flight.set(self._in_flight)
        try:
            running = len(engine.scheduler.running)
            total, free = engine_kv_blocks(engine)
            m.running.set(running)
            m.waiting.set(max(0, self._in_flight - running))
            m.kv_blocks_used.set(total - free)
            m.kv_usage.set((total - free) / total)
            m.preemptions.set_total(engine.num_preemptions)
        except Exception:  # a metric is not worth a request: log it, serve on
            logger.exception("engine loop: reading the engine's state for /metrics failed")

    # ------------------------------------------------------------------ handing over
    def _post(self, handle: RequestHandle, item) -> None:
        self._outbox.setdefault(handle.aio_loop, []).append((handle.queue, item))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for aio_loop, items in outbox.items():
            try:
                aio_loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass


def _deliver(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)
