"""Between protobuf messages and the engine's types, validating on the way in.

Every check raises InvalidArgument with a message that says what to fix.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NoReturn

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server import tokenizer
from server.api.streams import (
    Cancel,
    Classify,
    ClassifyCall,
    Command,
    Feed,
    Generate,
    GenerateCall,
    Open,
    Opened,
)
from server.config import ServeSettings
from server.errors import InvalidArgument
from server.ipc.messages import ModelInfo, SessionInfo
from server.sampling import SamplingParams
from server.sessions.jobs import (
    ClassificationEvent,
    FinishedEvent,
    FinishReason,
    GenerateSpec,
    TokenBatchEvent,
    TokenEvent,
)
from server.sessions.principal import Principal

ROUTE_KEY = "x-session-id"  # a router's hash key: the session a call is about (see the proto)
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20
FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.END_TOKEN: pb.FINISH_REASON_END_TOKEN,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.FED: pb.FINISH_REASON_FED,
}
CELLS = {"lstm": pb.CELL_LSTM, "rnn": pb.CELL_RNN}
LOCATIONS = {
    "device": pb.SESSION_LOCATION_DEVICE,
    "host": pb.SESSION_LOCATION_HOST,
    "store": pb.SESSION_LOCATION_STORE,
}


# ---- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Malformed:
    """A request refused by its deserializer: its bytes did not parse (bad UTF-8 in a string,
    a corrupt wire format), or there are more of them than a valid request can have."""

    error: str


def lenient(
    parse: Callable[[bytes], Message], max_prompt_tokens: int | None = None
) -> Callable[[bytes], Message | Malformed]:
    """A request deserializer that hands a parse failure to the servicer (grpc would answer
    UNKNOWN). With `max_prompt_tokens`, a message larger than any valid request with such a
    prompt is refused unparsed: a huge prompt costs no parsed copy, text or token list."""
    max_bytes = None if max_prompt_tokens is None else max_request_bytes(max_prompt_tokens)

    def deserialize(data: bytes) -> Message | Malformed:
        if max_bytes is not None and len(data) > max_bytes:
            return Malformed(
                f"the request message has {len(data)} bytes, more than any request with a prompt of at most "
                f"{max_prompt_tokens} tokens ({max_bytes} bytes): split the prompt into several feeds"
            )
        try:
            return parse(data)
        except DecodeError as e:
            return Malformed(f"the request message could not be parsed: {e}")

    return deserialize


def max_request_bytes(max_prompt_tokens: int) -> int:
    """The most bytes a valid Generate or Stream request message can have: a prompt of
    `max_prompt_tokens` UTF-8 bytes or token ids (under 3 bytes each, even unpacked), every
    stop sequence at 4 bytes a character, and room for the other fields."""
    return 3 * max_prompt_tokens + MAX_STOP_SEQUENCES * (4 * MAX_STOP_LENGTH + 8) + 64 * 1024


def parsed(request):
    """`request`, or INVALID_ARGUMENT if it was refused unparsed."""
    if isinstance(request, Malformed):
        raise InvalidArgument(request.error)
    return request


def ttl_seconds(request, field: str = "ttl") -> float | None:
    if not request.HasField(field):
        return None
    duration = getattr(request, field)
    return duration.seconds + duration.nanos / 1e9


def optional_seed(request) -> int | None:
    return request.seed if request.HasField("seed") else None


def input_tokens(message: pb.Input, settings: ServeSettings, what: str = "prompt") -> list[int]:
    """The token ids of an Input (text or ids), within the prompt limit.

    The length is checked before any token list is built: a text has at least one token (a
    UTF-8 byte) per character, exactly one when it is ASCII, so an oversized text is refused
    before it is encoded. (A message too large for any valid prompt never gets here: see
    `lenient`.)
    """
    limit = settings.max_prompt_tokens
    kind = message.WhichOneof("kind")
    if kind == "text":
        text = message.text
        if len(text) > limit:
            _too_long(what, len(text) if text.isascii() else f"at least {len(text)}", limit)
        tokens = tokenizer.encode(text)
    elif kind == "tokens":
        ids = message.tokens.ids
        if len(ids) > limit:
            _too_long(what, len(ids), limit)
        tokens = list(ids)
        bad = next((t for t in tokens if t >= tokenizer.VOCAB_SIZE), None)
        if bad is not None:
            raise InvalidArgument(
                f"{what} token id {bad} is out of range: ids are 0-{tokenizer.VOCAB_SIZE - 1}"
            )
    else:
        tokens = []
    if len(tokens) > limit:
        _too_long(what, len(tokens), limit)
    return tokens


def _too_long(what: str, tokens: int | str, limit: int) -> NoReturn:
    raise InvalidArgument(f"{what} has {tokens} tokens; the limit is {limit}: split it into several feeds")


def sampling(message: pb.SamplingOptions) -> SamplingParams:
    params = SamplingParams(
        temperature=message.temperature if message.HasField("temperature") else 1.0,
        top_k=message.top_k,
        top_p=message.top_p if message.HasField("top_p") else 1.0,
    )
    try:
        params.validate()
    except ValueError as e:
        raise InvalidArgument(str(e)) from e
    return params


def generate_spec(
    request: pb.GenerateRequest | pb.GenerateTokensRequest, settings: ServeSettings, principal: Principal
) -> GenerateSpec:
    """The generation part of a Generate request or a stream's generate command."""
    max_tokens = request.max_tokens
    limit = min(settings.max_new_tokens, principal.max_tokens_per_request or settings.max_new_tokens)
    if max_tokens > limit:
        raise InvalidArgument(
            f"max_tokens {max_tokens} is above this server's limit of {limit}; ask for at most {limit}"
        )
    stop = tuple(request.stop)
    if len(stop) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_LENGTH for s in stop):
        raise InvalidArgument(
            f"stop takes at most {MAX_STOP_SEQUENCES} non-empty sequences of at most {MAX_STOP_LENGTH} characters"
        )
    return GenerateSpec(
        max_tokens or limit,
        sampling(request.sampling),
        stop,
        request.ignore_eos,
        max(1, request.stream_interval),
    )


def generate_call(request: pb.GenerateRequest, settings: ServeSettings, principal: Principal) -> GenerateCall:
    """A Generate RPC's request: its prompt and generation, on a session or a temporary one."""
    if not request.session_id and not request.model:
        raise InvalidArgument("give session_id, or model for a temporary session")
    return GenerateCall(
        request.session_id,
        request.model,
        request.model_version,
        input_tokens(request.prompt, settings),
        generate_spec(request, settings, principal),
        optional_seed(request),
        request.takeover,
    )


def classify_call(request: pb.ClassifyRequest, settings: ServeSettings) -> ClassifyCall:
    """A Classify RPC's request: a non-empty text or token ids for a temporary session on a model."""
    if not request.model:
        raise InvalidArgument("give model: the classifier to ask (ListModels shows each model's heads)")
    tokens = input_tokens(request.input, settings, "input")
    if not tokens:
        raise InvalidArgument("input is empty: give the text (or token ids) to classify")
    return ClassifyCall(request.model, request.model_version, tokens)


def check_route(route: str | None, session_id: str) -> None:
    """INVALID_ARGUMENT when the routed session is not the one the request is about: a router
    would have sent the call to the wrong replica."""
    if route is not None and route != session_id:
        raise InvalidArgument(
            f"{ROUTE_KEY} metadata {route[:40]!r} does not name the session this request is about "
            f"({session_id[:40]!r}): send the same id in both"
        )


def stream_commands(
    requests: AsyncIterator[pb.StreamRequest],
    settings: ServeSettings,
    principal: Principal,
    route: str | None,
) -> AsyncIterator[Command]:
    """The stream's commands; its `open` must name the routed session, if any."""

    async def commands() -> AsyncIterator[Command]:
        async for request in requests:
            command = stream_command(request, settings, principal)
            if isinstance(command, Open):
                check_route(route, command.session_id)
            yield command

    return commands()


def stream_command(
    request: pb.StreamRequest | Malformed, settings: ServeSettings, principal: Principal
) -> Command:
    request = parsed(request)
    kind = request.WhichOneof("kind")
    rid = request.request_id
    if kind == "open":
        return Open(rid, request.open.session_id, request.open.takeover)
    if kind == "feed":
        feed = request.feed
        tokens = input_tokens(feed.input, settings, "feed input")
        if not tokens:
            raise InvalidArgument("feed input is empty: give text or token ids")
        if feed.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs is at most {MAX_TOP_LOGPROBS}, got {feed.top_logprobs}")
        return Feed(rid, tokens, feed.return_logprobs, feed.top_logprobs, feed.classify)
    if kind == "generate":
        return Generate(rid, generate_spec(request.generate, settings, principal))
    if kind == "cancel":
        return Cancel(rid, request.cancel.target_request_id)
    if kind == "classify":
        return Classify(rid)
    raise InvalidArgument("a stream request needs one of open, feed, generate, classify or cancel")


# ---- responses ----------------------------------------------------------------------------


def timestamp(unix: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix * 1e9))
    return ts


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def session_message(session: SessionInfo) -> pb.Session:
    return pb.Session(
        id=session.id,
        model=session.model,
        model_version=session.version,
        seed=session.seed,
        position=session.position,
        created_at=timestamp(session.created_at),
        expires_at=timestamp(session.expires_at),
        ttl=duration(session.ttl),
        location=LOCATIONS[session.location],
        attached=session.attached,
        durable_position=session.durable_position,
    )


def model_info(model: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=model.name,
        version=model.version,
        cell=CELLS[model.cell],
        layers=model.layers,
        hidden=model.hidden,
        vocab_size=model.vocab_size,
        backend=model.backend,
        device=model.device,
        dtype=model.dtype,
        heldout_bits_per_byte=model.heldout_bits_per_byte,
        heads=[pb.HeadInfo(name=head.name, labels=head.labels) for head in model.heads],
        bos_token=tokenizer.BOS,
        eos_token=tokenizer.EOS,
    )


def token_message(event: TokenEvent) -> pb.Token:
    return pb.Token(
        id=event.token,
        text=event.text,
        logprob=event.logprob,
        position=event.position,
        top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in event.top_logprobs],
        durable_position=event.durable_position,
    )


def finished_message(event: FinishedEvent) -> pb.Finished:
    return pb.Finished(
        reason=FINISH_REASONS[event.reason],
        fed_tokens=event.fed_tokens,
        generated_tokens=event.generated_tokens,
        position=event.position,
        durable_position=event.durable_position,
    )


def classification(event: ClassificationEvent) -> pb.Classification:
    heads = []
    for head in event.heads:
        labels = [
            pb.LabelProbability(label=name, probability=p) for name, p in zip(head.labels, head.probabilities)
        ]
        top = max(range(len(head.labels)), key=head.probabilities.__getitem__)
        heads.append(pb.HeadResult(name=head.name, labels=labels, top_label=head.labels[top]))
    return pb.Classification(heads=heads, position=event.position)


def token_batch(event: TokenBatchEvent) -> pb.TokenBatch:
    return pb.TokenBatch(tokens=[token_message(t) for t in event.tokens])


def generate_response(
    session: SessionInfo, event: TokenEvent | TokenBatchEvent | FinishedEvent
) -> pb.GenerateResponse:
    if isinstance(event, TokenEvent):
        return pb.GenerateResponse(token=token_message(event), session_id=session.id)
    if isinstance(event, TokenBatchEvent):
        return pb.GenerateResponse(tokens=token_batch(event), session_id=session.id)
    return pb.GenerateResponse(finished=finished_message(event), session_id=session.id)


def stream_response(
    event: Opened | TokenEvent | TokenBatchEvent | ClassificationEvent | FinishedEvent,
) -> pb.StreamResponse:
    if isinstance(event, Opened):
        return pb.StreamResponse(request_id=event.request_id, opened=session_message(event.session))
    if isinstance(event, TokenEvent):
        return pb.StreamResponse(request_id=event.request_id, token=token_message(event))
    if isinstance(event, TokenBatchEvent):
        return pb.StreamResponse(request_id=event.request_id, tokens=token_batch(event))
    if isinstance(event, ClassificationEvent):
        return pb.StreamResponse(request_id=event.request_id, classification=classification(event))
    return pb.StreamResponse(request_id=event.request_id, finished=finished_message(event))
