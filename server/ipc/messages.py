"""The messages of the engine core protocol, one struct each (MessagePack arrays, tagged).

Front end -> engine core: the session operations (a `call` id each, answered by a `Reply`),
and the stream commands (a `stream` id each: Open, Submit, Cancel, Credit, Close).
Engine core -> front end: replies, each stream's events as the scheduler produces them,
health, the loaded models, and the end of shutdown. Every struct here is plain data: a
session crosses as SessionInfo, an error as WireError (its gRPC code name and message).
"""

from __future__ import annotations

from msgspec import Struct

from server import errors
from server.sessions.jobs import ClassificationEvent, FinishedEvent, GenerateSpec, TokenBatchEvent, TokenEvent
from server.sessions.principal import Principal


class Message(Struct, tag=True, array_like=True):
    """Base of every message: encoded as [tag, fields...]."""


# ---- plain data ----------------------------------------------------------------------------


class SessionInfo(Struct, array_like=True):
    """What the API reports about a session."""

    id: str
    model: str
    version: str
    seed: int
    position: int
    created_at: float  # unix time
    expires_at: float
    ttl: float  # seconds
    location: str  # "device", "host", or "store" (held by another replica, or by none)
    attached: bool
    durable_position: int


class HeadInfo(Struct, array_like=True):
    name: str
    labels: tuple[str, ...]


class ModelInfo(Struct, array_like=True):
    """A loaded model version, as ListModels describes it."""

    name: str
    version: str
    cell: str
    layers: int
    hidden: int
    vocab_size: int
    backend: str
    device: str
    dtype: str
    heldout_bits_per_byte: float  # 0 when unknown
    heads: list[HeadInfo] = []  # classification heads


ERRORS = {cls.code: cls for cls in errors.ServeError.__subclasses__()}


class WireError(Struct, array_like=True):
    """A ServeError across the boundary (any other exception crosses as INTERNAL)."""

    code: str
    message: str
    reason: str = ""  # RESOURCE_EXHAUSTED's metric label

    @classmethod
    def of(cls, error: Exception) -> WireError:
        if isinstance(error, errors.ServeError):
            return cls(error.code, str(error), getattr(error, "reason", ""))
        return cls(
            "INTERNAL", f"internal error in the engine core ({type(error).__name__}); its log has details"
        )

    def exception(self) -> errors.ServeError:
        kind = ERRORS.get(self.code, errors.ServeError)
        return kind(self.message, self.reason) if kind is errors.ResourceExhausted else kind(self.message)


# ---- front end -> engine core: session operations -------------------------------------------


class Start(Message):
    """The first message: the settings the engine core runs with (ServeSettings as JSON), and
    where the other front ends connect (with --frontends K > 1)."""

    settings: str
    frontends_socket: str = ""


class CreateSession(Message):
    call: int
    principal: Principal
    model: str
    version: str
    seed: int | None
    ttl: float | None
    durable: bool = True  # False: a Generate call's temporary session
    session_id: str = ""  # chosen by the client


class GetSession(Message):
    call: int
    principal: Principal
    session_id: str
    tokens_after: int | None = None


class ListSessions(Message):
    call: int
    principal: Principal


class DeleteSession(Message):
    call: int
    principal: Principal
    session_id: str


class ResetSession(Message):
    call: int
    principal: Principal
    session_id: str


class ForkSession(Message):
    call: int
    principal: Principal
    session_id: str
    seed: int | None
    ttl: float | None
    new_session_id: str = ""  # chosen by the client


class ExportSession(Message):
    call: int
    principal: Principal
    session_id: str


class ImportSession(Message):
    call: int
    principal: Principal
    blob: bytes
    ttl: float | None
    session_id: str = ""  # chosen by the client


class EndTemporary(Message):
    """A Generate call's temporary session, at the end of the call (no reply)."""

    principal: Principal
    session_id: str


SessionCall = (
    CreateSession | GetSession | ListSessions | DeleteSession | ResetSession | ForkSession | ExportSession
) | ImportSession


# ---- front end -> engine core: streams ------------------------------------------------------


class Open(Message):
    """Attach a new stream to a session; answered by Opened or StreamFailed."""

    stream: int
    principal: Principal
    session_id: str
    takeover: bool


class Submit(Message):
    """A feed and/or generate request on the stream's session."""

    stream: int
    request_id: str
    feed: list[int]
    generate: GenerateSpec | None
    return_logprobs: bool = False
    top_logprobs: int = 0
    classify: bool = False  # a classification once the input (if any) is absorbed


class Cancel(Message):
    stream: int
    request_id: str


class Credit(Message):
    """The front end handed `events` more of the stream's events to grpc: room for as many."""

    stream: int
    events: int


class Close(Message):
    """The stream ended (its RPC finished or went away): detach, cancelling its requests."""

    stream: int


class Reload(Message):
    """SIGHUP: rescan the models directory."""


class Shutdown(Message):
    """End every stream with UNAVAILABLE, save every session, and exit (answered by Stopped)."""


ToEngine = (
    Start
    | CreateSession
    | GetSession
    | ListSessions
    | DeleteSession
    | ResetSession
    | ForkSession
    | ExportSession
    | ImportSession
    | EndTemporary
    | Open
    | Submit
    | Cancel
    | Credit
    | Close
    | Reload
    | Shutdown
)


# ---- engine core -> front end ---------------------------------------------------------------


class Reply(Message):
    """The answer to a session operation: what it returns, or its error."""

    call: int
    session: SessionInfo | None = None
    sessions: list[SessionInfo] = []
    tokens: list[int] = []
    blob: bytes = b""
    error: WireError | None = None


class Opened(Message):
    stream: int
    session: SessionInfo


class StreamEvent(Message):
    stream: int
    event: TokenEvent | TokenBatchEvent | ClassificationEvent | FinishedEvent


class StreamFailed(Message):
    """Ends the stream with an error (refused request, session deleted, taken over, shutdown)."""

    stream: int
    error: WireError


class Started(Message):
    """The engine core holds its state dir: the front end may bind its ports."""


class Refused(Message):
    """The engine core cannot start (its state dir is in use or unusable): the message says why."""

    reason: str


class Ready(Message):
    """Models loaded and sessions restored: the server may report SERVING (if `serving`)."""

    models: list[ModelInfo]
    serving: bool


class Models(Message):
    """The loaded models changed (SIGHUP)."""

    models: list[ModelInfo]


class Health(Message):
    """The state dir refused writes (False) or takes them again (True)."""

    serving: bool


class Stopped(Message):
    """Shutdown finished: every session saved."""


ToFrontEnd = (
    Reply | Opened | StreamEvent | StreamFailed | Started | Refused | Ready | Models | Health | Stopped
)
