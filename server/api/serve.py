"""`serve()`: the gRPC front end, health and reflection, /metrics, and graceful shutdown.

Two processes: this one (grpc, no torch) and the engine core process it spawns (models,
sessions, schedulers, durability; server/engine/process.py). Start-up: bind the ports (health
NOT_SERVING), start the engine core, which loads the models and restores sessions, then
SERVING. On SIGTERM or SIGINT: NOT_SERVING for `shutdown_delay` seconds while RPCs are still
answered, then the engine finishes its running step, ends open streams with UNAVAILABLE
naming their session's position and saves every session; in-flight unary RPCs get
`grace_period` seconds, and serve() returns 0. If the engine core process dies, the server
logs it and returns 1 (a supervisor restarts it; durable sessions come back).
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server.api.auth import Authenticator
from server.api.engine_client import EngineClient
from server.api.service import METHODS, LstmServeServicer, add_to_server
from server.config import ServeSettings, exposure_warnings
from server.ipc import messages as m
from server.metrics import Metrics

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


async def serve(settings: ServeSettings, stop: asyncio.Event | None = None) -> int:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives (0), or the engine core dies (1)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    metrics = Metrics(METHODS)
    auth = Authenticator.from_file(settings.api_keys_file)
    engine = EngineClient(settings)
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
    add_to_server(LstmServeServicer(engine, auth, settings, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    await set_health(health_servicer, False)
    engine.on_health = lambda serving: loop.create_task(set_health(health_servicer, serving))
    await engine.start()  # the engine core holds the state dir (or the start is refused)

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

    loop.add_signal_handler(signal.SIGHUP, lambda: engine.lost.done() or engine.send(m.Reload()))

    stopping = loop.create_task(stop.wait())
    await asyncio.wait([stopping, engine.lost], return_when=asyncio.FIRST_COMPLETED)
    engine.on_health = lambda serving: None  # a recovering state dir must not report SERVING now
    await set_health(health_servicer, False)
    if engine.lost.done():
        stopping.cancel()
        log.error("the engine core process %s: stopping the server", engine.lost.result())
        await server.stop(0)
        return 1
    log.info("shutting down: NOT_SERVING for %.1fs, then ending streams", settings.shutdown_delay)
    await asyncio.sleep(settings.shutdown_delay)
    await engine.shutdown()
    await server.stop(settings.grace_period)
    log.info("stopped")
    return 0
