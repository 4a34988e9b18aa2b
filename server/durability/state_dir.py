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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from server.checkpoint import atomic_write
from server.durability.journal import (
    Record,
    RecordKind,
    WriteAheadLog,
    fsync_directory,
    read_all,
    write_failed,
)
from server.errors import InvalidArgument, Unavailable
from server.sessions import blob
from server.sessions.store import Session

log = logging.getLogger(__name__)


@dataclass
class Restored:
    """A session as found in the state dir, before its replay."""

    meta: dict  # id, owner, model, version, seed, ttl, remaining_ttl, created_at
    position: int = 0  # the position of `state`
    state: bytes | None = None  # pool export bytes; None: the zero state
    logits: np.ndarray | None = None
    history: list[int] = field(default_factory=list)  # tokens absorbed up to `position` (a tail)
    replay: list[int] = field(default_factory=list)  # logged tokens absorbed after `position`
    problem: str | None = None  # why its log stopped early (then replay ends there)
    life: int = 0  # restarts from position 0 so far (see journal.py); records of older lives are stale


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


class StateDirError(ValueError):
    """The state dir cannot be used: the server refuses to start (one line, no traceback)."""


def open_state_dir(state_dir: Path) -> TextIO:
    """Create (if missing) and lock the state dir, and prove it is writable; returns the lock
    file, which holds the lock while it stays open."""
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
        lock.write(f"{os.getpid()}\n")
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
    ) -> None:
        self.mode = mode if state_dir is not None else "none"
        self.state_dir = state_dir
        self.snapshot_interval = snapshot_interval
        self.wal: WriteAheadLog | None = None
        self._on_error = on_error  # every failed write: ("write", "fsync" or "snapshot", the error)
        self._on_health = on_health  # False while the log refuses writes, True once it recovered
        self._marks = threading.Lock()  # a session's life and durable position change together
        self._lock_file = open_state_dir(state_dir) if self.mode != "none" else None
        if self.mode == "log":
            self.wal = WriteAheadLog(
                state_dir / "wal", fsync_interval, self._made_durable, self._log_failed, self._log_recovered
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
        with self._marks:
            for session, start, _ in entries:
                session.logged = True
                if start == 0:
                    session.life += 1
                    session.durable_position = 0

    def _made_durable(self, marks: list[tuple[Session, int, int]]) -> None:
        """Log thread: marks (session, life, position); a mark from before a reset is void."""
        with self._marks:
            for session, life, position in marks:
                if life == session.life:
                    session.durable_position = max(session.durable_position, position)

    def deleted(self, session: Session) -> None:
        """A session ended (expiry, a failed creation, a temporary one): best effort."""
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

    async def checkpoint(self, engine) -> None:
        """Snapshot every session that changed since its last snapshot, then drop the log before.
        Nothing is dropped unless every snapshot was written."""
        if self.wal is None or self.wal.failure is not None:
            return
        old_segment = await asyncio.to_thread(
            self.wal.rotate
        )  # the states taken below cover every record before
        await self._snapshot_all(engine, moved_only=True)
        self.wal.delete_through(old_segment)

    async def _snapshot_all(self, engine, moved_only: bool) -> None:
        """Write the snapshots of every session (those that changed since their last one), the
        stranded ones included: their log may be all they have, and it is about to go."""
        taken = self._contents(engine.stranded(), lambda s: s.host_state, moved_only)
        for runtime in engine.registry.runtimes():
            sessions, state_bytes = engine.sessions_of(runtime), runtime.residency.state_bytes
            taken += await runtime.scheduler.in_step_thread(self._contents, sessions, state_bytes, moved_only)
        await asyncio.to_thread(self._write_all, taken)

    @staticmethod
    def _contents(
        sessions: list[Session], state_of: Callable[[Session], bytes | None], moved_only: bool
    ) -> list[tuple[Session, tuple[int, int], bytes]]:
        """Snapshot contents of `sessions` (those that changed since their last one); in the step
        thread for sessions on a loaded model, whose state `state_of` exports. A session whose
        replay is under way keeps its old snapshot (which holds what it still has to replay)."""
        now = time.time()
        return [
            (s, (s.life, s.state_position), snapshot_bytes(s, state_of(s), now))
            for s in sessions
            if s.durable
            and not s.replaying
            and not (moved_only and s.snapshot_key == (s.life, s.state_position))
        ]

    def _write_all(self, taken: list[tuple[Session, tuple[int, int], bytes]]) -> None:
        try:
            for session, key, data in taken:
                if not session.closed:
                    atomic_write(self._snap_path(session), data)
                    session.snapshot_key = key
        except OSError as e:
            self._on_error("snapshot", e)
            raise
        finally:
            gone = [s for s, _, _ in taken if s.closed and self._snap_path(s).exists()]
            for session in gone:  # deleted meanwhile: no snapshot may outlive the deletion
                self._snap_path(session).unlink(missing_ok=True)
            if gone:
                fsync_directory(self.sessions_dir)

    async def shutdown(self, engine) -> None:
        """Graceful stop: snapshot every session, then the log is no longer needed (it is kept
        if a snapshot cannot be written)."""
        if self.mode == "none":
            return
        try:
            await self._snapshot_all(engine, moved_only=False)
        except OSError as e:
            log.error("state dir: snapshots at shutdown failed (%s); the log is kept for the next start", e)
            return
        finally:
            if self.wal is not None:
                with contextlib.suppress(Unavailable):
                    self.wal.close()
        if self.wal is not None:
            self.wal.delete_through(self.wal.last_segment)

    # ---- recovery ------------------------------------------------------------------------------

    def recover(self) -> tuple[dict[str, Restored], list[str]]:
        """Every session in the state dir (snapshot + logged tokens), and the problems found."""
        if self.mode == "none":
            return {}, []
        restored, damaged = self._read_snapshots()
        problems = self._apply_log(restored) if self.wal is not None else []
        # a session created after the log's last rotation is rebuilt from the log alone
        return restored, [
            f"session {sid}: snapshot unusable ({why}); "
            + ("rebuilt from its log" if sid in restored else "the session is lost")
            for sid, why in damaged.items()
        ] + problems

    def _read_snapshots(self) -> tuple[dict[str, Restored], dict[str, str]]:
        """The sessions of the snapshot files, and why each unusable one is (by session id)."""
        for tmp in self.sessions_dir.glob("*.tmp"):  # a snapshot being written at a crash (atomic_write's)
            tmp.unlink()
        restored, damaged = {}, {}
        for path in sorted(self.sessions_dir.glob("*.snap")):
            try:
                found = blob.unpack(path.read_bytes())
                extra = found.extra
                meta = {
                    "id": extra["id"],
                    "owner": extra["owner"],
                    "model": found.model,
                    "version": found.fingerprint,
                    "seed": found.seed,
                    "ttl": float(extra["ttl"]),
                    "remaining_ttl": float(extra["remaining_ttl"]),
                    "created_at": float(extra["created_at"]),
                }
                restored[meta["id"]] = Restored(
                    meta,
                    found.position,
                    found.state or None,
                    found.logits,
                    list(extra["history"]),
                    list(extra["pending"]),
                    life=int(extra.get("life", 0)),  # older snapshots: no reset since the log began
                )
            except (InvalidArgument, KeyError, TypeError, ValueError, OSError) as e:
                damaged[path.stem] = str(e)
        return restored, damaged

    def _apply_log(self, restored: dict[str, Restored]) -> list[str]:
        problems = []
        for record, problem in read_all(self.wal.directory):
            if problem is not None:
                problems.append(problem)
                continue
            session = restored.get(record.session_id)
            if record.kind == RecordKind.CREATE:
                if session is None:
                    restored[record.session_id] = Restored(dict(record.meta, id=record.session_id))
            elif record.kind == RecordKind.DELETE:
                restored.pop(record.session_id, None)
            elif session is not None and session.problem is None:
                extend(session, record)
        return problems + [s.problem for s in restored.values() if s.problem]


def extend(session: Restored, record: Record) -> None:
    """Add a TOKENS record to a session's replay, skipping what its snapshot covers.

    A record of a newer life restarts the session from the zero state (creation, reset): the
    log holds every later record too, as segments are only ever deleted oldest first. Records
    of an older life are stale, and one already covered (a frame written again after a failed
    fsync) adds nothing.
    """
    if record.life < session.life:
        return
    if record.life > session.life and record.start == 0:
        session.position, session.state, session.logits, session.history = 0, None, None, []
        session.replay, session.life = list(record.tokens), record.life
        return
    end = session.position + len(session.replay)
    if record.life == session.life and record.start + len(record.tokens) <= end:
        return  # covered by the snapshot or an earlier copy
    if record.life == session.life and record.start <= end:
        session.replay += record.tokens[end - record.start :]
    else:
        session.problem = (
            f"session {session.meta['id']}: its log jumps from position {end} to {record.start} "
            f"(records lost); it is restored at position {end}"
        )
