"""Durable sessions in --state-dir: snapshots, and a write-ahead log of absorbed tokens.

    state_dir/lock                 held (flock) by the one server using the directory
    state_dir/sessions/<id>.snap   a session blob (state, logits, position, seed, model
                                   fingerprint; checksummed) with owner, TTL, life and history
    state_dir/wal/NNNNNN.log       frames of records: created sessions, absorbed tokens, deletions

Modes (--durability):
    none      nothing is kept
    shutdown  every session is snapshotted at a graceful shutdown and restored at start
    log       as shutdown, plus every iteration's tokens are logged before its step runs
              (fsynced every --fsync-interval seconds) and sessions are snapshotted every
              --snapshot-interval seconds, after which the older log segments are deleted.
              After a crash, each session is its snapshot plus its logged tokens, replayed
              through the same per-token step: bit-identical to the state before the crash.
A session's durable position is how far it would come back after a crash. A snapshot is
identified by (life, position): a reset starts a new life, so a reset session is snapshotted
again even where its position came back to the old one. Temporary sessions (Generate without
a session id) are never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from server.checkpoint import atomic_write
from server.durability.journal import (
    Record,
    RecordKind,
    WriteAheadLog,
    fsync_directory,
    write_failed,
)
from server.durability.restore import Restored, recover
from server.errors import Unavailable
from server.sessions import blob
from server.sessions.store import Session

log = logging.getLogger(__name__)


def snapshot_bytes(session: Session, state: bytes | None, now: float) -> bytes:
    """A session's snapshot file contents (the state as of session.state_position)."""
    extra = {
        "id": session.id,
        "owner": session.owner,
        "ttl": session.ttl,
        "remaining_ttl": max(0.0, session.expires_at - now),
        "created_at": session.created_at,
        "history": session.history,
        "pending": session.pending_replay,
        "life": session.life,
    }
    return blob.pack(
        blob.SessionBlob(
            session.model,
            session.version,
            session.state_position,
            session.seed,
            state or b"",
            session.logits,
            extra,
        )
    )


@dataclass(frozen=True)
class Snapshot:
    """A session's snapshot file contents, taken with its state, and the key it stands for."""

    session: Session
    key: tuple[int, int]  # (life, state position): see Session.snapshot_key
    data: bytes


class Marks:
    """A session's life and durable position, changed together: when its records go to the log
    (the engine's thread) and when they are durable (the log's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def recorded(self, entries: list[tuple[Session, int, list[int]]]) -> None:
        """(session, start, tokens) handed to the log: a start from zero begins a new life."""
        with self._lock:
            for session, start, _ in entries:
                session.logged = True
                if start == 0:
                    session.life += 1
                    session.durable_position = 0

    def durable(self, marks: list[tuple[Session, int, int]]) -> None:
        """Marks (session, life, position) made durable; a mark from before a reset is void."""
        with self._lock:
            for session, life, position in marks:
                if life == session.life:
                    session.durable_position = max(session.durable_position, position)


class StateDirError(ValueError):
    """The state dir cannot be used: the server refuses to start (one line, no traceback)."""


def open_state_dir(state_dir: Path, server_pid: int) -> TextIO:
    """Create (if missing) and lock the state dir, and prove it is writable; returns the lock
    file, which holds the lock while it stays open. The lock names `server_pid`, the process an
    operator would stop (the server's, not its engine core's)."""
    if state_dir.exists() and not state_dir.is_dir():
        raise StateDirError(
            f"--state-dir {state_dir} is not a directory; give a directory (a missing one is created)"
        )
    try:
        (state_dir / "sessions").mkdir(parents=True, exist_ok=True)
        lock = open(state_dir / "lock", "a+")
    except OSError as e:
        raise StateDirError(f"--state-dir {state_dir} is not writable: {e.strerror or e}") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise StateDirError(
            f"--state-dir {state_dir} is in use by another lstm-serve (pid {holder}); stop it or give another directory"
        ) from None
    try:
        lock.truncate(0)
        lock.write(f"{server_pid}\n")
        lock.flush()
        atomic_write(state_dir / "sessions" / ".probe", b"")  # the same writes as a snapshot's
        (state_dir / "sessions" / ".probe").unlink()
    except OSError as e:
        lock.close()
        raise StateDirError(f"--state-dir {state_dir} is not writable: {e.strerror or e}") from e
    return lock


class Durability:
    def __init__(
        self,
        state_dir: Path | None,
        mode: str,
        fsync_interval: float,
        snapshot_interval: float,
        on_error: Callable[[str, OSError], None] = lambda operation, error: None,
        on_health: Callable[[bool], None] = lambda healthy: None,
        server_pid: int | None = None,
    ) -> None:
        self.mode = mode if state_dir is not None else "none"
        self.state_dir = state_dir
        self.snapshot_interval = snapshot_interval
        self.snapshot_tokens = 0  # snapshots by time only: a restart's replay may take a while
        self.wal: WriteAheadLog | None = None
        self._on_error = on_error  # every failed write: ("write", "fsync" or "snapshot", the error)
        self._on_health = on_health  # False while the log refuses writes, True once it recovered
        self._marks = Marks()
        self._lock_file = (
            open_state_dir(state_dir, server_pid or os.getpid()) if self.mode != "none" else None
        )
        if self.mode == "log":
            self.wal = WriteAheadLog(
                state_dir / "wal", fsync_interval, self._marks.durable, self._log_failed, self._log_recovered
            )

    @property
    def sessions_dir(self) -> Path:
        return self.state_dir / "sessions"

    def _snap_path(self, session: Session) -> Path:
        return self.sessions_dir / f"{session.id}.snap"

    def _log_failed(self, operation: str, error: OSError) -> None:
        log.error(
            "state dir %s failed: %s; refusing new steps and retrying on a new log segment", operation, error
        )
        self._on_error(operation, error)
        self._on_health(False)

    def _log_recovered(self) -> None:
        log.warning("state dir writes succeed again; serving")
        self._on_health(True)

    # ---- hooks -----------------------------------------------------------------------------

    def record(self, entries: list[tuple[Session, int, list[int]]]) -> None:
        """Step thread, before the step: log (session, start position, tokens) of one iteration.
        A session's first record carries its creation, in the same frame (all or nothing).
        UNAVAILABLE if the log cannot record them: then the step must not run."""
        entries = [e for e in entries if e[0].durable] if self.wal is not None else []
        if not entries:
            return
        records, marks = [], []
        for session, start, tokens in entries:
            life = session.life + 1 if start == 0 else session.life  # a start from zero is a new life
            if not session.logged:
                meta = {
                    "owner": session.owner,
                    "model": session.model,
                    "version": session.version,
                    "seed": session.seed,
                    "ttl": session.ttl,
                    "remaining_ttl": session.ttl,
                    "created_at": session.created_at,
                }
                records.append(Record(RecordKind.CREATE, session.id, meta=meta))
            records.append(Record(RecordKind.TOKENS, session.id, start, tuple(tokens), life))
            marks.append((session, life, start + len(tokens)))
        self.wal.append(records, marks)
        self._marks.recorded(entries)

    def deleted(self, session: Session, expired: bool = False) -> None:
        """A session ended (expiry, a failed creation, a temporary one): best effort. (`expired`
        matters to a shared store only: here the server remembers expired ids itself.)"""
        if not session.durable or self.mode == "none":
            return
        if self.wal is not None and session.logged:
            try:
                self.wal.append([Record(RecordKind.DELETE, session.id)], [])
            except Unavailable as e:
                log.warning(
                    "session %s: its deletion is not logged (%s); it may come back after a crash",
                    session.id,
                    e,
                )
        with contextlib.suppress(OSError):
            self._snap_path(session).unlink(missing_ok=True)

    async def delete(self, session: Session, end: Callable[[], None]) -> None:
        """DeleteSession: `end` the session once its deletion is logged, and return once that is
        on disk, so it never comes back after a crash. UNAVAILABLE (the session kept) if the
        log refuses the record."""
        if not session.durable or self.mode == "none":
            end()
            return
        if self.wal is not None and session.logged:
            self.wal.append([Record(RecordKind.DELETE, session.id)], [])
            session.logged = False  # `end` need not log it again
        end()
        try:
            if self.wal is not None:
                await asyncio.to_thread(self.wal.sync)
                if self.wal.failure is not None:
                    raise self.wal.failure
            await asyncio.to_thread(self._unlink_snapshot, session)
        except OSError as e:
            raise Unavailable(
                f"session {session.id} is deleted on this server, but the state dir failed ({e.strerror or e}) before "
                f"the deletion was on disk; the server writes it once the disk accepts writes"
            ) from e

    def _unlink_snapshot(self, session: Session) -> None:
        self._snap_path(session).unlink(missing_ok=True)
        fsync_directory(self.sessions_dir)  # also when `end` removed it: the removal must be on disk

    # ---- snapshots ---------------------------------------------------------------------------

    def snapshot(self, session: Session, state: bytes | None) -> None:
        """Step thread: snapshot a new fork or import now (the log has none of its past).
        UNAVAILABLE if it cannot be written: the caller removes the session."""
        if self.mode != "log" or not session.durable:
            return
        try:
            atomic_write(self._snap_path(session), snapshot_bytes(session, state, time.time()))
        except OSError as e:
            self._on_error("snapshot", e)
            raise write_failed(e) from e
        session.snapshot_key = (session.life, session.state_position)
        session.durable_position, session.logged = session.state_position, True

    def begin_checkpoint(self) -> int | None:
        """Continue the log in a new segment; the snapshots taken next cover every record of the
        segments up to the returned one. None: no checkpoint now (no log, or it is failed)."""
        if self.wal is None or self.wal.failure is not None:
            return None
        return self.wal.rotate()

    def end_checkpoint(self, old_segment: int) -> None:
        """Every snapshot of the checkpoint is written: drop the log it covers."""
        self.wal.delete_through(old_segment)

    @staticmethod
    def snapshots_of(
        sessions: list[Session], state_of: Callable[[Session], bytes | None], min_moved: int
    ) -> list[Snapshot]:
        """Snapshot contents of the `sessions` that moved `min_moved` tokens or more since their
        last one (0: all); between iterations for sessions on a loaded model, whose state
        `state_of` exports. A session whose replay is under way keeps its old snapshot (it
        holds what is left to replay)."""
        now = time.time()
        return [
            Snapshot(s, (s.life, s.state_position), snapshot_bytes(s, state_of(s), now))
            for s in sessions
            if s.durable and not s.replaying and s.unsnapshotted >= min_moved
        ]

    def write_snapshots(self, taken: list[Snapshot]) -> None:
        """Write snapshots (in a worker thread); OSError, counted, if one cannot be written."""
        try:
            for snapshot in taken:
                if not snapshot.session.closed:
                    atomic_write(self._snap_path(snapshot.session), snapshot.data)
                    snapshot.session.snapshot_key = snapshot.key
        except OSError as e:
            self._on_error("snapshot", e)
            raise
        finally:
            gone = [t.session for t in taken if t.session.closed and self._snap_path(t.session).exists()]
            for session in gone:  # deleted meanwhile: no snapshot may outlive the deletion
                self._snap_path(session).unlink(missing_ok=True)
            if gone:
                fsync_directory(self.sessions_dir)

    def close(self, snapshots_written: bool) -> None:
        """Graceful stop, after the final snapshots: the log is no longer needed if they were all
        written (it is kept for the next start otherwise)."""
        if self.wal is None:
            return
        with contextlib.suppress(Unavailable):
            self.wal.close()
        if snapshots_written:
            self.wal.delete_through(self.wal.last_segment)

    def recover(self) -> tuple[dict[str, Restored], list[str]]:
        """Every session in the state dir (snapshot + logged tokens), and the problems found."""
        if self.mode == "none":
            return {}, []
        return recover(self.sessions_dir, self.wal.directory if self.wal is not None else None)
