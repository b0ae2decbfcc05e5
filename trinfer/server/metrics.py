"""Server metrics in the Prometheus text exposition format (version 0.0.4), written here without a client library.

Three kinds, each a family of samples keyed by label values:
    Counter    only goes up (`name_total`)
    Gauge      a value set to the latest reading
    Histogram  cumulative buckets `name_bucket{le="..."}` (each counts observations <= le, `+Inf` all of
               them), then `name_sum` and `name_count`

Every family takes its own lock, so the engine loop thread and the HTTP handlers update them concurrently;
`ServerMetrics.render()` reads each family under its lock.
"""
from __future__ import annotations

import math
import threading
from typing import Iterable

# Latency buckets in seconds: sub-millisecond (a GPU's inter-token gap) to minutes (a CPU's long prompt).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)


def _escape(value: str) -> str:
    """A label value as the text format quotes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    if float(x).is_integer() and abs(x) < 2**53:
        return str(int(x))
    return repr(float(x))


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Family:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Iterable[str] = ()):
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class _Scalar(_Family):
    """A family of one number per label set (counters and gauges)."""

    def __init__(self, name: str, help_text: str, labelnames: Iterable[str] = ()):
        super().__init__(name, help_text, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0.0}

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


class Counter(_Scalar):
    """A monotonically increasing count; `name` must end in `_total`."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Iterable[str] = ()):
        if not name.endswith("_total"):
            raise ValueError(f"counter name: expected a name ending in _total, got {name!r}")
        super().__init__(name, help_text, labelnames)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up, got inc({amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set_total(self, value: float, **labels: str) -> None:
        """Mirror a count kept elsewhere (e.g. the engine's preemptions); it must not decrease."""
        key = self._key(labels)
        with self._lock:
            if value < self._values.get(key, 0.0):
                raise ValueError(f"{self.name}: a counter only goes up, got {value} after {self._values[key]}")
            self._values[key] = float(value)


class Gauge(_Scalar):
    """A value set to the latest reading."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Family):
    """Observations counted into fixed upper bounds (`le`); rendered cumulatively, as Prometheus expects."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help_text)
        bounds = tuple(float(b) for b in buckets)
        if not bounds or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"{name}: buckets must be a non-empty increasing sequence, got {bounds}")
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative); the last is (bounds[-1], +Inf)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.bounds) and value > self.bounds[i]:
            i += 1
        with self._lock:
            self._counts[i] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def lines(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        out, running = self.header(), 0
        for bound, c in zip(self.bounds + (math.inf,), counts):
            running += c
            out.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        out += [f"{self.name}_sum {_number(total)}", f"{self.name}_count {n}"]
        return out


class ServerMetrics:
    """Every metric `trinfer serve` exports at GET /metrics (one instance per app; no global registry)."""

    def __init__(self) -> None:
        self.http_requests = Counter("trinfer_http_requests_total", "HTTP requests answered, by path and status code.",
                                     ("path", "code"))
        self.requests_finished = Counter(
            "trinfer_requests_finished_total",
            "Generation requests that ended, by reason: eos, stop, length, context (the engine's), timeout, "
            "shutdown, disconnect (aborted by the server) or error.", ("reason",))
        self.prompt_tokens = Counter("trinfer_prompt_tokens_total", "Prompt tokens of accepted generation requests.")
        self.generation_tokens = Counter("trinfer_generation_tokens_total", "Tokens generated (an EOS token included).")
        self.preemptions = Counter("trinfer_preemptions_total",
                                   "Sequences preempted (KV blocks freed, recomputed later) by the engine.")
        self.engine_steps = Counter("trinfer_engine_steps_total", "Engine steps run by the engine loop.")
        self.in_flight = Gauge("trinfer_requests_in_flight",
                               "Generation requests accepted by the server and not finished.")
        self.running = Gauge("trinfer_requests_running", "Requests the engine is decoding (holding KV blocks).")
        self.waiting = Gauge("trinfer_requests_waiting",
                             "Queue depth: requests accepted and not yet running (the engine's waiting queue plus "
                             "those not yet handed to it).")
        self.kv_blocks_total = Gauge("trinfer_kv_cache_blocks_total", "KV cache blocks.")
        self.kv_blocks_used = Gauge("trinfer_kv_cache_blocks_used", "KV cache blocks held by requests.")
        self.kv_usage = Gauge("trinfer_kv_cache_usage_ratio", "Fraction of the KV cache's blocks in use (0-1).")
        self.ttft = Histogram("trinfer_time_to_first_token_seconds",
                              "From the HTTP request's arrival to its first generated token.")
        self.itl = Histogram("trinfer_inter_token_latency_seconds",
                             "Gap between consecutive generated tokens of a request.")
        self.e2e = Histogram("trinfer_request_duration_seconds",
                             "From the HTTP request's arrival to its last token (generation requests).")

    def families(self) -> list[_Family]:
        return [v for v in vars(self).values() if isinstance(v, _Family)]

    def render(self) -> str:
        lines: list[str] = []
        for family in self.families():
            lines += family.lines()
        return "\n".join(lines) + "\n"
