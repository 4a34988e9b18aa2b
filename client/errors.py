"""The exceptions the client raises: every failed RPC becomes a `StatusError`."""

from __future__ import annotations

import grpc

STATUS_MARK = "lstm-serve-status"  # trailing metadata on every status the server itself sends


class LstmServeError(Exception):
    """Base class of the client's errors."""


class StatusError(LstmServeError):
    """An RPC ended with a non-OK gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str, from_server: bool = False) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.from_server = from_server
        """The status carries lstm-serve's mark: the server sent it, not a proxy or the transport."""

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> StatusError:
        """Wrap a grpc error (a sync `grpc.Call` or a `grpc.aio.AioRpcError`)."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        marked = any(key == STATUS_MARK for key, _ in trailing or ())
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", marked)

    @property
    def words(self) -> str:
        """The status in words, e.g. "not found"."""
        return self.code.name.lower().replace("_", " ")


class SessionClosedError(LstmServeError):
    """The session's stream is closed: call `resume()` (or `attach()`) to drive it again."""


class SessionDataLostError(LstmServeError):
    """`resume()` found the session back at a position before the tokens this handle holds:
    the tokens in between are lost (the server lost tokens it had reported durable, or this
    handle had to drop them). The session stays attached where the server has it."""

    def __init__(self, session_id: str, position: int, known_from: int, durable: int) -> None:
        super().__init__(
            f"session {session_id} came back at position {position}, but this handle only holds the tokens after "
            f"position {known_from} (the last durable position it heard of: {durable}): the tokens at positions "
            f"{position + 1}-{known_from} are lost; the session stays at position {position}"
        )
        self.session_id = session_id
        self.position = position
        self.known_from = known_from
        self.durable = durable
