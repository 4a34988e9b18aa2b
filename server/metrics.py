"""Every Prometheus metric of the server, defined in one place (see docs/metrics.md).

Names start with `lstm_serve_`, use base units, and counters end in `_total`. Labels take
bounded values only: method and status code names, model names (the files an operator
deployed), backends, locations and reasons; never a session id or a prompt.

Both server processes define the same metrics and record their own part: the gRPC front end
the RPCs and the tokens it sends, the engine core everything else. They share values through
prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set before the library is
imported: see server/cli.py), and the front end serves the merged view on one /metrics.
Every gauge names how processes combine (`livesum`: dead processes drop out). Without the
directory (in-process tests) each Metrics keeps its own registry, as before.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    MetricsHandler,
    disable_created_metrics,
    multiprocess,
)

PREFIX = "lstm_serve_"
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)
LIFETIME_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600)
GRPC_CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
SESSION_END_REASONS = ("deleted", "expired", "temporary")
REJECT_REASONS = ("capacity", "key_limit", "queue_full", "session_queue_full")
LOCATIONS = ("device", "host")


class Metrics:
    def __init__(self, methods: list[str]) -> None:
        disable_created_metrics()  # no `_created` series: timestamps Prometheus does not need
        self.registry = CollectorRegistry()
        counter, gauge, histogram = self._counter, self._gauge, self._histogram
        # RPCs
        self.requests = counter(
            "rpc_requests", "Finished RPCs by method and gRPC status code", ["method", "code"]
        )
        self.rpc_duration = histogram("rpc_duration_seconds", "RPC duration, streams included", ["method"])
        self.streams_in_flight = gauge("streams_in_flight", "Streaming RPCs open now", ["method"])
        # tokens and latency
        self.tokens_fed = counter("tokens_fed", "Tokens absorbed from clients' input (and <bos>)", ["model"])
        self.tokens_generated = counter("tokens_generated", "Tokens sampled and absorbed", ["model"])
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "From a generate request's arrival to its first token sent",
            ["model"],
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "Between consecutive generated tokens sent on one request",
            ["model"],
        )
        self.classifications = counter(
            "classifications", "Classifications answered (Classify, a stream's classify or feed)", ["model"]
        )
        self.classify_latency = histogram(
            "classify_latency_seconds", "From a classify request's arrival to its answer", ["model"]
        )
        self.queue_wait = histogram(
            "queue_wait_seconds", "From a request's submission to its first step", ["model"]
        )
        self.step_duration = histogram(
            "step_duration_seconds",
            "One scheduler iteration (all its batched steps)",
            ["model", "backend"],
        )
        self.batch_size = histogram(
            "batch_size_rows", "Sessions in one scheduler iteration", ["model"], buckets=BATCH_BUCKETS
        )
        # sessions
        self.sessions = gauge("sessions", "Live sessions by where their state is", ["location"])
        self.session_capacity = gauge(
            "session_capacity", "Session limit: device slots per model, and all sessions", ["kind"]
        )
        self.sessions_created = counter("sessions_created", "Sessions created (new, fork, import)", ["model"])
        self.sessions_ended = counter("sessions_ended", "Sessions ended, by reason", ["reason"])
        self.sessions_expired = counter("sessions_expired", "Sessions ended by their idle TTL")
        self.sessions_to_host = counter(
            "sessions_moved_to_host", "Session states moved from the device pool to host memory", ["model"]
        )
        self.sessions_to_device = counter(
            "sessions_moved_to_device",
            "Session states moved back from host memory to the device pool",
            ["model"],
        )
        self.sessions_rejected = counter(
            "sessions_rejected", "Session creations and requests refused, by reason", ["reason"]
        )
        self.session_lifetime = histogram(
            "session_lifetime_seconds", "Age of sessions when they end", buckets=LIFETIME_BUCKETS
        )
        self.state_memory = gauge("state_memory_bytes", "Memory of session states, by location", ["location"])
        # models and build
        self.model_info = gauge(
            "model_info",
            "A loaded model version (value 1)",
            ["name", "fingerprint", "cell", "layers", "hidden", "backend", "device"],
        )
        self.model_load_duration = histogram(
            "model_load_duration_seconds", "Time to load and prepare a model file", ["model"]
        )
        self.invalid_model_files = counter("invalid_model_files", "Model files skipped as invalid")
        self.state_problems = counter(
            "state_problems", "Damaged snapshots or log records found in the state dir at start-up"
        )
        self.sessions_restored = counter(
            "sessions_restored", "Sessions brought back from the state dir at start-up"
        )
        self.durability_errors = counter(
            "durability_errors",
            "Failed writes to the state dir, by operation (write, fsync: the log; snapshot)",
            ["operation"],
        )
        # a gauge, not an Info (multiprocess mode has none): the same lstm_serve_build_info series
        self.build = gauge("build_info", "Server build (value 1)", ["version", "python", "torch"])
        self._init_labels(methods)
        self._token_latency: dict[tuple[str, bool], Histogram] = {}  # (model, first token?) -> child

    def _counter(self, name: str, doc: str, labels: list[str] = ()) -> Counter:
        return Counter(PREFIX + name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: list[str] = ()) -> Gauge:
        return Gauge(PREFIX + name, doc, labels, registry=self.registry, multiprocess_mode="livesum")

    def _histogram(self, name: str, doc: str, labels: list[str] = (), buckets=LATENCY_BUCKETS) -> Histogram:
        return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

    def _init_labels(self, methods: list[str]) -> None:
        """Known label values start at zero, so rates exist before the first event."""
        for method in methods:
            self.rpc_duration.labels(method)
            for code in GRPC_CODES:
                self.requests.labels(method, code)
        for method in ("Generate", "Stream"):
            self.streams_in_flight.labels(method)
        for reason in SESSION_END_REASONS:
            self.sessions_ended.labels(reason)
        for reason in REJECT_REASONS:
            self.sessions_rejected.labels(reason)
        for operation in ("write", "fsync", "snapshot"):
            self.durability_errors.labels(operation)
        for location in LOCATIONS:
            self.sessions.labels(location)
            self.state_memory.labels(location)

    def record_build(self, torch_version: str) -> None:
        """The engine core's build (it is the process that loads torch)."""
        self.build.labels(_version(), platform.python_version(), torch_version).set(1)

    def init_model(self, name: str, backend: str) -> None:
        for metric in (
            self.tokens_fed,
            self.tokens_generated,
            self.time_to_first_token,
            self.inter_token_latency,
            self.queue_wait,
            self.classifications,
            self.classify_latency,
            self.batch_size,
            self.sessions_created,
            self.sessions_to_host,
            self.sessions_to_device,
        ):
            metric.labels(name)
        self.step_duration.labels(name, backend)

    def observe_token_latency(self, model: str, first: bool, seconds: float) -> None:
        """Time to first token (`first`) or inter-token latency of one generated token.

        Called per token, so the labelled histogram children are cached.
        """
        key = (model, first)
        histogram = self._token_latency.get(key)
        if histogram is None:
            family = self.time_to_first_token if first else self.inter_token_latency
            histogram = self._token_latency[key] = family.labels(model)
        histogram.observe(seconds)

    def observe_classification(self, model: str, seconds: float) -> None:
        self.classifications.labels(model).inc()
        self.classify_latency.labels(model).observe(seconds)

    def session_ended(self, reason: str, lifetime: float) -> None:
        self.sessions_ended.labels(reason).inc()
        if reason == "expired":
            self.sessions_expired.inc()
        self.session_lifetime.observe(lifetime)

    def count_sessions(self, on_device: int, on_host: int, device_bytes: int, host_bytes: int) -> None:
        """Live sessions and their states' bytes, by location."""
        self.sessions.labels("device").set(on_device)
        self.sessions.labels("host").set(on_host)
        self.state_memory.labels("device").set(device_bytes)
        self.state_memory.labels("host").set(host_bytes)

    def serve(self, host: str, port: int, serving: Callable[[], bool] = lambda: True) -> int:
        """Serve /metrics over HTTP, every process's values merged in multiprocess mode, and
        /healthz: 200 while `serving()`, else 503 (gRPC health's SERVING and NOT_SERVING, for
        routers that cannot send a gRPC health check, e.g. HAProxy's `option httpchk`);
        returns the bound port (port 0 picks a free one)."""
        registry = self.registry
        if MULTIPROCESS_DIR in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)

        class Handler(MetricsHandler.factory(registry)):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/healthz":
                    return super().do_GET()
                up = serving()
                body = b"SERVING\n" if up else b"NOT_SERVING\n"
                self.send_response(200 if up else 503)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # no line per scrape or check
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server.server_port


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lstm-serve")
    except PackageNotFoundError:
        return "unknown"
