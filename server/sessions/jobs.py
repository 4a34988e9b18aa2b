"""A job is one feed and/or generate request on one session; its events go to an outbox.

A job first absorbs its input tokens (feed), then, if asked, generates: each generated token
is sampled from the session's next-token logits, absorbed, and only then reported. Events
carry the position after the token. The scheduler drives jobs; the RPC handler reads the
outbox. Nothing here touches tensors of the pool or grpc. Events are msgspec structs: the
engine core sends them to the gRPC front end as they are (server/ipc).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec

from server import tokenizer
from server.sampling import SamplingParams


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    END_TOKEN = "end_token"
    CANCELLED = "cancelled"
    FED = "fed"


class TokenEvent(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    token: int
    text: str
    logprob: float
    position: int
    durable_position: int = 0
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # generated tokens: seconds since the request arrived (the first) or since the previous one
    latency: float | None = None
    first: bool = False


class FinishedEvent(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    reason: FinishReason
    fed_tokens: int
    generated_tokens: int
    position: int
    durable_position: int = 0


class TokenBatchEvent(msgspec.Struct, tag=True, array_like=True):
    """A generate request's tokens, several per message (stream_interval > 1)."""

    request_id: str
    tokens: list[TokenEvent]


class HeadProbabilities(msgspec.Struct, array_like=True):
    """One classification head's answer: its labels' probabilities, in its label order."""

    name: str
    labels: tuple[str, ...]
    probabilities: list[float]


class ClassificationEvent(msgspec.Struct, tag=True, array_like=True):
    """Every head's answer for the session's first `position` tokens (its state not changed)."""

    request_id: str
    heads: list[HeadProbabilities]
    position: int
    latency: float  # seconds since the request arrived


@dataclass(frozen=True)
class ErrorEvent:
    """Ends the stream with an error (the session was deleted, expired or taken over)."""

    error: Exception


Event = TokenEvent | TokenBatchEvent | ClassificationEvent | FinishedEvent | ErrorEvent


class Outbox:
    """Events on their way to one RPC. The scheduler pauses a job whose outbox is full, so a
    client that stops reading stops its session a few tokens past what it was sent."""

    def __init__(self, limit: int = 8, on_drain: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._on_drain = on_drain

    def put(self, event: Event) -> None:
        self._queue.put_nowait(event)

    def has_room(self) -> bool:
        return self._queue.qsize() < self.limit

    async def events(self) -> AsyncIterator[Event]:
        """The events as they come, for as long as the reader wants them; an ErrorEvent is
        raised as its error. The one place where events are read."""
        while True:
            event = await self._queue.get()
            if self._queue.qsize() == self.limit - 1:
                self._on_drain()  # the scheduler may run this job again
            if isinstance(event, ErrorEvent):
                raise event.error
            yield event


@dataclass(frozen=True)
class GenerateSpec:
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = (
        False  # <eos> is absorbed like any token; only max_tokens or a stop sequence ends the job
    )
    stream_interval: int = 1  # generated tokens per event: N > 1 sends TokenBatchEvents


@dataclass(eq=False)
class Job:
    request_id: str
    outbox: Outbox
    feed: list[int] = field(default_factory=list)
    generate: GenerateSpec | None = None
    return_logprobs: bool = False  # a TokenEvent per fed token
    top_logprobs: int = 0
    classify: bool = False  # a ClassificationEvent once the input is absorbed (no generation then)
    reset: bool = False  # zero the session's state first (creation, ResetSession)
    replay: bool = False  # logged tokens fed again after a restart: not logged a second time
    fed: int = 0
    generated: int = 0
    cancelled: bool = False
    done: bool = False
    created_at: float = field(default_factory=time.perf_counter)
    submitted_at: float | None = None  # when the scheduler queued it (perf_counter), for the queue wait
    _last_token_at: float | None = None
    _decoder: tokenizer.IncrementalDecoder = field(default_factory=tokenizer.IncrementalDecoder)
    _text_tail: str = ""  # the end of the generated text, long enough to match stop sequences
    _unsent: list[TokenEvent] = field(default_factory=list)  # generated, waiting for stream_interval

    @property
    def feeding(self) -> bool:
        return self.fed < len(self.feed)

    @property
    def starts_over(self) -> bool:
        """A reset job that has fed nothing yet: it runs from position 0 and the zero state."""
        return self.reset and self.fed == 0

    def feed_chunk(self, limit: int) -> list[int]:
        """The next input tokens to absorb, at most `limit`."""
        return self.feed[self.fed : self.fed + limit]

    def cancel(self) -> None:
        self.cancelled = True

    def fail(self, error: Exception) -> None:
        """End with an error that ends the stream too (the state dir refused its tokens)."""
        if not self.done:
            self.cancelled = self.done = True
            self.outbox.put(ErrorEvent(error))

    def abort(self) -> None:
        """Stop without a finished event: the stream itself ends (the server is stopping)."""
        self.cancelled = self.done = True

    def absorbed(self, token: int, logprob: float, position: int, top: tuple = (), durable: int = 0) -> None:
        """Record one absorbed token (fed or generated) and report it; finish when complete."""
        text = self._decoder.push(token)
        if self.feeding:
            self.fed += 1
            if self.return_logprobs:
                self.outbox.put(TokenEvent(self.request_id, token, text, logprob, position, durable, top))
            if not self.feeding and self.generate is None and not self.classify:
                self.finish(FinishReason.FED, position, durable)
            return
        self.generated += 1
        now = time.perf_counter()
        latency = now - (self._last_token_at or self.created_at)
        self._last_token_at = now
        event = TokenEvent(
            self.request_id, token, text, logprob, position, durable, (), latency, self.generated == 1
        )
        if self.generate.stream_interval <= 1:
            self.outbox.put(event)
        else:
            self._unsent.append(event)
            if len(self._unsent) == self.generate.stream_interval:
                self._send_unsent()
        reason = self._finish_reason(token, text)
        if reason is not None:
            self.finish(reason, position, durable)

    def classified(self, heads: list[HeadProbabilities], position: int, durable: int = 0) -> None:
        """Report the heads' answer for the state after the input, and finish."""
        latency = time.perf_counter() - self.created_at
        self.outbox.put(ClassificationEvent(self.request_id, heads, position, latency))
        self.finish(FinishReason.FED, position, durable)

    def _finish_reason(self, token: int, text: str) -> FinishReason | None:
        spec = self.generate
        if token == tokenizer.EOS and not spec.ignore_eos:
            return FinishReason.END_TOKEN
        if spec.stop:
            self._text_tail = (self._text_tail + text)[-max(map(len, spec.stop)) * 2 :]
            if any(self._text_tail.endswith(s) for s in spec.stop):
                return FinishReason.STOP_SEQUENCE
        if self.generated >= spec.max_tokens:
            return FinishReason.LENGTH
        return None

    def _send_unsent(self) -> None:
        if self._unsent:
            self.outbox.put(TokenBatchEvent(self.request_id, self._unsent))
            self._unsent = []

    def finish(self, reason: FinishReason, position: int, durable: int = 0) -> None:
        if not self.done:
            self.done = True
            self._send_unsent()
            self.outbox.put(
                FinishedEvent(self.request_id, reason, self.fed, self.generated, position, durable)
            )
