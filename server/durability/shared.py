"""Durable sessions in Redis (--session-store redis://HOST:PORT/DB), shared by every replica.

The same rules as the state dir's log mode (state_dir.py), with Redis for the disk: every
iteration's absorbed tokens are queued before its step and a session's durable position
moves once Redis acknowledged them; snapshots bound the replay; a write Redis refuses stops
the steps (UNAVAILABLE, NOT_SERVING) until it accepts writes again. What is new is
ownership: each write carries the epoch the session is held under (redis_log.py), and a
session is restored on demand, on the replica that receives a call for it
(server/engine/ownership.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

from server.durability.journal import decode_body, tokens_body
from server.durability.redis_log import RedisSessions, RedisWriter, Stored, TakenOver, Write, unreachable
from server.durability.restore import Restored, extend, from_snapshot
from server.durability.state_dir import Marks, Snapshot, StateDirError, snapshot_bytes
from server.errors import Unavailable
from server.sessions.store import Session

log = logging.getLogger(__name__)
# a session is snapshotted once it moved this many tokens: a takeover replays at most about that
SNAPSHOT_TOKENS = 256


def meta_json(session: Session) -> str:
    return json.dumps(
        {
            "id": session.id,
            "owner": session.owner,
            "model": session.model,
            "version": session.version,
            "seed": session.seed,
            "ttl": session.ttl,
            "created_at": session.created_at,
        },
        separators=(",", ":"),
    )


def restored_from(taken: TakenOver) -> Restored:
    """A session as Redis holds it: its snapshot (or its creation) plus its logged records."""
    if taken.snapshot:
        found = from_snapshot(taken.snapshot)
    else:
        found = Restored(dict(taken.meta))
    found.meta["remaining_ttl"] = taken.remaining_ttl
    for body in taken.records:
        extend(found, decode_body(body))
    return found


class SharedDurability:
    """state_dir.Durability's interface over Redis, plus the ownership operations."""

    mode = "log"  # every absorbed token is recorded

    def __init__(
        self,
        url: str,
        snapshot_interval: float,
        on_error: Callable[[str, Exception], None] = lambda operation, error: None,
        on_health: Callable[[bool], None] = lambda healthy: None,
        on_fenced: Callable[[set[str]], None] = lambda session_ids: None,
    ) -> None:
        self.snapshot_interval = snapshot_interval
        self.snapshot_tokens = SNAPSHOT_TOKENS
        self.sessions = RedisSessions(url)
        try:
            self.sessions.check()
        except Exception as e:
            raise StateDirError(f"--session-store {url} cannot be reached: {e}; start Redis first") from e
        self._on_error, self._on_health = on_error, on_health
        self._marks = Marks()
        self.writer = RedisWriter(
            self.sessions, self._marks.durable, on_fenced, self._failed, self._recovered
        )

    def _failed(self, error: Exception) -> None:
        log.error(
            "session store %s failed: %s; refusing new steps until it accepts writes",
            self.sessions.url,
            error,
        )
        self._on_error("write", error)
        self._on_health(False)

    def _recovered(self) -> None:
        log.warning("session store %s accepts writes again; serving", self.sessions.url)
        self._on_health(True)

    def _write(self, session: Session, op: str, payload: bytes = b"") -> Write:
        meta = "" if session.logged else meta_json(session)
        return Write(op, session.id, session.owner, session.epoch, int(session.ttl * 1000), payload, meta)

    # ---- the hooks of state_dir.Durability -----------------------------------------------------

    def record(self, entries: list[tuple[Session, int, list[int]]]) -> None:
        """Before the step: queue (session, start, tokens) of one iteration; UNAVAILABLE (the
        step must not run) while Redis cannot be written."""
        entries = [e for e in entries if e[0].durable]
        if not entries:
            return
        writes, marks = [], []
        for session, start, tokens in entries:
            life = session.life + 1 if start == 0 else session.life  # a start from zero is a new life
            writes.append(self._write(session, "append", tokens_body(session.id, start, tokens, life)))
            marks.append((session, life, start + len(tokens)))
        self.writer.append(writes, marks)
        self._marks.recorded(entries)

    def deleted(self, session: Session, expired: bool = False) -> None:
        """A session ended (expiry, a failed creation): best effort. An expired one stays known
        as expired to every replica (redis_scripts.INDEX)."""
        if session.durable and session.epoch:
            try:
                self.writer.append([self._write(session, "expire" if expired else "delete")], [])
            except Unavailable as e:
                log.warning(
                    "session %s: its deletion is not in the store (%s); it expires there", session.id, e
                )

    async def delete(self, session: Session, end: Callable[[], None]) -> None:
        """DeleteSession: returns once Redis has the deletion."""
        if not session.durable or not session.epoch:
            end()
            return
        self.writer.append([self._write(session, "delete")], [])
        session.epoch = 0  # `end` need not delete it again
        end()
        try:
            await asyncio.to_thread(self.writer.flush)
        except Unavailable as e:
            raise Unavailable(
                f"session {session.id} is deleted on this server, but the session store has not acknowledged it "
                f"({e}); the server writes it once Redis accepts writes"
            ) from e

    def snapshot(self, session: Session, state: bytes | None) -> None:
        """A new fork or import, written now (its past is in no log); UNAVAILABLE if it cannot be."""
        if not session.durable:
            return
        data = snapshot_bytes(session, state, time.time())
        self.writer.append([self._write(session, "snapshot", data)], [])
        self.writer.flush()
        session.snapshot_key = (session.life, session.state_position)
        session.durable_position, session.logged = session.state_position, True

    # ---- checkpoints: the snapshot is queued when it is taken, behind the records it covers ----

    def begin_checkpoint(self) -> int | None:
        return None if self.writer.failure is not None else 0

    def end_checkpoint(self, old_segment: int) -> None:
        pass

    def snapshots_of(
        self, sessions: list[Session], state_of: Callable[[Session], bytes | None], min_moved: int
    ) -> list[Snapshot]:
        """Between iterations: snapshots of the sessions that moved, queued at once, so that each
        follows exactly the records it covers (its write drops the session's log). On the
        periodic checkpoint (min_moved 1) the others' keys get their expiry pushed back: a
        session held here, idle under an attached stream, must not expire in Redis."""
        now, taken, touches = time.time(), [], []
        for s in sessions:
            if not s.durable or not s.epoch or s.replaying:
                continue
            if s.unsnapshotted < min_moved:
                if min_moved == 1:
                    touches.append(self._write(s, "touch"))
                continue
            data = snapshot_bytes(s, state_of(s), now)
            try:
                self.writer.append([self._write(s, "snapshot", data)], [])
            except Unavailable:
                return taken  # no snapshots while Redis refuses writes; the log keeps everything
            s.logged = True
            taken.append(Snapshot(s, (s.life, s.state_position), data))
        if touches:
            with contextlib.suppress(Unavailable):
                self.writer.append(touches, [])
        return taken

    def write_snapshots(self, taken: list[Snapshot]) -> None:
        """Wait until the queued snapshots are acknowledged; OSError if Redis refused them."""
        try:
            self.writer.flush()
        except Unavailable as e:
            self._on_error("snapshot", e)
            raise OSError(str(e)) from e
        for snapshot in taken:
            snapshot.session.snapshot_key = snapshot.key

    def close(self, snapshots_written: bool) -> None:
        try:
            self.writer.close()
        except Unavailable as e:
            log.error("session store: writes still queued at shutdown are lost: %s", e)

    def recover(self) -> tuple[dict[str, Restored], list[str]]:
        """Nothing at start: each replica restores a session when a call for it arrives."""
        return {}, []

    # ---- ownership ------------------------------------------------------------------------------

    def claim(self, session_id: str) -> bool:
        try:
            return self.sessions.claim(session_id)
        except Exception as e:
            raise unreachable(self.sessions.url, e) from e

    def epoch_of(self, session_id: str) -> int | None:
        try:
            return self.sessions.epoch_of(session_id)
        except Exception as e:
            raise unreachable(self.sessions.url, e) from e

    def expired_at(self, session_id: str, owner: str) -> float | None:
        try:
            return self.sessions.expired_at(session_id, owner)
        except Exception as e:
            raise unreachable(self.sessions.url, e) from e

    def list(self, owner: str) -> list[Stored]:
        try:
            return self.sessions.list(owner)
        except Exception as e:
            raise unreachable(self.sessions.url, e) from e

    def take_over(self, session_id: str, owner: str) -> tuple[Restored, int] | None:
        try:
            taken = self.sessions.take_over(session_id, owner)
        except Exception as e:
            raise unreachable(self.sessions.url, e) from e
        return None if taken is None else (restored_from(taken), taken.epoch)
