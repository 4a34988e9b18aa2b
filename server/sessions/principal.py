"""Who owns a session, and the limits their API key sets (server/api/auth.py finds them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    name: str
    max_sessions: int | None = None
    max_tokens_per_request: int | None = None
    max_queued_requests: int | None = None  # per session, below the server's own cap


ANONYMOUS = Principal("anonymous")
