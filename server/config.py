"""Server settings: command-line flags over `LSTM_SERVE_*` environment variables over defaults."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# One log record holds one session's tokens of one iteration, counted in a uint16 (see
# server/durability/journal.py), so a prefill chunk is at most this long.
MAX_TOKENS_PER_RECORD = 0xFFFF


def default_frontends() -> int:
    """Front ends that fit the machine: one core is the engine core's."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LSTM_SERVE_", extra="forbid")

    models_dir: Path = Path("models")
    host: str = Field(
        "127.0.0.1", description="address of gRPC and /metrics; 0.0.0.0 (or ::) listens beyond this machine"
    )
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port; the bound one is printed")
    metrics_port: int = Field(
        8000, ge=0, le=65535, description="Prometheus /metrics over HTTP; 0 picks a free port"
    )
    backend: Literal["auto", "torch", "triton", "synthetic"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int = Field(2, ge=1, le=256, description="torch intra-op threads of the step")
    frontends: int = Field(
        0,
        ge=0,
        le=64,
        description="gRPC front-end processes sharing the port (0: min(4, cores - 1), at least 1)",
    )
    max_batch_size: int = Field(128, ge=1, le=4096, description="rows in one batched step")
    device_slots: int = Field(1024, ge=1, description="session states held on the device")
    max_sessions: int = Field(4096, ge=1, description="sessions on device and host together")
    max_queue: int = Field(1024, ge=1, description="requests waiting for the scheduler, per model")
    max_queued_per_session: int = Field(
        16, ge=1, description="requests one session may have queued or running; more get RESOURCE_EXHAUSTED"
    )
    max_prompt_tokens: int = Field(8192, ge=1)
    max_new_tokens: int = Field(4096, ge=1)
    prefill_chunk: int = Field(
        64,
        ge=1,
        le=MAX_TOKENS_PER_RECORD,
        description="prompt tokens a session feeds before yielding its turn to waiting sessions (one log record)",
    )
    session_ttl: float = Field(600.0, gt=0, description="seconds an idle session lives")
    max_session_ttl: float = Field(7 * 24 * 3600.0, gt=0, description="the longest TTL a client may ask for")
    api_keys_file: Path | None = None
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain: serve gRPC over TLS (with --tls-key)"
    )
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it"
    )
    state_dir: Path | None = Field(None, description="keep sessions here across restarts and crashes")
    session_store: str | None = Field(
        None,
        pattern=r"^redis://[^/]+(/\d+)?$",
        description="redis://HOST:PORT/DB: keep sessions in Redis, shared by replicas (instead of --state-dir)",
    )
    durability: Literal["none", "shutdown", "log"] | None = Field(
        None,
        description="none, shutdown (snapshots at a graceful stop) or log (also a write-ahead log); default: log with a state dir",
    )
    fsync_interval: float = Field(0.05, gt=0, description="seconds between fsyncs of the write-ahead log")
    snapshot_interval: float = Field(
        30.0, gt=0, description="seconds between snapshots that bound the log's replay"
    )
    shutdown_delay: float = Field(
        5.0, ge=0, description="seconds of NOT_SERVING health before streams end on SIGTERM"
    )
    grace_period: float = Field(
        10.0, ge=0, description="seconds in-flight unary RPCs get to finish at shutdown"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.max_sessions < self.device_slots:
            raise ValueError(
                f"max_sessions ({self.max_sessions}) must be at least device_slots ({self.device_slots})"
            )
        if self.session_ttl > self.max_session_ttl:
            raise ValueError("session_ttl must not exceed max_session_ttl")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if self.session_store is not None:
            if self.state_dir is not None:
                raise ValueError("give --session-store or --state-dir, not both: one store per server")
            if self.durability not in (None, "log"):
                raise ValueError("--session-store keeps every absorbed token: its durability is log")
            self.durability = "log"
        elif self.durability is None:
            self.durability = "log" if self.state_dir is not None else "none"
        elif self.durability != "none" and self.state_dir is None:
            raise ValueError(f"durability {self.durability!r} needs a state_dir")
        return self


def is_loopback(host: str) -> bool:
    """True if `host` (a name or an address, IPv6 possibly in brackets) reaches only this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve to any interface


def exposure_warnings(settings: ServeSettings) -> list[str]:
    """What the start-up log warns about when listening beyond loopback: no API keys, or API
    keys sent without TLS."""
    if is_loopback(settings.host):
        return []
    if settings.api_keys_file is None:
        return [
            f"listening on {settings.host}, beyond loopback, without --api-keys-file: anyone who can reach these "
            f"ports can use every model and session; give --api-keys-file, or --host 127.0.0.1 for local use only"
        ]
    if settings.tls_cert is None:
        return [
            f"API keys travel unencrypted to {settings.host} (no --tls-cert): anyone on the network path can read "
            f"and reuse them; give --tls-cert and --tls-key, or listen on loopback behind a TLS-terminating proxy"
        ]
    return []
