"""trinfer's OpenAI-compatible HTTP server (Starlette on uvicorn) over one engine.

    from trinfer.runtime import Engine
    from trinfer.server import build_app, ServerConfig, serve

    app = build_app(Engine(), ServerConfig(model_name="smollm2"))   # an ASGI app: mount it or serve it
    serve(app, "127.0.0.1", 8000)                                   # what `trinfer serve` does

Modules, in the order a request meets them:
    protocol      request bodies -> a validated GenerationRequest, or an OpenAI-schema error naming the field
    app           the routes, body limit, streaming (server-sent events), disconnect -> abort
    engine_loop   the thread that owns the engine: commands in, per-request queues out
    render        OpenAI's response objects (chunks, usage, log-probabilities, finish reasons)
    metrics       Prometheus text format (counters, gauges, histograms), written here
    serve         uvicorn with a graceful stop on SIGTERM/SIGINT
"""
from .app import ServerConfig, TrinferServer, build_app
from .engine_loop import EngineLoop
from .metrics import ServerMetrics
from .serve import ServerThread, serve

__all__ = ["build_app", "ServerConfig", "TrinferServer", "EngineLoop", "ServerMetrics", "ServerThread", "serve"]
