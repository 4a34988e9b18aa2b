"""Every Prometheus metric of the server, defined in one place (see docs/metrics.md).

Names start with `lstm_serve_`, use base units, and counters end in `_total`. Labels take
bounded values only: method and status code names, model names (the files an operator
deployed), backends, locations and reasons; never a session id or a prompt. Each server
gets its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import platform

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics, start_http_server

LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)
LIFETIME_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600)
GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)
SESSION_END_REASONS = ("deleted", "expired", "temporary")
REJECT_REASONS = ("capacity", "key_limit", "queue_full")
LOCATIONS = ("device", "host")


class Metrics:
    def __init__(self, methods: list[str]) -> None:
        disable_created_metrics()  # no `_created` series: timestamps Prometheus does not need
        r = self.registry = CollectorRegistry()
        p = "lstm_serve_"
        # RPCs
        self.requests = Counter(p + "rpc_requests", "Finished RPCs by method and gRPC status code", ["method", "code"], registry=r)
        self.rpc_duration = Histogram(p + "rpc_duration_seconds", "RPC duration, streams included", ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.streams_in_flight = Gauge(p + "streams_in_flight", "Streaming RPCs open now", ["method"], registry=r)
        # tokens and latency
        self.tokens_fed = Counter(p + "tokens_fed", "Tokens absorbed from clients' input (and <bos>)", ["model"], registry=r)
        self.tokens_generated = Counter(p + "tokens_generated", "Tokens sampled and absorbed", ["model"], registry=r)
        self.time_to_first_token = Histogram(p + "time_to_first_token_seconds", "From a generate request's arrival to its first token sent", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(p + "inter_token_latency_seconds", "Between consecutive generated tokens sent on one request", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(p + "queue_wait_seconds", "From a request's submission to its first step", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.step_duration = Histogram(p + "step_duration_seconds", "One scheduler iteration in the step thread (all its batched steps)", ["model", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(p + "batch_size_rows", "Sessions in one scheduler iteration", ["model"], buckets=BATCH_BUCKETS, registry=r)
        # sessions
        self.sessions = Gauge(p + "sessions", "Live sessions by where their state is", ["location"], registry=r)
        self.session_capacity = Gauge(p + "session_capacity", "Session limit: device slots per model, and all sessions", ["kind"], registry=r)
        self.sessions_created = Counter(p + "sessions_created", "Sessions created (new, fork, import)", ["model"], registry=r)
        self.sessions_ended = Counter(p + "sessions_ended", "Sessions ended, by reason", ["reason"], registry=r)
        self.sessions_expired = Counter(p + "sessions_expired", "Sessions ended by their idle TTL", registry=r)
        self.sessions_to_host = Counter(p + "sessions_moved_to_host", "Session states moved from the device pool to host memory", ["model"], registry=r)
        self.sessions_to_device = Counter(p + "sessions_moved_to_device", "Session states moved back from host memory to the device pool", ["model"], registry=r)
        self.sessions_rejected = Counter(p + "sessions_rejected", "Session creations and requests refused, by reason", ["reason"], registry=r)
        self.session_lifetime = Histogram(p + "session_lifetime_seconds", "Age of sessions when they end", buckets=LIFETIME_BUCKETS, registry=r)
        self.state_memory = Gauge(p + "state_memory_bytes", "Memory of session states, by location", ["location"], registry=r)
        # models and build
        self.model_info = Gauge(p + "model_info", "A loaded model version (value 1)", ["name", "fingerprint", "cell", "layers", "hidden", "backend", "device"], registry=r)
        self.model_load_duration = Histogram(p + "model_load_duration_seconds", "Time to load and prepare a model file", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.invalid_model_files = Counter(p + "invalid_model_files", "Model files skipped as invalid", registry=r)
        self.state_problems = Counter(p + "state_problems", "Damaged snapshots or log records found in the state dir at start-up", registry=r)
        self.sessions_restored = Counter(p + "sessions_restored", "Sessions brought back from the state dir at start-up", registry=r)
        self.build = Info(p + "build", "Server build", registry=r)
        self.build.info({"version": _version(), "python": platform.python_version(), "torch": torch.__version__})
        self._init_labels(methods)

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
        for location in LOCATIONS:
            self.sessions.labels(location)
            self.state_memory.labels(location)

    def init_model(self, name: str, backend: str) -> None:
        for metric in (self.tokens_fed, self.tokens_generated, self.time_to_first_token, self.inter_token_latency,
                       self.queue_wait, self.batch_size, self.sessions_created, self.sessions_to_host, self.sessions_to_device):
            metric.labels(name)
        self.step_duration.labels(name, backend)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP; returns the bound port (port 0 picks a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lstm-serve")
    except PackageNotFoundError:
        return "unknown"
