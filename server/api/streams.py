"""The bidirectional Stream protocol on one session, in the front end; Generate is a stream of one.

The first command attaches (`Open`); after it, feed and generate commands become requests on
the session in the engine core, processed in order, and `Cancel` stops one at its next step.
Commands are read concurrently with the events being written, so a cancel reaches a running
generation. When the client half-closes, the stream ends once its requests are finished;
however it ends, the engine detaches it (cancelling what is left).

The unary-request Generate RPC runs the same path: an `Open` and one `Generate` carrying the
prompt, on the named session or on a temporary one that ends with the call; so does Classify,
on a temporary session that absorbs the text and answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from server.api.engine_client import EngineClient, LocalError, RemoteStream
from server.errors import Aborted, InvalidArgument
from server.ipc import messages as m
from server.sessions.jobs import ClassificationEvent, Event, FinishedEvent, GenerateSpec
from server.sessions.principal import Principal


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
    classify: bool = False  # a classification once absorbed


@dataclass(frozen=True)
class Classify:
    """The heads' answer for what the session has absorbed so far."""

    request_id: str


@dataclass(frozen=True)
class Generate:
    request_id: str
    spec: GenerateSpec
    prompt: list[int] = field(default_factory=list)  # fed first (the Generate RPC's prompt)


@dataclass(frozen=True)
class Cancel:
    request_id: str
    target: str


Command = Open | Feed | Generate | Classify | Cancel


@dataclass(frozen=True)
class Opened:
    request_id: str
    session: m.SessionInfo


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


@dataclass(frozen=True)
class ClassifyCall:
    """A Classify RPC: a text for a temporary session on a model."""

    model: str
    version: str
    tokens: list[int]


GENERATE_REQUEST_ID = "generate"


async def run_generate(
    engine: EngineClient, principal: Principal, call: GenerateCall
) -> AsyncIterator[Opened | Event]:
    """Generate as a stream of one command; a temporary session is deleted when it ends."""
    temporary = None
    if not call.session_id:
        reply = await engine.call(
            lambda c: m.CreateSession(c, principal, call.model, call.version, call.seed, None, durable=False)
        )
        temporary = reply.session
    elif call.seed is not None:
        raise InvalidArgument(
            "seed applies to temporary sessions only; a session keeps the seed it was created with"
        )
    elif call.model:
        running = (await engine.call(lambda c: m.GetSession(c, principal, call.session_id))).session.model
        if call.model != running:
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
        if temporary is not None and not engine.lost.done():
            engine.send(m.EndTemporary(principal, temporary.id))


async def run_classify(
    engine: EngineClient, principal: Principal, call: ClassifyCall
) -> tuple[str, ClassificationEvent]:
    """(model, answer): a temporary session absorbs the text, is classified, and ends."""
    reply = await engine.call(
        lambda c: m.CreateSession(c, principal, call.model, call.version, None, None, durable=False)
    )
    temporary = reply.session

    async def commands() -> AsyncIterator[Command]:
        yield Open(GENERATE_REQUEST_ID, temporary.id, False)
        yield Feed(GENERATE_REQUEST_ID, call.tokens, False, 0, classify=True)

    try:
        async with aclosing(run_stream(engine, principal, commands())) as events:
            async for event in events:
                if isinstance(event, ClassificationEvent):
                    return temporary.model, event
    finally:
        if not engine.lost.done():
            engine.send(m.EndTemporary(principal, temporary.id))
    raise Aborted("the classify request ended before its answer (the server is stopping); retry it")


async def run_stream(
    engine: EngineClient, principal: Principal, commands: AsyncIterator[Command]
) -> AsyncIterator[Opened | Event]:
    """Attach to the session named by the first command, then serve the rest."""
    first = await anext(commands, None)
    if first is None:
        return
    if not isinstance(first, Open):
        raise InvalidArgument("the first message of a stream must be `open` with the session id")
    stream = engine.open_stream(principal, first.session_id, first.takeover)
    requests: set[str] = set()  # sent and not finished
    reader: asyncio.Task | None = None
    try:  # from here on, however the call ends, the stream detaches
        session = await stream.opened()
        reader = asyncio.get_running_loop().create_task(_read(stream, commands, requests))
        yield Opened(first.request_id, session)
        input_closed = False
        async for event in stream.events():
            if isinstance(event, InputClosed):
                input_closed = True
            else:
                if isinstance(event, FinishedEvent):
                    requests.discard(event.request_id)
                yield event
            if input_closed and not requests:
                break
    finally:
        if reader is not None:
            reader.cancel()
        stream.close()


async def _read(stream: RemoteStream, commands: AsyncIterator[Command], requests: set[str]) -> None:
    """Send commands to the engine as requests; a bad one ends the stream."""
    try:
        async for command in commands:
            if isinstance(command, Open):
                raise InvalidArgument("this stream is already open; `open` must be its first message only")
            if isinstance(command, Cancel):
                if command.target in requests:
                    stream.cancel(command.target)
                continue
            if not command.request_id or command.request_id in requests:
                raise InvalidArgument(
                    f"request_id must be non-empty and unique among open requests, got {command.request_id!r}"
                )
            if isinstance(command, Feed):
                stream.submit(
                    command.request_id,
                    command.tokens,
                    None,
                    command.return_logprobs,
                    command.top_logprobs,
                    command.classify,
                )
            elif isinstance(command, Classify):
                stream.submit(command.request_id, [], None, classify=True)
            else:
                stream.submit(command.request_id, list(command.prompt), command.spec, False, 0)
            requests.add(command.request_id)
        stream.deliver(InputClosed())
    except asyncio.CancelledError:
        raise
    except Exception as e:  # bad input: end the stream with it
        stream.deliver(LocalError(e))
