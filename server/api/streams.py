"""The bidirectional Stream protocol on one session, below grpc.

The first command attaches (`Open`); after it, feed and generate commands become jobs on the
session, processed in order, and `Cancel` stops one at its next step. Commands are read
concurrently with the events being written, so a cancel reaches a running generation. When
the client half-closes, the stream ends once its requests are finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.errors import InvalidArgument
from server.sessions.jobs import ErrorEvent, Event, FinishedEvent, GenerateSpec, Job, Outbox
from server.sessions.principal import Principal
from server.sessions.store import Session


@dataclass(frozen=True)
class Open:
    request_id: str
    session_id: str
    takeover: bool


@dataclass(frozen=True)
class Feed:
    request_id: str
    tokens: list[int]
    return_logprobs: bool
    top_logprobs: int


@dataclass(frozen=True)
class Generate:
    request_id: str
    spec: GenerateSpec


@dataclass(frozen=True)
class Cancel:
    request_id: str
    target: str


Command = Open | Feed | Generate | Cancel


@dataclass(frozen=True)
class Opened:
    request_id: str
    session: Session


@dataclass(frozen=True)
class InputClosed:
    """The client half-closed: no more commands."""


async def run_stream(
    engine, principal: Principal, commands: AsyncIterator[Command]
) -> AsyncIterator[Opened | Event]:
    """Attach to the session named by the first command, then serve the rest."""
    first = await anext(commands, None)
    if first is None:
        return
    if not isinstance(first, Open):
        raise InvalidArgument("the first message of a stream must be `open` with the session id")
    session, driver = engine.attach(principal, first.session_id, first.takeover)
    jobs: dict[str, Job] = {}
    reader: asyncio.Task | None = None
    try:  # from here on, however the call ends, the stream detaches
        await engine.runtime(session).scheduler.settle(session)  # a former stream's last step lands first
        reader = asyncio.get_running_loop().create_task(_read(engine, session, commands, driver.outbox, jobs))
        yield Opened(first.request_id, session)
        input_closed = False
        while not (input_closed and not jobs):
            event = await driver.outbox.get()
            if isinstance(event, ErrorEvent):
                raise event.error
            if isinstance(event, InputClosed):
                input_closed = True
                continue
            if isinstance(event, FinishedEvent):
                jobs.pop(event.request_id, None)
            yield event
    finally:
        if reader is not None:
            reader.cancel()
        for job in jobs.values():
            job.cancel()
        engine.detach(session, driver)


async def _read(
    engine, session: Session, commands: AsyncIterator[Command], outbox: Outbox, jobs: dict[str, Job]
) -> None:
    """Turn commands into jobs; any error ends the stream through the outbox."""
    try:
        async for command in commands:
            if isinstance(command, Open):
                raise InvalidArgument("this stream is already open; `open` must be its first message only")
            if isinstance(command, Cancel):
                if command.target in jobs:
                    jobs[command.target].cancel()
                    engine.runtime(session).scheduler.wake()
                continue
            if not command.request_id or command.request_id in jobs:
                raise InvalidArgument(
                    f"request_id must be non-empty and unique among open requests, got {command.request_id!r}"
                )
            if isinstance(command, Feed):
                job = Job(
                    command.request_id,
                    outbox,
                    feed=command.tokens,
                    return_logprobs=command.return_logprobs,
                    top_logprobs=command.top_logprobs,
                )
            else:
                job = Job(command.request_id, outbox, generate=command.spec)
            engine.submit(session, job)
            jobs[command.request_id] = job
        outbox.put(InputClosed())
    except asyncio.CancelledError:
        raise
    except Exception as e:  # bad input or a refused request: end the stream with it
        outbox.put(ErrorEvent(e))
