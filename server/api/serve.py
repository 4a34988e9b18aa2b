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
import os
import signal
import tempfile

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server.api.auth import Authenticator
from server.api.engine_client import EngineClient
from server.api.frontends import FrontEnds
from server.api.service import METHODS, LstmServeServicer, add_to_server
from server.config import ServeSettings, default_frontends, exposure_warnings
from server.ipc import messages as m
from server.lifecycle import claim_port
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


def grpc_server(
    settings: ServeSettings, engine: EngineClient, metrics: Metrics, port: int, shared: bool
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A front end's gRPC server on `port` (SO_REUSEPORT when `shared` by several front ends):
    the service, health (NOT_SERVING until set) and reflection."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # one front end alone owns its port; several share it on purpose (claim_port checked it)
            ("grpc.so_reuseport", int(shared)),
            # find dead clients (their streams then release their sessions) ...
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # ... and accept clients' keepalive pings down to every 10 s, also on idle streams
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    auth = Authenticator.from_file(settings.api_keys_file)
    add_to_server(LstmServeServicer(engine, auth, settings, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{settings.host}:{port}"
    credentials = server_credentials(settings)
    server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    return server, health_servicer


async def serve(settings: ServeSettings, stop: asyncio.Event | None = None) -> int:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives (0), or the engine core dies (1)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    count = settings.frontends or default_frontends()
    port, held = claim_port(settings.host, settings.port, shared=count > 1)
    metrics = Metrics(METHODS)
    engine = EngineClient(settings)
    workdir = tempfile.TemporaryDirectory(prefix="lstm-serve-") if count > 1 else None
    engine_socket = os.path.join(workdir.name, "engine.sock") if workdir else ""  # where the others join
    await engine.start(engine_socket)  # the engine core holds the state dir (or the start is refused)
    server, health_servicer = grpc_server(settings, engine, metrics, port, shared=count > 1)
    engine.on_health = lambda serving: loop.create_task(set_health(health_servicer, serving))
    await set_health(health_servicer, engine.ready and engine.serving)
    draining = asyncio.Event()  # set at SIGTERM: /healthz says NOT_SERVING from then on
    metrics_port = metrics.serve(
        settings.host,
        settings.metrics_port,
        lambda: engine.ready and engine.serving and not draining.is_set(),
    )
    await server.start()
    others = FrontEnds(count - 1, settings, engine_socket, port)
    print(
        f"lstm-serve: listening on {settings.host}:{port}, metrics on http://{settings.host}:{metrics_port}/metrics"
        + (f" ({count} front-end processes)" if count > 1 else ""),
        flush=True,
    )
    for warning in exposure_warnings(settings):
        log.warning(warning)
    loop.add_signal_handler(signal.SIGHUP, lambda: engine.lost.done() or engine.send(m.Reload()))
    if count > 1:
        await engine.ready_event.wait()  # the others connect once it is ready
        others.start()

    stopping = loop.create_task(stop.wait())
    await asyncio.wait([stopping, engine.lost], return_when=asyncio.FIRST_COMPLETED)
    engine.on_health = lambda serving: None  # a recovering state dir must not report SERVING now
    draining.set()
    others.terminate()  # they go NOT_SERVING too, and end with the engine core
    await set_health(health_servicer, False)
    if engine.lost.done():
        stopping.cancel()
        log.error("the engine core process %s: stopping the server", engine.lost.result())
        await server.stop(0)
        await others.wait(5)
        return 1
    log.info("shutting down: NOT_SERVING for %.1fs, then ending streams", settings.shutdown_delay)
    await asyncio.sleep(settings.shutdown_delay)
    await engine.shutdown()
    await server.stop(settings.grace_period)
    await others.wait(settings.grace_period + 5)
    if held is not None:
        held.close()
    if workdir is not None:
        workdir.cleanup()
    log.info("stopped")
    return 0
