"""The engine's side of durability: sessions restored at start-up, periodic checkpoints, and the
snapshots of a graceful stop.

server/durability/ is handed plain data only: the state dir's contents come back as
`Restored` records, and snapshots are taken from sessions whose states each model's step
thread exports, between iterations, so that a state and its position always agree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from server import tokenizer
from server.durability.restore import rebuild
from server.durability.state_dir import Durability
from server.engine.registry import ModelRegistry
from server.errors import Unavailable
from server.metrics import Metrics
from server.sessions.store import Session, SessionStore

log = logging.getLogger(__name__)


class Persistence:
    def __init__(
        self,
        durability: Durability,
        registry: ModelRegistry,
        store: SessionStore,
        metrics: Metrics,
        max_queue: int,
        replay: Callable[[Session, list[int]], Awaitable[None]],
    ) -> None:
        self.durability = durability
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.max_queue = max_queue
        self.replay = replay  # feeds a restored session its logged tokens (Engine.replay)

    async def restore(self) -> None:
        """Bring back every session of the state dir: its snapshot, then its logged tokens fed
        again through the same per-token step (bit-identical to the state before the crash).
        A session whose model version is not loaded is kept, stranded: its calls get
        FAILED_PRECONDITION and its data stays in the state dir."""
        restored, problems = self.durability.recover()
        for problem in problems:
            log.error("state dir: %s", problem)
        self.metrics.state_problems.inc(len(problems))
        self.metrics.sessions_restored.inc(len(restored))
        # each replay is a queued request: more at once than a model's queue holds would be refused
        slots = asyncio.Semaphore(self.max_queue)
        replays = []
        for found in restored.values():
            runtime = self.registry.by_fingerprint(found.meta["version"])
            session = rebuild(found, runtime.vocab_size if runtime else None)
            self.store.restore(session)
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
                replays.append(self._replay(session, list(found.replay), slots))
        if replays:
            await asyncio.gather(*replays)
        if restored:
            log.info("restored %d session(s), %d replayed from the log", len(restored), len(replays))
            try:
                await self.checkpoint()
            except (OSError, Unavailable) as e:  # serve anyway: the log is kept until a checkpoint succeeds
                log.error("state dir: the checkpoint after restoring failed (%s); the log is kept", e)

    async def _replay(self, session: Session, tokens: list[int], slots: asyncio.Semaphore) -> None:
        async with slots:
            await self.replay(session, tokens)

    async def checkpoint(self) -> None:
        """Snapshot every session that changed since its last snapshot, then drop the log before.
        Nothing is dropped unless every snapshot was written."""
        old_segment = await asyncio.to_thread(self.durability.begin_checkpoint)
        if old_segment is None:
            return
        await self._write_snapshots(moved_only=True)
        self.durability.end_checkpoint(old_segment)

    async def checkpoint_forever(self) -> None:
        while True:
            await asyncio.sleep(self.durability.snapshot_interval)
            try:
                await self.checkpoint()
            except Exception:  # keep serving; the log keeps growing until a checkpoint succeeds
                log.exception("checkpoint failed")

    async def save_all(self) -> None:
        """Graceful stop: snapshot every session; the log is dropped once they are all written."""
        if self.durability.mode == "none":
            return
        try:
            await self._write_snapshots(moved_only=False)
        except OSError as e:
            log.error("state dir: snapshots at shutdown failed (%s); the log is kept for the next start", e)
            self.durability.close(snapshots_written=False)
            return
        self.durability.close(snapshots_written=True)

    async def _write_snapshots(self, moved_only: bool) -> None:
        """The snapshots of every session (with moved_only, those that changed since their last
        one), the stranded ones included: their log may be all they have, and it is about to go."""
        taken = self.durability.snapshots_of(self.store.stranded(), lambda s: s.host_state, moved_only)
        for runtime in self.registry.runtimes():
            sessions = self.store.running_on(runtime.version)  # here: the store changes on the event loop
            taken += await runtime.scheduler.between_iterations(
                self.durability.snapshots_of, sessions, runtime.residency.state_bytes, moved_only
            )  # between iterations: states and positions agree
        await asyncio.to_thread(self.durability.write_snapshots, taken)
