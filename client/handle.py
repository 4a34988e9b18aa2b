"""What the sync and asyncio session handles share: the session's id, the server's last view
of it, and the history of tokens that `resume()` reconciles with."""

from __future__ import annotations

from typing import Protocol

from client.history import TokenHistory
from client.messages import SessionInfo


class _Attachment(Protocol):
    @property
    def ended(self) -> bool: ...


class SessionHandle:
    """The state of a handle on one server-side session (`Session`, `AsyncSession`)."""

    def __init__(self, session: SessionInfo | str, *, keep: bool) -> None:
        self.info: SessionInfo | None = session if isinstance(session, SessionInfo) else None
        """The server's view of the session, as last received."""
        self.id: str = session.id if isinstance(session, SessionInfo) else session
        self.keep = keep
        """Whether `close()` leaves the session on the server."""
        self._history = TokenHistory(self.info)
        self._attachment: _Attachment | None = None

    @property
    def position(self) -> int:
        """Tokens absorbed, as of the last event received (0 if none yet)."""
        return self._history.position

    @property
    def durable_position(self) -> int:
        """The furthest durable position heard of: the session would come back at least there
        after a server crash (0: none heard; a server without a write-ahead log reports none)."""
        return self._history.durable

    @property
    def attached(self) -> bool:
        return self._attachment is not None and not self._attachment.ended

    def _set_info(self, info: SessionInfo) -> SessionInfo:
        self.info = info
        self._history.report(info)
        return info
