"""The engine core process: `python -m server.engine.process FD`, started by the front end.

It owns the models, the state pools, the sessions, the schedulers and durability, and talks
to the gRPC front end over the connected Unix socket FD (server/ipc). It starts by spawn (a
fresh interpreter: no grpc or torch state inherited through fork), dies with its parent
(PR_SET_PDEATHSIG), ignores the terminal's SIGINT and SIGTERM (the front end orders the
shutdown), and exits when the front end's socket closes.

Start-up: read the settings, open the state dir (Started, or Refused with the reason), load
the models, restore the state dir's sessions, then report Ready. With several front ends
(`--frontends K`), the others connect to a Unix socket the first one names; a front end that
goes away has its streams detached (their sessions wait for their clients to come back). Each scheduler iteration's events leave in one frame (see ipc/channel.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

import torch

from server.config import ServeSettings
from server.engine.core import Engine
from server.engine.endpoint import EngineEndpoint
from server.engine.registry import ModelRegistry
from server.ipc import messages as m
from server.ipc.channel import MAX_FRAME, Channel, ChannelClosed
from server.lifecycle import die_with_parent
from server.metrics import Metrics

log = logging.getLogger("lstm_serve.engine")


class EngineCore:
    """The engine and the front ends connected to it: the first (which started this process and
    orders its shutdown) on the inherited socket, any others on the `frontends` Unix socket."""

    def __init__(self, engine: Engine, limits: dict[str, int | None]) -> None:
        self.engine = engine
        self.limits = limits
        self.endpoints: set[EngineEndpoint] = set()
        engine.on_health = self.broadcast_health

    def broadcast_health(self, serving: bool) -> None:
        for endpoint in self.endpoints:
            endpoint.channel.send(m.Health(serving))

    async def reload(self) -> None:
        await self.engine.reload_models()
        for endpoint in self.endpoints:
            endpoint.channel.send(m.Models(endpoint.models()))

    def connect(self, channel: Channel) -> EngineEndpoint:
        endpoint = EngineEndpoint(self.engine, channel, self.limits)
        self.endpoints.add(endpoint)
        channel.send(m.Ready(endpoint.models(), self.engine.log_healthy))
        return endpoint

    async def serve(self, endpoint: EngineEndpoint, primary: bool) -> None:
        """Handle one front end's frames until it goes (a front end's streams then detach) or,
        for the primary, until Shutdown (save everything) or its end (the same, then exit)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await endpoint.channel.receive()
            except ChannelClosed:
                self.endpoints.discard(endpoint)
                endpoint.close_all()
                if primary:
                    log.warning("the front end closed the engine channel: saving sessions and exiting")
                    await self.engine.stop()
                else:
                    log.warning("a front end went away: its streams detached")
                return
            for message in frame:
                if isinstance(message, m.Shutdown) and primary:
                    self.engine.on_health = lambda serving: None
                    await self.engine.stop()
                    endpoint.channel.send(m.Stopped())
                    await asyncio.gather(*(e.channel.drain() for e in self.endpoints), return_exceptions=True)
                    return
                if isinstance(message, m.Reload):
                    loop.create_task(self.reload())
                elif not isinstance(message, m.Shutdown):
                    endpoint.handle(message)

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Another front end process (--frontends K) connected."""
        endpoint = self.connect(Channel(reader, writer, m.ToEngine))
        await self.serve(endpoint, primary=False)


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
    channel.send(m.Started())

    await asyncio.to_thread(registry.scan)
    if not registry.runtimes():
        log.warning("no valid model in %s: every session request will get NOT_FOUND", settings.models_dir)
    await engine.start()
    core = EngineCore(engine, limits)
    primary = core.connect(channel)
    if start.frontends_socket:
        await asyncio.start_unix_server(core.accept, start.frontends_socket, limit=MAX_FRAME)
    log.info("engine core serving %d model version(s)", len(registry.runtimes()))
    await core.serve(primary, primary=True)


def main() -> None:
    parent, fd = int(sys.argv[1]), int(sys.argv[2])
    die_with_parent(parent)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(socket.socket(fileno=fd), parent))


if __name__ == "__main__":
    main()
