"""Bring the sessions of the state dir back at start-up, through the same per-token step.

A restored session gets its snapshot's state and logits, then its logged tokens are fed
again (a Job like any other), so the rebuilt state is bit-identical to the one before the
crash. A session whose model version is not loaded is kept, stranded: its calls get
FAILED_PRECONDITION and its data stays in the state dir.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from server import tokenizer
from server.durability.state_dir import Restored
from server.errors import Unavailable
from server.sessions.store import Session

log = logging.getLogger(__name__)


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


async def restore_sessions(engine) -> None:
    """Restore every session of the state dir; replays run concurrently, batched as usual."""
    restored, problems = engine.durability.recover()
    for problem in problems:
        log.error("state dir: %s", problem)
    engine.metrics.state_problems.inc(len(problems))
    engine.metrics.sessions_restored.inc(len(restored))
    # each replay is a queued request: more at once than a model's queue holds would be refused
    slots = asyncio.Semaphore(engine.settings.max_queue)
    replays = []
    for found in restored.values():
        runtime = engine.registry.by_fingerprint(found.meta["version"])
        session = rebuild(found, runtime.vocab_size if runtime else None)
        engine.store.restore(session)
        if runtime is None:
            session.stranded, session.pending_replay = True, list(found.replay)
            log.error(
                "session %s: model %s version %s is not loaded; kept as stranded",
                session.id,
                session.model,
                session.version[:12],
            )
            continue
        if found.position == 0 and not found.replay:  # created, but its <bos> never logged
            found.replay = [tokenizer.BOS]
        if found.replay:
            replays.append(_replay(engine, session, list(found.replay), slots))
    if replays:
        await asyncio.gather(*replays)
    if restored:
        log.info("restored %d session(s), %d replayed from the log", len(restored), len(replays))
        try:
            await engine.durability.checkpoint(engine)
        except (OSError, Unavailable) as e:  # serve anyway: the log is kept until a checkpoint succeeds
            log.error("state dir: the checkpoint after restoring failed (%s); the log is kept", e)


async def _replay(engine, session: Session, tokens: list[int], slots: asyncio.Semaphore) -> None:
    async with slots:
        await engine.replay(session, tokens)
