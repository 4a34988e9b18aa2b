"""One more gRPC front end of `--frontends K`: `python -m server.api.frontend PARENT SOCKET PORT SETTINGS`.

Started (and restarted) by the first front end (server/api/frontends.py). It connects to the
engine core's socket, listens on the shared port with SO_REUSEPORT, and serves like the first
one; /metrics is the first one's (prometheus-client's multiprocess directory merges this
process's values in). SIGTERM: NOT_SERVING, and exit once the engine core has ended the
streams (the first front end orders that after its shutdown delay). It dies with its parent.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from server.api.engine_client import EngineClient
from server.api.serve import grpc_server, set_health
from server.api.service import METHODS
from server.config import ServeSettings
from server.lifecycle import die_with_parent
from server.metrics import Metrics

log = logging.getLogger("lstm_serve.frontend")


async def run(settings: ServeSettings, engine_socket: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    engine = EngineClient(settings)
    await engine.connect(engine_socket)
    server, health_servicer = grpc_server(settings, engine, Metrics(METHODS), port, shared=True)
    engine.on_health = lambda serving: loop.create_task(set_health(health_servicer, serving))
    await set_health(health_servicer, engine.serving)
    await server.start()
    stopping = loop.create_task(stop.wait())
    await asyncio.wait([stopping, engine.lost], return_when=asyncio.FIRST_COMPLETED)
    engine.on_health = lambda serving: None
    await set_health(health_servicer, False)
    if not stop.is_set():
        stopping.cancel()
        log.error("the engine core %s: this front end stops", engine.lost.result())
        await server.stop(0)
        return 1
    await engine.lost  # the engine core ends every stream (UNAVAILABLE, with its position) and exits
    await server.stop(settings.grace_period)
    return 0


def main() -> None:
    parent, engine_socket, port, settings = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C: the first front end decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(run(ServeSettings.model_validate_json(settings), engine_socket, int(port))))


if __name__ == "__main__":
    main()
