"""Durable sessions in --state-dir: snapshots, and a write-ahead log of absorbed tokens.

    state_dir/sessions/<id>.snap   a session blob (state, logits, position, seed, model
                                   fingerprint; checksummed) with owner, TTL and history
    state_dir/wal/NNNNNN.log       records of created sessions, absorbed tokens, deletions

Modes (--durability):
    none      nothing is kept
    shutdown  every session is snapshotted at a graceful shutdown and restored at start
    log       as shutdown, plus every absorbed token is logged (fsynced every
              --fsync-interval seconds) and sessions are snapshotted every
              --snapshot-interval seconds, after which the older log segments are deleted.
              After a crash, each session is its snapshot plus its logged tokens, replayed
              through the same per-token step: bit-identical to the state before the crash.
A session's durable position is how far it would come back after a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server import blob
from server.checkpoint import atomic_write
from server.errors import InvalidArgument
from server.journal import Record, RecordKind, WriteAheadLog, read_all
from server.sessions import Session

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


def snapshot_bytes(session: Session, state: bytes | None, now: float) -> bytes:
    """A session's snapshot file contents (the state as of session.state_position)."""
    extra = {
        "id": session.id, "owner": session.owner, "ttl": session.ttl, "remaining_ttl": max(0.0, session.expires_at - now),
        "created_at": session.created_at, "history": session.history, "pending": session.pending_replay,
    }
    return blob.pack(blob.SessionBlob(
        session.model, session.version, session.state_position, session.seed, state or b"", session.logits, extra,
    ))


class Durability:
    def __init__(self, state_dir: Path | None, mode: str, fsync_interval: float, snapshot_interval: float) -> None:
        self.mode = mode if state_dir is not None else "none"
        self.state_dir = state_dir
        self.snapshot_interval = snapshot_interval
        self.wal: WriteAheadLog | None = None
        # session id -> how many times its log restarted from position 0 (creation, resets): an
        # fsync's mark from before a reset must not raise the durable position of the new state
        self._lives: dict[str, int] = {}
        if self.mode != "none":
            self.sessions_dir.mkdir(parents=True, exist_ok=True)
        if self.mode == "log":
            self.wal = WriteAheadLog(state_dir / "wal", fsync_interval, self._made_durable)

    @property
    def sessions_dir(self) -> Path:
        return self.state_dir / "sessions"

    # ---- hooks -----------------------------------------------------------------------------

    def created(self, session: Session) -> None:
        """A new session (its <bos> follows as logged tokens from position 0)."""
        if self.wal is not None:
            meta = {"owner": session.owner, "model": session.model, "version": session.version, "seed": session.seed,
                    "ttl": session.ttl, "remaining_ttl": session.ttl, "created_at": session.created_at}
            self.wal.append([Record(RecordKind.CREATE, session.id, meta=meta)], [])

    def absorbed(self, entries: list[tuple[Session, int, list[int]]]) -> None:
        """Step thread: (session, start position, tokens) absorbed by one iteration."""
        if self.wal is None or not entries:
            return
        for session, start, _ in entries:
            if start == 0:  # a reset: nothing of the new state is on disk yet
                self._lives[session.id] = self._lives.get(session.id, 0) + 1
                session.durable_position = 0
        records = [Record(RecordKind.TOKENS, s.id, start, tuple(tokens)) for s, start, tokens in entries]
        self.wal.append(records, [(s, self._lives.get(s.id, 0), start + len(tokens)) for s, start, tokens in entries])

    def deleted(self, session: Session) -> None:
        self._lives.pop(session.id, None)
        if self.wal is not None:
            self.wal.append([Record(RecordKind.DELETE, session.id)], [])
        if self.mode != "none":
            (self.sessions_dir / f"{session.id}.snap").unlink(missing_ok=True)

    def _made_durable(self, marks: list[tuple[Session, int, int]]) -> None:
        """fsync thread: marks (session, life, position); concurrent fsyncs may report out of order."""
        for session, life, position in marks:
            if life == self._lives.get(session.id, 0):
                session.durable_position = max(session.durable_position, position)

    # ---- snapshots ---------------------------------------------------------------------------

    def snapshot(self, session: Session, state: bytes | None) -> None:
        """Step thread: snapshot one session now (a fork or an import, whose state has no log)."""
        if self.mode == "log":
            atomic_write(self.sessions_dir / f"{session.id}.snap", snapshot_bytes(session, state, time.time()))
            session.snapshot_position = session.durable_position = session.state_position

    async def checkpoint(self, engine) -> None:
        """Snapshot every session that moved since its last snapshot, then drop the log before."""
        if self.wal is None:
            return
        old_segment = self.wal.rotate()  # the states taken below cover every record before
        await self._snapshot_all(engine, moved_only=True)
        self.wal.delete_through(old_segment)

    async def _snapshot_all(self, engine, moved_only: bool) -> None:
        """Write the snapshots of every session (those that moved since their last one), the
        stranded ones included: their log may be all they have, and it is about to go."""
        taken = self._contents(engine.stranded(), lambda s: s.host_state, moved_only)
        for runtime in engine.registry.runtimes():
            sessions, state_bytes = engine.sessions_of(runtime), runtime.residency.state_bytes
            taken += await runtime.scheduler.in_step_thread(self._contents, sessions, state_bytes, moved_only)
        await asyncio.to_thread(self._write_all, taken)

    @staticmethod
    def _contents(
        sessions: list[Session], state_of: Callable[[Session], bytes | None], moved_only: bool
    ) -> list[tuple[Session, int, bytes]]:
        """Snapshot contents of `sessions` (those that moved since their last one); in the step
        thread for sessions on a loaded model, whose state `state_of` exports."""
        now = time.time()
        return [
            (s, s.state_position, snapshot_bytes(s, state_of(s), now))
            for s in sessions if not (moved_only and s.snapshot_position == s.state_position)
        ]

    def _write_all(self, taken: list[tuple[Session, int, bytes]]) -> None:
        for session, position, data in taken:
            if not session.closed:
                atomic_write(self.sessions_dir / f"{session.id}.snap", data)
                session.snapshot_position = position
        for session, _, _ in taken:  # deleted meanwhile: no snapshot may outlive the deletion
            if session.closed:
                (self.sessions_dir / f"{session.id}.snap").unlink(missing_ok=True)

    async def shutdown(self, engine) -> None:
        """Graceful stop: snapshot every session, then the log is no longer needed."""
        if self.mode == "none":
            return
        await self._snapshot_all(engine, moved_only=False)
        if self.wal is not None:
            self.wal.close()
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
            f"session {sid}: snapshot unusable ({why}); " + ("rebuilt from its log" if sid in restored else "the session is lost")
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
                meta = {"id": extra["id"], "owner": extra["owner"], "model": found.model, "version": found.fingerprint,
                        "seed": found.seed, "ttl": float(extra["ttl"]), "remaining_ttl": float(extra["remaining_ttl"]),
                        "created_at": float(extra["created_at"])}
                restored[meta["id"]] = Restored(
                    meta, found.position, found.state or None, found.logits, list(extra["history"]), list(extra["pending"]),
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

    A record from position 0 restarts the session from the zero state (creation, reset): the
    log holds every later record too, as segments are only ever deleted oldest first.
    """
    if record.start == 0:
        session.position, session.state, session.logits, session.history = 0, None, None, []
        session.replay = list(record.tokens)
        return
    end = session.position + len(session.replay)
    if record.start + len(record.tokens) <= end:
        return  # covered by the snapshot
    if record.start <= end:
        session.replay += record.tokens[end - record.start :]
    else:
        session.problem = (
            f"session {session.meta['id']}: its log jumps from position {end} to {record.start} (records lost); "
            f"it is restored at position {end}"
        )
