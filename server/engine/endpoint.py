"""The engine core's side of the front-end protocol: each message delegated to the Engine.

Session operations run as tasks and answer with a Reply (a ServeError becomes its WireError).
A stream is a Driver whose outbox sends its events to the front end; the front end returns a
credit for each event it handed to grpc, so a client that stops reading still pauses its
session a few events later, across the process boundary. Stream commands are handled in the
order they arrive: a stream's Open attaches at once (a Close right after it finds it attached).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.durability.redis_log import Stored
from server.engine.core import Engine
from server.engine.registry import ModelRuntime
from server.errors import ServeError
from server.ipc import messages as m
from server.ipc.channel import Channel
from server.sessions.jobs import ErrorEvent, Event, Job, Outbox
from server.sessions.principal import Principal
from server.sessions.store import Driver, Session

log = logging.getLogger(__name__)
# the calls about a session that exists already (Create and Import name new ones)
EXISTING_SESSION_CALLS = (m.GetSession, m.DeleteSession, m.ResetSession, m.ForkSession, m.ExportSession)
OUTBOX_LIMIT = 8  # events a stream may have unread by grpc before its session pauses


class RemoteOutbox(Outbox):
    """A stream's events, sent to the front end as they come; room while fewer than `limit`
    of them await the front end's credit."""

    def __init__(self, stream: int, channel: Channel, on_drain: Callable[[], None]) -> None:
        super().__init__(OUTBOX_LIMIT, on_drain)
        self.stream = stream
        self._channel = channel
        self._unread = 0

    def put(self, event: Event) -> None:
        if isinstance(event, ErrorEvent):
            self._channel.send(m.StreamFailed(self.stream, m.WireError.of(event.error)))
        else:
            self._unread += 1
            self._channel.send(m.StreamEvent(self.stream, event))

    def has_room(self) -> bool:
        return self._unread < self.limit

    def credit(self, events: int) -> None:
        was_full = not self.has_room()
        self._unread -= events
        if was_full and self.has_room():
            self._on_drain()


@dataclass(eq=False)
class RemoteStream:
    session: Session
    driver: Driver
    jobs: dict[str, Job] = field(default_factory=dict)


def session_info(session: Session) -> m.SessionInfo:
    return m.SessionInfo(
        session.id,
        session.model,
        session.version,
        session.seed,
        session.position,
        session.created_at,
        session.expires_at,
        session.ttl,
        "device" if session.on_device else "host",
        session.driver is not None,
        session.durable_position,
    )


def stored_info(stored: Stored, now: float) -> m.SessionInfo:
    """A session held by another server, or by none, as the shared store has it: at the
    position a call here would restore it to."""
    meta, position = stored.meta, max(0, stored.position)
    return m.SessionInfo(
        stored.id,
        meta["model"],
        meta["version"],
        meta["seed"],
        position,
        meta["created_at"],
        now + stored.remaining_ttl,
        meta["ttl"],
        "store",
        False,
        position,
    )


def model_info(runtime: ModelRuntime) -> m.ModelInfo:
    cfg, training = runtime.meta.model, runtime.meta.training
    bits = training.heldout_bits_per_byte if training else math.nan
    return m.ModelInfo(
        runtime.name,
        runtime.version,
        cfg.cell,
        cfg.layers,
        cfg.hidden,
        cfg.vocab_size,
        runtime.backend_name,
        str(runtime.device),
        str(runtime.dtype).removeprefix("torch."),
        bits if math.isfinite(bits) else 0.0,
        [m.HeadInfo(head.name, head.labels) for head in runtime.heads],
    )


class EngineEndpoint:
    def __init__(self, engine: Engine, channel: Channel, limits: dict[str, int | None]) -> None:
        self.engine = engine
        self.channel = channel
        self._limits = limits  # API key name -> its max_queued_requests (the engine's queued_limit_of)
        self._streams: dict[int, RemoteStream] = {}
        self._opening: set[int] = set()  # streams whose session is being taken over (shared store)
        self._tasks: set[asyncio.Task] = set()

    def models(self) -> list[m.ModelInfo]:
        return [model_info(r) for r in self.engine.registry.runtimes()]

    def handle(self, message: m.ToEngine) -> None:
        """One message from the front end (on the event loop, in arrival order)."""
        principal = getattr(message, "principal", None)
        if principal is not None:
            self._limits[principal.name] = principal.max_queued_requests
        match message:
            case m.Credit(stream=stream, events=events):
                s = self._streams.get(stream)
                if s is not None:  # else it closed since
                    s.driver.outbox.credit(events)
            case m.Open():
                self._open(message)
            case m.Submit():
                self._submit(message)
            case m.Cancel(stream=stream, request_id=target):
                s = self._streams.get(stream)
                if s is not None and target in s.jobs:
                    self.engine.cancel(s.session, s.jobs[target])
            case m.Close(stream=stream):
                self._close(stream)
            case m.EndTemporary(principal=principal, session_id=session_id):
                self._spawn(self._end_temporary(principal, session_id))
            case _:
                self._spawn(self._call(message))

    # ---- streams ---------------------------------------------------------------------------

    def _open(self, message: m.Open) -> None:
        if self.engine.shared is None:
            self._attach(message)
            return
        self._opening.add(message.stream)
        self._spawn(self._open_shared(message))

    async def _open_shared(self, message: m.Open) -> None:
        """With a shared session store: hold the session first (it may be another server's)."""
        try:
            await self.engine.ensure_local(message.principal, message.session_id)
        except Exception as e:
            if message.stream in self._opening:
                self._opening.discard(message.stream)
                self.channel.send(m.StreamFailed(message.stream, m.WireError.of(e)))
            return
        if message.stream in self._opening:  # else it closed meanwhile
            self._opening.discard(message.stream)
            self._attach(message)

    def _attach(self, message: m.Open) -> None:
        try:
            session, driver = self.engine.attach(
                message.principal,
                message.session_id,
                message.takeover,
                lambda wake: RemoteOutbox(message.stream, self.channel, wake),
            )
        except Exception as e:
            self.channel.send(m.StreamFailed(message.stream, m.WireError.of(e)))
            return
        self._streams[message.stream] = RemoteStream(session, driver)
        self._spawn(self._opened(message.stream, session))

    async def _opened(self, stream: int, session: Session) -> None:
        """A former stream's last step lands first; then the stream may send requests."""
        await self.engine.settle(session)
        if stream in self._streams:
            self.channel.send(m.Opened(stream, session_info(session)))

    def _submit(self, message: m.Submit) -> None:
        s = self._streams.get(message.stream)
        if s is None:
            return  # closed meanwhile
        for request_id in [r for r, job in s.jobs.items() if job.done]:
            del s.jobs[request_id]
        job = Job(
            message.request_id,
            s.driver.outbox,
            feed=message.feed,
            generate=message.generate,
            return_logprobs=message.return_logprobs,
            top_logprobs=message.top_logprobs,
            classify=message.classify,
        )
        try:
            self.engine.submit(s.session, job)
        except Exception as e:  # a refused request ends the stream
            s.driver.outbox.put(ErrorEvent(e))
            return
        s.jobs[message.request_id] = job

    def close_all(self) -> None:
        """The front end went away: detach every stream it had."""
        for stream in list(self._streams):
            self._close(stream)

    def _close(self, stream: int) -> None:
        self._opening.discard(stream)
        s = self._streams.pop(stream, None)
        if s is not None:
            for job in s.jobs.values():
                job.cancel()
            self.engine.detach(s.session, s.driver)

    async def _end_temporary(self, principal: Principal, session_id: str) -> None:
        try:
            self.engine.end_temporary(self.engine.get_session(principal, session_id))
        except Exception:  # already gone (expired, or the server is stopping)
            pass

    # ---- session operations -----------------------------------------------------------------

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, message: m.SessionCall) -> None:
        try:
            reply = await self._answer(message)
        except Exception as e:
            if not isinstance(e, ServeError):
                log.error("unexpected error in %s", type(message).__name__, exc_info=e)
            reply = m.Reply(message.call, error=m.WireError.of(e))
        self.channel.send(reply)

    async def _answer(self, message: m.SessionCall) -> m.Reply:
        engine, p = self.engine, message.principal
        if isinstance(message, EXISTING_SESSION_CALLS):
            await engine.ensure_local(p, message.session_id)
        match message:
            case m.CreateSession():
                session = await engine.create_session(
                    p,
                    message.model,
                    message.version,
                    message.seed,
                    message.ttl,
                    message.durable,
                    message.session_id,
                )
            case m.GetSession(session_id=session_id, tokens_after=after):
                session = engine.get_session(p, session_id)
                tokens = session.tokens_after(after) if after is not None else []
                return m.Reply(message.call, session_info(session), tokens=tokens)
            case m.ListSessions():
                held, elsewhere = await engine.list_sessions(p)
                now = time.time()
                sessions = [session_info(s) for s in held] + [stored_info(s, now) for s in elsewhere]
                return m.Reply(message.call, sessions=sorted(sessions, key=lambda s: s.created_at))
            case m.DeleteSession(session_id=session_id):
                await engine.delete_session(p, session_id)
                return m.Reply(message.call)
            case m.ResetSession(session_id=session_id):
                session = await engine.reset_session(p, session_id)
            case m.ForkSession(session_id=session_id):
                session = await engine.fork_session(
                    p, session_id, message.seed, message.ttl, message.new_session_id
                )
            case m.ExportSession(session_id=session_id):
                blob, session = await engine.export_session(p, session_id)
                return m.Reply(message.call, session_info(session), blob=blob)
            case m.ImportSession():
                session = await engine.import_session(p, message.blob, message.ttl, message.session_id)
            case _:
                raise TypeError(f"not a session operation: {type(message).__name__}")
        return m.Reply(message.call, session_info(session))
