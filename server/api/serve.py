"""`serve()`: the gRPC server, health and reflection, /metrics, and graceful shutdown.

Start-up: bind the ports (health NOT_SERVING), load the models, start the schedulers, then
SERVING. On SIGTERM or SIGINT: NOT_SERVING for `shutdown_delay` seconds while RPCs are still
answered, then the running step finishes, open streams end with UNAVAILABLE naming their
session's position, in-flight unary RPCs get `grace_period` seconds, and serve() returns.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server.api.auth import Authenticator
from server.api.service import METHODS, LstmServeServicer, add_to_server
from server.config import ServeSettings, exposure_warnings
from server.engine.core import Engine
from server.engine.metrics import Metrics
from server.engine.registry import ModelRegistry

log = logging.getLogger("lstm_serve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LstmServeService"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # exported sessions of large models


async def set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


def server_credentials(settings: ServeSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (client certificates required with a CA)."""
    if settings.tls_cert is None:
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def serve(settings: ServeSettings, stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives."""
    torch.set_num_threads(settings.threads)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    metrics = Metrics(METHODS)
    registry = ModelRegistry(settings, metrics)
    auth = Authenticator.from_file(settings.api_keys_file)
    engine = Engine(settings, registry, metrics, auth.max_queued_requests)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            # find dead clients (their streams then release their sessions) ...
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # ... and accept clients' keepalive pings down to every 10 s, also on idle streams
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    add_to_server(LstmServeServicer(engine, auth), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    await set_health(health_servicer, False)

    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    metrics_port = metrics.serve(settings.host, settings.metrics_port)
    await server.start()
    print(
        f"lstm-serve: listening on {settings.host}:{port}, metrics on http://{settings.host}:{metrics_port}/metrics",
        flush=True,
    )
    for warning in exposure_warnings(settings):
        log.warning(warning)

    await asyncio.to_thread(registry.scan)
    if not registry.runtimes():
        log.warning("no valid model in %s: every session request will get NOT_FOUND", settings.models_dir)
    await engine.start()
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(engine.reload_models()))
    engine.on_health = lambda serving: loop.create_task(set_health(health_servicer, serving))
    await set_health(health_servicer, engine.log_healthy)
    log.info("serving %d model version(s)", len(registry.runtimes()))

    await stop.wait()
    log.info("shutting down: NOT_SERVING for %.1fs, then ending streams", settings.shutdown_delay)
    engine.on_health = lambda serving: None  # a recovering state dir must not report SERVING now
    await set_health(health_servicer, False)
    await asyncio.sleep(settings.shutdown_delay)
    await engine.stop()
    await server.stop(settings.grace_period)
    log.info("stopped")
