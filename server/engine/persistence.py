"""The engine's side of durability: sessions restored at start-up, periodic checkpoints, and the
snapshots of a graceful stop.

server/durability/ is handed plain data only: the state dir's contents come back as
`Restored` records, and snapshots are taken from sessions whose states each model's step
thread exports, between iterations, so that a state and its position always agree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from server import tokenizer
from server.durability.restore import Restored, rebuild
from server.durability.state_dir import Durability
from server.engine.registry import ModelRegistry
from server.errors import Unavailable
from server.metrics import Metrics
from server.sessions.store import Session, SessionStore

log = logging.getLogger(__name__)
TOKEN_CHECK_INTERVAL = 1.0  # seconds between checks for sessions due a snapshot by tokens


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
            session, tokens = self.register(found)
            if tokens:
                replays.append(self._replay(session, tokens, slots))
        if replays:
            await asyncio.gather(*replays)
        if restored:
            log.info("restored %d session(s), %d replayed from the log", len(restored), len(replays))
            try:
                await self.checkpoint()
            except (OSError, Unavailable) as e:  # serve anyway: the log is kept until a checkpoint succeeds
                log.error("state dir: the checkpoint after restoring failed (%s); the log is kept", e)

    def register(self, found: Restored, epoch: int = 0) -> tuple[Session, list[int]]:
        """A restored session in the store, and the logged tokens it must be fed again. A session
        whose model version is not loaded is kept, stranded: its calls get FAILED_PRECONDITION
        and its data stays where it was."""
        runtime = self.registry.by_fingerprint(found.meta["version"])
        session = rebuild(found, runtime.vocab_size if runtime else None)
        session.epoch = epoch
        self.store.restore(session)
        if runtime is None:
            session.stranded, session.pending_replay = True, list(found.replay)
            log.error(
                "session %s: model %s version %s is not loaded; kept as stranded",
                session.id,
                session.model,
                session.version[:12],
            )
            return session, []
        if found.position == 0 and not found.replay:  # created, but its <bos> never logged
            return session, [tokenizer.BOS]
        return session, list(found.replay)

    async def take_over(self, found: Restored, epoch: int) -> Session:
        """A session another server held (shared session store): restored here, under `epoch`."""
        session, tokens = self.register(found, epoch)
        self.metrics.sessions_restored.inc()
        if tokens:
            await self.replay(session, tokens)
        return session

    async def _replay(self, session: Session, tokens: list[int], slots: asyncio.Semaphore) -> None:
        async with slots:
            await self.replay(session, tokens)

    async def checkpoint(self, min_moved: int = 1) -> None:
        """Snapshot every session that moved `min_moved` tokens or more since its last snapshot,
        then drop the log before. Nothing is dropped unless every snapshot was written."""
        old_segment = await asyncio.to_thread(self.durability.begin_checkpoint)
        if old_segment is None:
            return
        await self._write_snapshots(min_moved)
        self.durability.end_checkpoint(old_segment)

    async def checkpoint_forever(self) -> None:
        """Every --snapshot-interval, every session that moved. A store that snapshots by tokens
        too (snapshot_tokens > 0: the shared one, where a takeover replays the log) also gets,
        every second, the sessions that moved that many tokens since their last snapshot."""
        interval, by_tokens = self.durability.snapshot_interval, self.durability.snapshot_tokens
        tick = min(TOKEN_CHECK_INTERVAL, interval) if by_tokens else interval
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            full = time.monotonic() - last_full >= interval - tick / 2
            if full:
                last_full = time.monotonic()
            try:
                await self.checkpoint(1 if full else by_tokens)
            except Exception:  # keep serving; the log keeps growing until a checkpoint succeeds
                log.exception("checkpoint failed")

    async def save_all(self) -> None:
        """Graceful stop: snapshot every session; the log is dropped once they are all written."""
        if self.durability.mode == "none":
            return
        try:
            await self._write_snapshots(min_moved=0)
        except OSError as e:
            log.error("state dir: snapshots at shutdown failed (%s); the log is kept for the next start", e)
            self.durability.close(snapshots_written=False)
            return
        self.durability.close(snapshots_written=True)

    async def _write_snapshots(self, min_moved: int) -> None:
        """The snapshots of every session that moved `min_moved` tokens since its last one (0:
        every session), the stranded ones included: their log may be all they have, and it is
        about to go."""
        taken = self.durability.snapshots_of(self.store.stranded(), lambda s: s.host_state, min_moved)
        for runtime in self.registry.runtimes():
            sessions = self.store.running_on(runtime.version)  # here: the store changes on the event loop
            taken += await runtime.scheduler.between_iterations(
                self.durability.snapshots_of, sessions, runtime.residency.state_bytes, min_moved
            )  # between iterations: states and positions agree
        await asyncio.to_thread(self.durability.write_snapshots, taken)
