"""The engine core process: `python -m server.engine.process FD`, started by the front end.

It owns the models, the state pools, the sessions, the schedulers and durability, and talks
to the gRPC front end over the connected Unix socket FD (server/ipc). It starts by spawn (a
fresh interpreter: no grpc or torch state inherited through fork), dies with its parent
(PR_SET_PDEATHSIG), ignores the terminal's SIGINT and SIGTERM (the front end orders the
shutdown), and exits when the front end's socket closes.

Start-up: read the settings, open the state dir (Started, or Refused with the reason), load
the models, restore the state dir's sessions, then report Ready. Each scheduler iteration's events leave in one frame (see ipc/channel.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys

import torch

from server.config import ServeSettings
from server.engine.core import Engine
from server.engine.endpoint import EngineEndpoint
from server.engine.registry import ModelRegistry
from server.ipc import messages as m
from server.ipc.channel import Channel, ChannelClosed
from server.metrics import Metrics

log = logging.getLogger("lstm_serve.engine")
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (a kill -9 of the server leaves no engine)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


async def run(sock: socket.socket, parent: int) -> None:
    channel = await Channel.connect(sock, m.ToEngine)
    (start,) = await channel.receive()
    settings = ServeSettings.model_validate_json(start.settings)
    torch.set_num_threads(settings.threads)
    metrics = Metrics([])
    metrics.record_build(torch.__version__)
    registry = ModelRegistry(settings, metrics)
    limits: dict[str, int | None] = {}
    try:
        engine = Engine(settings, registry, metrics, limits.get, parent)  # opens and locks the state dir
    except ValueError as e:
        channel.send(m.Refused(str(e)))
        await channel.drain()
        sys.exit(2)
    endpoint = EngineEndpoint(engine, channel, limits)
    channel.send(m.Started())

    await asyncio.to_thread(registry.scan)
    if not registry.runtimes():
        log.warning("no valid model in %s: every session request will get NOT_FOUND", settings.models_dir)
    await engine.start()
    engine.on_health = lambda serving: channel.send(m.Health(serving))
    channel.send(m.Ready(endpoint.models(), engine.log_healthy))
    log.info("engine core serving %d model version(s)", len(registry.runtimes()))

    loop = asyncio.get_running_loop()
    while True:
        try:
            frame = await channel.receive()
        except ChannelClosed:
            log.warning("the front end closed the engine channel: saving sessions and exiting")
            await engine.stop()
            return
        for message in frame:
            if isinstance(message, m.Shutdown):
                engine.on_health = lambda serving: None
                await engine.stop()
                channel.send(m.Stopped())
                await channel.drain()
                return
            if isinstance(message, m.Reload):
                loop.create_task(reload(engine, endpoint))
            else:
                endpoint.handle(message)


async def reload(engine: Engine, endpoint: EngineEndpoint) -> None:
    await engine.reload_models()
    endpoint.channel.send(m.Models(endpoint.models()))


def main() -> None:
    parent, fd = int(sys.argv[1]), int(sys.argv[2])
    die_with_parent(parent)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(socket.socket(fileno=fd), parent))


if __name__ == "__main__":
    main()
