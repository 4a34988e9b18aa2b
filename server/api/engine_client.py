"""The front end's handle on the engine core process: start it, call it, stream through it.

`EngineClient.start()` spawns `python -m server.engine.process` (a fresh interpreter) on one
end of a socketpair and sends it the settings. Session operations are awaitable calls;
streams are `RemoteStream`s whose events arrive as the engine's frames do. The engine's
health, its models and its death come back as attributes and a future: the server ends when
`lost` completes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable

from server.config import ServeSettings
from server.errors import Unavailable
from server.ipc import messages as m
from server.ipc.channel import MAX_FRAME, Channel, ChannelClosed
from server.sessions.jobs import Event, GenerateSpec
from server.sessions.principal import Principal

log = logging.getLogger(__name__)


class LocalError:
    """An error of the front end's own side of a stream (a bad command), in event order."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class RemoteStream:
    """One stream's commands to the engine and its events back, in order."""

    def __init__(self, client: EngineClient, stream: int) -> None:
        self._client = client
        self.id = stream
        self._queue: asyncio.Queue = asyncio.Queue()

    def deliver(self, item: object) -> None:
        self._queue.put_nowait(item)

    async def opened(self) -> m.SessionInfo:
        """The session once attached (a former stream's last step landed); its error if refused."""
        item = await self._queue.get()
        if isinstance(item, m.StreamFailed):
            raise item.error.exception()
        return item.session

    def submit(
        self,
        request_id: str,
        feed: list[int],
        generate: GenerateSpec | None,
        logprobs: bool = False,
        top: int = 0,
        classify: bool = False,
    ) -> None:
        self._client.send(m.Submit(self.id, request_id, feed, generate, logprobs, top, classify))

    def cancel(self, request_id: str) -> None:
        self._client.send(m.Cancel(self.id, request_id))

    async def events(self) -> AsyncIterator[Event | object]:
        """The stream's events and local items as they come; an error is raised. Each engine
        event taken here gives the engine credit for one more."""
        while True:
            item = await self._queue.get()
            if isinstance(item, m.StreamEvent):
                self._client.credit(self.id)
                yield item.event
            elif isinstance(item, m.StreamFailed):
                raise item.error.exception()
            elif isinstance(item, LocalError):
                raise item.error
            else:
                yield item

    def close(self) -> None:
        self._client.close_stream(self)


class EngineClient:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.models: list[m.ModelInfo] = []
        self.ready = False
        self.ready_event = asyncio.Event()
        self.serving = False  # the engine's health: False while its state dir refuses writes
        self.on_health: Callable[[bool], None] = lambda serving: None
        self.lost: asyncio.Future[str] | None = None  # why the engine is gone, when it is
        self._process: subprocess.Popen | None = None
        self._channel: Channel | None = None
        self._calls: dict[int, asyncio.Future[m.Reply]] = {}
        self._streams: dict[int, RemoteStream] = {}
        self._ids = itertools.count(1)
        self._credits: Counter[int] = Counter()
        self._stopped = asyncio.Event()
        self._started: asyncio.Future[None] | None = None

    async def start(self, frontends_socket: str = "") -> None:
        """Spawn the engine core process and wait until it holds its state dir (ValueError if
        it refuses to start); `ready` comes later, once it has loaded its models. Other front
        ends may then connect at `frontends_socket`."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "server.engine.process", str(os.getpid()), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        await self._open(await Channel.connect(ours, m.ToFrontEnd))
        self.send(m.Start(self.settings.model_dump_json(), frontends_socket))
        await self._started

    async def connect(self, path: str) -> None:
        """Join an engine core another front end started (--frontends K); returns once ready."""
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_FRAME)
        await self._open(Channel(reader, writer, m.ToFrontEnd))
        await self._started

    async def _open(self, channel: Channel) -> None:
        self._channel = channel
        channel.before_flush = self._send_credits
        loop = asyncio.get_running_loop()
        self.lost, self._started = loop.create_future(), loop.create_future()
        loop.create_task(self._receive_forever(), name="engine-channel")

    @property
    def engine_pid(self) -> int | None:
        """The engine core process's pid, if this front end started it."""
        return None if self._process is None else self._process.pid

    def check_ready(self) -> None:
        if not self.ready:
            raise Unavailable("the server is still loading its models; retry shortly")

    def send(self, message: m.ToEngine) -> None:
        if self.lost is not None and self.lost.done():
            raise Unavailable("the engine core process is gone; the server is stopping")
        self._channel.send(message)

    async def call(self, make: Callable[[int], m.SessionCall]) -> m.Reply:
        """Send a session operation built by `make(call_id)`; its reply, or its error raised."""
        call = next(self._ids)
        future = self._calls[call] = asyncio.get_running_loop().create_future()
        try:
            self.send(make(call))
            reply = await future
        finally:
            self._calls.pop(call, None)
        if reply.error is not None:
            raise reply.error.exception()
        return reply

    def open_stream(self, principal: Principal, session_id: str, takeover: bool) -> RemoteStream:
        stream = RemoteStream(self, next(self._ids))
        self._streams[stream.id] = stream
        self.send(m.Open(stream.id, principal, session_id, takeover))
        return stream

    def close_stream(self, stream: RemoteStream) -> None:
        if self._streams.pop(stream.id, None) is not None and not self.lost.done():
            self._credits.pop(stream.id, None)
            self.send(m.Close(stream.id))

    def credit(self, stream: int) -> None:
        self._credits[stream] += 1
        self._channel.schedule()

    def _send_credits(self) -> None:
        """Before each frame: the credits of this turn, one message per stream."""
        if self._credits:
            for stream, events in self._credits.items():
                self._channel.send(m.Credit(stream, events))
            self._credits.clear()

    async def shutdown(self) -> None:
        """Have the engine end every stream and save every session, then wait for it to exit."""
        if not self.lost.done():
            self.send(m.Shutdown())
            await self.lost
        if self._process is not None:
            await asyncio.to_thread(self._process.wait)

    async def _receive_forever(self) -> None:
        try:
            while True:
                for message in await self._channel.receive():
                    self._dispatch(message)
        except ChannelClosed:
            pass
        if self._process is not None:
            code = await asyncio.to_thread(self._process.wait)
            reason = "stopped" if self._stopped.is_set() else f"exited with code {code}"
        else:  # another front end's engine: it stopped, or it died
            reason = "stopped" if self._stopped.is_set() else "went away"
        self.ready = False
        for future in self._calls.values():
            if not future.done():
                future.set_exception(Unavailable(f"the engine core process {reason}; the server is stopping"))
        if not self._started.done():
            self._started.set_exception(ChildProcessError(f"the engine core process {reason} while starting"))
        failure = m.WireError("UNAVAILABLE", f"the engine core process {reason}; the server is stopping")
        for stream in list(self._streams.values()):
            stream.deliver(m.StreamFailed(stream.id, failure))
        self.lost.set_result(reason)

    def _dispatch(self, message: m.ToFrontEnd) -> None:
        match message:
            case m.StreamEvent(stream=stream) | m.Opened(stream=stream) | m.StreamFailed(stream=stream):
                target = self._streams.get(stream)
                if target is not None:
                    target.deliver(message)
            case m.Reply(call=call):
                future = self._calls.get(call)
                if future is not None and not future.done():
                    future.set_result(message)
            case m.Started():
                self._started.set_result(None)
            case m.Refused(reason=reason):
                self._started.set_exception(ValueError(reason))
            case m.Ready(models=models, serving=serving):
                self.models, self.ready = models, True
                self.ready_event.set()
                if not self._started.done():  # a front end that connected: ready is its start
                    self._started.set_result(None)
                self._set_health(serving)
            case m.Models(models=models):
                self.models = models
            case m.Health(serving=serving):
                self._set_health(serving)
            case m.Stopped():
                self._stopped.set()

    def _set_health(self, serving: bool) -> None:
        self.serving = serving
        self.on_health(serving)
