"""Connection options: TLS, API key, deadlines, message size, keepalive, retries.

Idempotent calls are retried on UNAVAILABLE by gRPC itself, through the channel's
service config (`retryPolicy`); calls that create or advance state never are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

DEFAULT_TARGET = "localhost:50051"
SERVICE = "lstmserve.v1.LstmServeService"
HEALTH_SERVICE = "grpc.health.v1.Health"

# Calls whose repetition leaves the server as one call would. Not retried: CreateSession,
# ForkSession and ImportSession (each would leave another session behind), Generate and
# Stream (they advance a session's state). DeleteSession is idempotent in effect, but a
# retry after a delete the server did apply reports NOT_FOUND.
IDEMPOTENT_METHODS = (
    "ListModels",
    "GetSession",
    "ListSessions",
    "ExportSession",
    "DeleteSession",
    "ResetSession",
)


@dataclass(frozen=True)
class ClientOptions:
    """How a `Client` or `AsyncClient` connects. All fields are optional."""

    api_key: str | None = None
    """Sent as `authorization: Bearer <key>` metadata on every call."""
    tls: bool = False
    """Use TLS (implied by `ca_cert`); without `ca_cert`, the system's roots are trusted."""
    ca_cert: bytes | str | os.PathLike[str] | None = None
    """The CA certificate that signed the server's: PEM bytes or a path to a PEM file."""
    tls_server_name: str | None = None
    """Check the server's certificate against this name instead of the target's host."""
    client_cert: bytes | str | os.PathLike[str] | None = None
    """This client's certificate chain (PEM bytes or path), for servers that require one."""
    client_key: bytes | str | os.PathLike[str] | None = None
    """The private key of `client_cert` (PEM bytes or path)."""
    timeout: float | None = 30.0
    """Deadline in seconds of each unary call; None: none."""
    stream_timeout: float | None = None
    """Deadline in seconds of each Generate or Stream call; None: none."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest message sent or received (exported sessions travel in one message)."""
    keepalive_time: float | None = None
    """Seconds between HTTP/2 keepalive pings; None: no pings (gRPC's default)."""
    keepalive_timeout: float = 20.0
    """Seconds to wait for a ping's answer before the connection is deemed dead."""
    retry_attempts: int = 5
    """Attempts (gRPC allows at most 5) of an idempotent call that gets UNAVAILABLE; 1: no retry."""
    own_connection: bool = False
    """Open this client's own connection: gRPC otherwise shares one among a process's channels to
    the same target, and a server with several front-end processes sees one connection (one
    process) where it could spread many."""

    @property
    def secure(self) -> bool:
        return self.tls or self.ca_cert is not None or self.client_cert is not None

    def metadata(self, session_id: str = "") -> tuple[tuple[str, str], ...]:
        """The metadata every call carries, and `x-session-id` for a call about one session (a
        router hashes it to keep the session on one replica)."""
        found = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        return (*found, ("x-session-id", session_id)) if session_id else found

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS channel credentials (only for a secure channel)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca_cert),
            private_key=_pem(self.client_key),
            certificate_chain=_pem(self.client_cert),
        )

    def channel_args(self) -> list[tuple[str, Any]]:
        """grpc channel arguments for these options."""
        args: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(self.retry_attempts)),
        ]
        if self.keepalive_time is not None:
            args += [
                ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
                ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle stream
            ]
        if self.tls_server_name:
            args.append(("grpc.ssl_target_name_override", self.tls_server_name))
        if self.own_connection:
            args.append(("grpc.use_local_subchannel_pool", 1))
        return args


def _pem(value: bytes | str | os.PathLike[str] | None) -> bytes | None:
    """PEM bytes given as such or as a path."""
    return value if value is None or isinstance(value, bytes) else Path(value).read_bytes()


def service_config(attempts: int) -> str:
    """The service config JSON: retry idempotent calls (and health checks) on UNAVAILABLE."""
    names = [{"service": SERVICE, "method": m} for m in IDEMPOTENT_METHODS]
    names.append({"service": HEALTH_SERVICE, "method": "Check"})
    config: dict[str, Any] = {"name": names}
    if attempts > 1:
        config["retryPolicy"] = {
            "maxAttempts": min(attempts, 5),
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [config]})


def open_channel(target: str, options: ClientOptions, module: Any) -> Any:
    """A channel from `module` (`grpc` or `grpc.aio`) for `target` with `options`."""
    if options.secure:
        return module.secure_channel(target, options.credentials(), options=options.channel_args())
    return module.insecure_channel(target, options=options.channel_args())
