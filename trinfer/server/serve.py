"""Run the app on uvicorn, with the graceful stop `trinfer serve` promises.

On the first SIGTERM or SIGINT: new requests get 503, the listening socket closes, requests in flight go on for
`shutdown_grace` seconds and are then aborted, each stream ending with a final chunk (finish_reason "abort")
and `data: [DONE]`; then the engine loop stops and `serve` returns (the process exits 0). A second SIGINT
forces the exit (uvicorn's rule).
"""
from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading

import uvicorn

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Server(uvicorn.Server):
    """uvicorn's server that tells trinfer when a stop signal comes, and does not re-raise the signal after the
    graceful stop (uvicorn does, which would end the process with the signal's status instead of 0)."""

    def __init__(self, config: uvicorn.Config, on_stop_signal):
        super().__init__(config)
        self._on_stop_signal = on_stop_signal

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self._on_stop_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only (an embedding or a test runs us elsewhere)
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); ValueError naming --host/--port if not."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port: expected 0-65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host: cannot resolve {host!r} ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"--port: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app, *, log_level: str = "info") -> _Server:
    """A uvicorn server for `app` (from `build_app`) whose stop signals start trinfer's graceful stop."""
    server = app.state.trinfer
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=5,
                            timeout_graceful_shutdown=server.config.shutdown_grace + 10)
    return _Server(config, server.begin_shutdown)


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Serve `app` on host:port until SIGTERM/SIGINT, then stop gracefully and return."""
    sock = bind(host, port)
    actual = sock.getsockname()[1]
    model = app.state.trinfer.config.model_name
    print(f"trinfer serve: http://{host}:{actual}/v1 (model {model!r})", file=sys.stderr, flush=True)
    make_server(app, log_level=log_level).run(sockets=[sock])


class ServerThread:
    """Serve `app` from a background thread on a free port (tests, benchmarks, notebooks); signals stay with
    the caller. Stopping is graceful: requests in flight get the app's shutdown grace, then their final chunk.

        with ServerThread(build_app(engine)) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
        self.app = app
        self._sock = bind(host, port)
        self.host = host
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = make_server(app, log_level=log_level)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="trinfer-uvicorn", daemon=True)

    def start(self, timeout: float = 60.0) -> "ServerThread":
        import time

        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """What SIGTERM does to `trinfer serve`: 503 for new requests, the grace, final chunks, loop stopped."""
        self._server.handle_exit(signal.SIGTERM, None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError(f"the server on {self.url} did not stop within {timeout} s")

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
