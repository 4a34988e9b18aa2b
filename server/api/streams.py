"""The bidirectional Stream protocol on one session, below grpc; Generate is a stream of one.

The first command attaches (`Open`); after it, feed and generate commands become jobs on the
session, processed in order, and `Cancel` stops one at its next step. Commands are read
concurrently with the events being written, so a cancel reaches a running generation. When
the client half-closes, the stream ends once its requests are finished.

The unary-request Generate RPC runs the same path: an `Open` and one `Generate` carrying the
prompt, on the named session or on a temporary one that ends with the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from server.engine.core import Engine
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
    prompt: list[int] = field(default_factory=list)  # fed first (the Generate RPC's prompt)


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


@dataclass(frozen=True)
class GenerateCall:
    """A Generate RPC: a prompt and a generation on a session, or on a temporary one (no session_id)."""

    session_id: str
    model: str
    version: str
    prompt: list[int]
    spec: GenerateSpec
    seed: int | None  # temporary sessions only
    takeover: bool


GENERATE_REQUEST_ID = "generate"


async def run_generate(
    engine: Engine, principal: Principal, call: GenerateCall
) -> AsyncIterator[Opened | Event]:
    """Generate as a stream of one command; a temporary session is deleted when it ends."""
    temporary = None
    if not call.session_id:
        temporary = await engine.create_session(
            principal, call.model, call.version, call.seed, None, durable=False
        )
    elif call.seed is not None:
        raise InvalidArgument(
            "seed applies to temporary sessions only; a session keeps the seed it was created with"
        )
    elif call.model and call.model != (running := engine.get_session(principal, call.session_id).model):
        raise InvalidArgument(
            f"session {call.session_id} runs model {running!r}, not {call.model!r}: omit model, or give {running!r}"
        )

    async def commands() -> AsyncIterator[Command]:
        yield Open(GENERATE_REQUEST_ID, call.session_id or temporary.id, call.takeover)
        yield Generate(GENERATE_REQUEST_ID, call.spec, call.prompt)

    try:
        async with aclosing(run_stream(engine, principal, commands())) as events:  # detached before the end
            async for event in events:
                yield event
    finally:
        if temporary is not None:
            engine.end_temporary(temporary)


async def run_stream(
    engine: Engine, principal: Principal, commands: AsyncIterator[Command]
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
        await engine.settle(session)  # a former stream's last step lands first
        reader = asyncio.get_running_loop().create_task(_read(engine, session, commands, driver.outbox, jobs))
        yield Opened(first.request_id, session)
        input_closed = False
        async for event in driver.outbox.events():
            if isinstance(event, InputClosed):
                input_closed = True
            else:
                if isinstance(event, FinishedEvent):
                    jobs.pop(event.request_id, None)
                yield event
            if input_closed and not jobs:
                break
    finally:
        if reader is not None:
            reader.cancel()
        for job in jobs.values():
            job.cancel()
        engine.detach(session, driver)


async def _read(
    engine: Engine, session: Session, commands: AsyncIterator[Command], outbox: Outbox, jobs: dict[str, Job]
) -> None:
    """Turn commands into jobs; any error ends the stream through the outbox."""
    try:
        async for command in commands:
            if isinstance(command, Open):
                raise InvalidArgument("this stream is already open; `open` must be its first message only")
            if isinstance(command, Cancel):
                if command.target in jobs:
                    engine.cancel(session, jobs[command.target])
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
                job = Job(command.request_id, outbox, feed=list(command.prompt), generate=command.spec)
            engine.submit(session, job)
            jobs[command.request_id] = job
        outbox.put(InputClosed())
    except asyncio.CancelledError:
        raise
    except Exception as e:  # bad input or a refused request: end the stream with it
        outbox.put(ErrorEvent(e))
