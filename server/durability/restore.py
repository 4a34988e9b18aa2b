"""Reading the state dir back at start-up: each session's snapshot plus its logged tokens.

A restored session gets its snapshot's state and logits; the engine then feeds it its logged
tokens again through the same per-token step, so the rebuilt state is bit-identical to the
one before the crash. Nothing here runs a model: it is plain data in, plain data out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.durability.journal import Record, RecordKind, read_all
from server.errors import InvalidArgument
from server.sessions import blob
from server.sessions.store import Session


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


def recover(sessions_dir: Path, wal_dir: Path | None) -> tuple[dict[str, Restored], list[str]]:
    """Every session in the state dir (snapshot + logged tokens), and the problems found."""
    restored, damaged = read_snapshots(sessions_dir)
    problems = apply_log(wal_dir, restored) if wal_dir is not None else []
    # a session created after the log's last rotation is rebuilt from the log alone
    return restored, [
        f"session {sid}: snapshot unusable ({why}); "
        + ("rebuilt from its log" if sid in restored else "the session is lost")
        for sid, why in damaged.items()
    ] + problems


def read_snapshots(sessions_dir: Path) -> tuple[dict[str, Restored], dict[str, str]]:
    """The sessions of the snapshot files, and why each unusable one is (by session id)."""
    for tmp in sessions_dir.glob("*.tmp"):  # a snapshot being written at a crash (atomic_write's)
        tmp.unlink()
    restored, damaged = {}, {}
    for path in sorted(sessions_dir.glob("*.snap")):
        try:
            found = from_snapshot(path.read_bytes())
            restored[found.meta["id"]] = found
        except (InvalidArgument, KeyError, TypeError, ValueError, OSError) as e:
            damaged[path.stem] = str(e)
    return restored, damaged


def from_snapshot(data: bytes) -> Restored:
    """A session from its snapshot's bytes (state_dir.snapshot_bytes); InvalidArgument, KeyError
    or ValueError if they are damaged."""
    found = blob.unpack(data)
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
    return Restored(
        meta,
        found.position,
        found.state or None,
        found.logits,
        list(extra["history"]),
        list(extra["pending"]),
        life=int(extra.get("life", 0)),  # older snapshots: no reset since the log began
    )


def apply_log(wal_dir: Path, restored: dict[str, Restored]) -> list[str]:
    """Add the log's records to the snapshots' sessions; the problems found."""
    problems = []
    for record, problem in read_all(wal_dir):
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


def rebuild(restored: Restored, vocab_size: int | None) -> Session:
    """A Session object from what the state dir holds (before its replay)."""
    meta, now = restored.meta, time.time()
    session = Session(
        meta["id"],
        meta["owner"],
        meta["model"],
        meta["version"],
        int(meta["seed"]),
        float(meta["ttl"]),
        float(meta["created_at"]),
        now + float(meta["remaining_ttl"]),
    )
    session.position = session.state_position = restored.position
    session.life, session.logged = restored.life, True
    session.durable_position = restored.position + len(restored.replay)
    session.host_state = restored.state
    session.history = list(restored.history)
    size = vocab_size or (0 if restored.logits is None else restored.logits.size)
    session.logits = restored.logits if restored.logits is not None else np.zeros(size, dtype=np.float32)
    return session
