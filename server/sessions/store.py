"""Sessions: ids, ownership, time to live, capacity, and which stream drives each one.

A session id is 128 random bits (32 hex characters). A session belongs to the caller that
created it; to anyone else it does not exist. Idle sessions expire after their TTL (every
use renews it); an expired id is remembered for a while, so that a late call hears
'expired' rather than 'unknown'. One stream drives a session at a time.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from server.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from server.sessions.jobs import ErrorEvent, Job, Outbox

ID_PATTERN = re.compile(r"[0-9a-f]{32}")
EXPIRED_MEMORY = 100_000  # expired ids remembered, oldest forgotten first
HISTORY = 8192  # absorbed tokens kept per session, for clients that reconnect behind


@dataclass(eq=False)
class Driver:
    """The stream (Stream or Generate RPC) attached to a session; its events go to `outbox`."""

    outbox: Outbox

    def end(self, error: Exception) -> None:
        """End the stream with `error` (taken over, session deleted, server stopping)."""
        self.outbox.put(ErrorEvent(error))


@dataclass(eq=False)
class Session:
    id: str
    owner: str
    model: str
    version: str
    seed: int  # uint64, as the client gave or received it
    ttl: float  # seconds
    created_at: float  # unix time
    expires_at: float
    position: int = 0  # tokens absorbed and reported, <bos> included (event loop)
    # the step's view: the state holds `state_position` tokens; logits and history match it
    state_position: int = 0
    logits: np.ndarray | None = None  # [V] fp32, next-token logits (host memory)
    history: list[int] = field(default_factory=list)  # the last absorbed tokens (at most HISTORY)
    slot: int | None = None  # device pool slot, or None when the state is in host memory
    host_state: bytes | None = None  # the state while off the device (None: zero state)
    durable_position: int = 0  # how far the session would come back after a crash
    durable: bool = True  # False: a temporary session, never written to the state dir
    logged: bool = False  # the log (or a snapshot) knows the session exists
    life: int = 0  # restarts from position 0 (creation, resets): what a snapshot of it is taken in
    epoch: int = 0  # with a shared session store: the epoch this server holds it under (0: none)
    snapshot_key: tuple[int, int] | None = None  # (life, position) of its last snapshot
    replaying: bool = False  # its logged tokens are being fed again (after a restart)
    stranded: bool = False  # restored for a model version that is not loaded: only its data is kept
    pending_replay: list[int] = field(default_factory=list)  # a stranded session's logged, unapplied tokens
    jobs: deque[Job] = field(default_factory=deque)  # FIFO of this session's requests
    scheduled: bool = False  # in the scheduler's ready queue or in its running batch
    driver: Driver | None = None
    closed: bool = False

    @property
    def idle(self) -> bool:
        return not self.jobs and not self.scheduled

    @property
    def on_device(self) -> bool:
        return self.slot is not None

    def touch(self, now: float | None = None) -> None:
        self.expires_at = (now or time.time()) + self.ttl

    @property
    def unsnapshotted(self) -> int:
        """Tokens absorbed since its last snapshot (at least 1 if it has none of this life)."""
        if self.snapshot_key == (self.life, self.state_position):
            return 0
        if self.snapshot_key is None or self.snapshot_key[0] != self.life:
            return max(1, self.state_position)
        return max(1, self.state_position - self.snapshot_key[1])

    def remember(self, start: int, tokens: list[int]) -> None:
        """Step thread: the state absorbed `tokens` from position `start` (0: from the zero state)."""
        if start == 0:
            self.history = []
        self.history += tokens
        if len(self.history) > 2 * HISTORY:
            del self.history[:-HISTORY]
        self.state_position = start + len(tokens)

    def tokens_after(self, position: int) -> list[int]:
        """The tokens absorbed after `position`; OUT_OF_RANGE beyond the kept history."""
        kept = min(len(self.history), self.state_position)
        if not self.state_position - kept <= position <= self.state_position:
            raise OutOfRange(
                f"tokens after position {position} are not available: session {self.id} is at position "
                f"{self.state_position} and keeps its last {kept} tokens"
            )
        return self.history[len(self.history) - (self.state_position - position) :]


def expired(session_id: str, expired_at: float) -> NotFound:
    """The answer about a session that expired at `expired_at` (unix time)."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expired_at))
    return NotFound(f"session {session_id} expired at {when} (idle past its TTL); create a new one")


class SessionStore:
    def __init__(self, max_sessions: int, default_ttl: float, max_ttl: float) -> None:
        self.max_sessions = max_sessions
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self._sessions: dict[str, Session] = {}
        self._expired: OrderedDict[str, float] = OrderedDict()  # id -> unix time of expiry

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def ttl(self, requested: float | None) -> float:
        """The TTL for a new session: the default, or a requested one within (0, max]."""
        if requested is None:
            return self.default_ttl
        if not 0 < requested <= self.max_ttl:
            raise InvalidArgument(f"ttl must be in (0, {self.max_ttl:g}] seconds, got {requested:g}")
        return requested

    def new(
        self,
        owner: str,
        model: str,
        version: str,
        seed: int | None,
        ttl: float | None,
        owner_limit: int | None,
        session_id: str = "",
    ) -> Session:
        """Register a new session (its state is set up by the caller) under `session_id`, chosen
        by the client, or a random one."""
        if session_id:
            if not ID_PATTERN.fullmatch(session_id):
                raise InvalidArgument(
                    f"a chosen session id must be 32 lowercase hex characters, got {session_id[:40]!r}"
                )
            if session_id in self._sessions:
                raise AlreadyExists(f"session {session_id} already exists: choose another id")
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(
                f"the server holds its maximum of {self.max_sessions} sessions; delete idle ones or retry later",
                "capacity",
            )
        if owner_limit is not None and self.count(owner) >= owner_limit:
            raise ResourceExhausted(
                f"this API key already holds its maximum of {owner_limit} sessions; delete one first",
                "key_limit",
            )
        now = time.time()
        seed = secrets.randbits(64) if seed is None else seed
        session_id = session_id or secrets.token_hex(16)
        session = Session(session_id, owner, model, version, seed, self.ttl(ttl), now, now)
        session.touch(now)
        self._sessions[session.id] = session
        return session

    def restore(self, session: Session) -> None:
        """Register a session brought back from the state dir (capacity permitting or not)."""
        self._sessions[session.id] = session

    def get(self, session_id: str, owner: str) -> Session:
        """The caller's session; NOT_FOUND for unknown, foreign and expired ids alike (the
        message says 'expired' for the caller's expired ones)."""
        if not ID_PATTERN.fullmatch(session_id or ""):
            raise InvalidArgument(f"session_id must be 32 lowercase hex characters, got {session_id[:40]!r}")
        session = self._sessions.get(session_id)
        if session is not None and session.owner == owner:
            return session
        expired_at = self._expired.get(f"{owner}/{session_id}")
        if expired_at is not None:
            raise expired(session_id, expired_at)
        raise NotFound(f"session {session_id} not found")

    def find(self, session_id: str) -> Session | None:
        """The live session of that id, whoever owns it (no checks: for internal lookups)."""
        return self._sessions.get(session_id)

    def owned_by(self, owner: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.owner == owner]

    def running_on(self, version: str) -> list[Session]:
        """The sessions of a loaded model version (the stranded ones wait for theirs to return)."""
        return [s for s in self._sessions.values() if s.version == version and not s.stranded]

    def stranded(self) -> list[Session]:
        return [s for s in self._sessions.values() if s.stranded]

    def count(self, owner: str) -> int:
        return sum(1 for s in self._sessions.values() if s.owner == owner)

    def remove(self, session: Session, expired: bool = False) -> None:
        """Forget `session` (its slot is freed by the caller); remember expired ids."""
        session.closed = True
        self._sessions.pop(session.id, None)
        for job in session.jobs:
            job.cancel()
        if expired:
            self._expired[f"{session.owner}/{session.id}"] = time.time()
            while len(self._expired) > EXPIRED_MEMORY:
                self._expired.popitem(last=False)

    def due_to_expire(self, now: float) -> list[Session]:
        """Idle, undriven sessions past their expiry time."""
        return [
            s
            for s in self._sessions.values()
            if s.expires_at <= now and s.idle and s.driver is None and not s.stranded
        ]

    @staticmethod
    def attach(session: Session, driver: Driver, takeover: bool) -> None:
        """Make `driver` the one stream driving `session`; with takeover, end the old one."""
        old = session.driver
        if old is not None and old is not driver:
            if not takeover:
                raise FailedPrecondition(
                    f"session {session.id} is driven by another stream; close it first or set takeover to end it"
                )
            for job in session.jobs:
                job.cancel()
            old.end(
                Aborted(
                    f"session {session.id} was taken over by another stream at position {session.position}"
                )
            )
        session.driver = driver
        session.touch()

    @staticmethod
    def detach(session: Session, driver: Driver) -> None:
        if session.driver is driver:
            session.driver = None
            for job in session.jobs:
                if job.outbox is driver.outbox:
                    job.cancel()
            session.touch()
