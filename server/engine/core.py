"""The serving engine: what the gRPC edge delegates to (no grpc here), and all it reaches.

It ties the model registry, the session store and the per-model schedulers together:
session lifecycle (create, fork, reset, export, import, delete, expiry), attaching the
stream that drives a session, submitting and cancelling its jobs. Restore, checkpoints and
the final snapshots are persistence.py's, which hands server/durability plain data. The
edge calls only the public methods below; callbacks (log records, durability faults,
health) are wired here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np

from server import tokenizer
from server.config import ServeSettings
from server.durability.redis_log import Stored
from server.durability.shared import SharedDurability
from server.durability.state_dir import Durability
from server.engine.ownership import Ownership
from server.engine.persistence import Persistence
from server.engine.registry import ModelRegistry, ModelRuntime
from server.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from server.metrics import Metrics
from server.sessions import blob
from server.sessions.jobs import FinishedEvent, FinishReason, Job, Outbox
from server.sessions.principal import Principal
from server.sessions.store import Driver, Session, SessionStore

log = logging.getLogger(__name__)
T = TypeVar("T")
EXPIRY_INTERVAL = 0.25  # seconds between expiry sweeps (and session gauge updates)


class Engine:
    def __init__(
        self,
        settings: ServeSettings,
        registry: ModelRegistry,
        metrics: Metrics,
        queued_limit_of: Callable[[str], int | None] = lambda owner: None,
        server_pid: int | None = None,  # the front end's, for the state dir's lock
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self._queued_limit_of = queued_limit_of  # an owner's per-session request cap (its API key's), if any
        self.store = SessionStore(settings.max_sessions, settings.session_ttl, settings.max_session_ttl)
        on_error = lambda operation, error: metrics.durability_errors.labels(operation).inc()  # noqa: E731
        self.shared: SharedDurability | None = None  # the shared session store (Redis), if any
        if settings.session_store is not None:
            self.durability = self.shared = SharedDurability(
                settings.session_store,
                settings.snapshot_interval,
                on_error=on_error,
                on_health=self._log_health_changed,
                on_fenced=lambda session_ids: self.ownership.let_go(session_ids),
            )
        else:
            self.durability = Durability(
                settings.state_dir,
                settings.durability,
                settings.fsync_interval,
                settings.snapshot_interval,
                on_error=on_error,
                on_health=self._log_health_changed,
                server_pid=server_pid,
            )
        self.persistence = Persistence(
            self.durability, registry, self.store, metrics, settings.max_queue, self.replay
        )
        self.ownership = (
            Ownership(self.shared, self.store, self.persistence, self._end)
            if self.shared is not None
            else None
        )
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = False  # models loaded and schedulers running
        self.log_healthy = True  # False while the state dir refuses the log's writes
        self.on_health: Callable[[bool], None] = lambda serving: None  # health to report (set by serve())
        metrics.session_capacity.labels("device_per_model").set(settings.device_slots)
        metrics.session_capacity.labels("total").set(settings.max_sessions)

    async def start(self) -> None:
        """Start the schedulers, restore the sessions of the state dir, then serve."""
        loop = self._loop = asyncio.get_running_loop()
        if self.ownership is not None:
            self.ownership.loop = loop
        for runtime in self.registry.runtimes():
            self._start_runtime(runtime)
        await self.persistence.restore()
        self._tasks = [loop.create_task(self._sweep_forever(), name="expiry")]
        if self.durability.mode == "log":
            self._tasks.append(loop.create_task(self.persistence.checkpoint_forever(), name="checkpoint"))
        self.ready = True

    async def reload_models(self) -> None:
        """SIGHUP: load new model files; stranded sessions whose version came back resume."""
        added = await asyncio.to_thread(self.registry.scan)
        for runtime in added:
            self._start_runtime(runtime)
        for session in self.store.stranded():
            if self.registry.by_fingerprint(session.version) is not None:
                session.stranded, replay = False, session.pending_replay
                session.pending_replay = []
                if replay:
                    await self.replay(session, replay)
        log.info("models rescanned: %d new version(s)", len(added))

    def _start_runtime(self, runtime: ModelRuntime) -> None:
        """Start a model version's scheduler, logging what it absorbs."""
        runtime.scheduler.on_record = self.durability.record
        runtime.scheduler.start()

    def _log_health_changed(self, healthy: bool) -> None:
        """Any thread: the log failed (NOT_SERVING) or recovered (SERVING again)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._set_log_health, healthy)
        else:
            self.log_healthy = healthy

    def _set_log_health(self, healthy: bool) -> None:
        self.log_healthy = healthy
        if self.ready:
            self.on_health(healthy)

    def check_ready(self) -> None:
        if not self.ready:
            raise Unavailable("the server is still loading its models; retry shortly")

    async def stop(self) -> None:
        """End every open stream with UNAVAILABLE (naming its position), let the running step
        finish, snapshot every session (with a state dir), then stop the schedulers."""
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for session in self.store:
            for job in session.jobs:
                job.abort()
        for runtime in self.registry.runtimes():
            runtime.scheduler.wake()  # to retire the aborted jobs, also of paused sessions
        for session in self.store:  # the running step lands and its tokens are delivered first
            if not session.stranded:
                await self.runtime(session).scheduler.settle(session)
        for session in self.store:
            if session.driver is not None:
                session.driver.end(
                    Unavailable(
                        f"the server is shutting down; session {session.id} is at position {session.position}"
                    )
                )
        await self.persistence.save_all()
        for runtime in self.registry.runtimes():
            await runtime.scheduler.stop()

    # ---- sessions ------------------------------------------------------------------------

    def runtime(self, session: Session) -> ModelRuntime:
        """The model version `session` runs on; FAILED_PRECONDITION if it is no longer loaded."""
        runtime = self.registry.by_fingerprint(session.version)
        if runtime is None:
            raise FailedPrecondition(
                f"session {session.id} runs on model {session.model!r} version {session.version[:12]}, which is not "
                f"loaded; its data is kept: restore that model file (and send SIGHUP) to use it again"
            )
        return runtime

    def get_session(self, principal: Principal, session_id: str) -> Session:
        """The caller's live session; one past its TTL is expired on the spot."""
        session = self.store.get(session_id, principal.name)
        if session.expires_at <= time.time() and session.idle and session.driver is None:
            self._end(session, "expired")
            return self.store.get(session_id, principal.name)  # raises NOT_FOUND ... expired
        return session

    async def ensure_local(self, principal: Principal, session_id: str) -> None:
        """Before a call about an existing session: with a shared session store, make sure this
        server holds its current state (ownership.py); otherwise nothing to do."""
        if self.ownership is not None:
            await self.ownership.ensure_local(principal, session_id)

    async def _claim(self, session: Session) -> None:
        if self.ownership is not None:
            await self.ownership.claim(session)

    async def list_sessions(self, principal: Principal) -> tuple[list[Session], list[Stored]]:
        """The caller's sessions held here; with a shared session store, also those held by
        another server or by none, as the store has them (ownership.py)."""
        if self.ownership is not None:
            return await self.ownership.list_sessions(principal)
        return self.store.owned_by(principal.name), []

    async def create_session(
        self,
        principal: Principal,
        model: str,
        version: str,
        seed: int | None,
        ttl: float | None,
        durable: bool = True,
        session_id: str = "",
    ) -> Session:
        """A new session that has absorbed <bos> (a temporary one, not `durable`, is never written),
        under `session_id` if the client chose one."""
        runtime = self.registry.get(model, version)
        session = self._register(principal, runtime, seed, ttl, session_id)
        session.durable = durable
        await self._claim(session)
        await self._or_rolled_back(
            session, self.run_quietly(session, Job("", Outbox(limit=2), feed=[tokenizer.BOS], reset=True))
        )
        return session

    async def reset_session(self, principal: Principal, session_id: str) -> Session:
        """Back to a new session's state (position 1); queued behind the session's requests."""
        session = self.get_session(principal, session_id)
        await self.run_quietly(session, Job("", Outbox(limit=2), feed=[tokenizer.BOS], reset=True))
        return session

    async def fork_session(
        self, principal: Principal, session_id: str, seed: int | None, ttl: float | None, new_id: str = ""
    ) -> Session:
        parent = self.get_session(principal, session_id)
        await self._settled(parent, "fork")
        runtime = self.runtime(parent)
        child = self._register(principal, runtime, parent.seed if seed is None else seed, ttl, new_id)
        child.position = child.state_position = parent.position
        child.logits, child.history = parent.logits.copy(), list(parent.history)
        parent.touch()
        await self._claim(child)
        await self._or_rolled_back(
            child, runtime.scheduler.between_iterations(self._copy_and_snapshot, runtime, parent, child)
        )
        return child

    def _copy_and_snapshot(self, runtime: ModelRuntime, parent: Session, child: Session) -> None:
        """Step thread: the fork's state, snapshotted at once (the log has none of its past)."""
        runtime.residency.copy_state(parent, child)
        self.durability.snapshot(child, runtime.residency.state_bytes(child))

    async def export_session(self, principal: Principal, session_id: str) -> tuple[bytes, Session]:
        session = self.get_session(principal, session_id)
        await self._settled(session, "export")
        runtime = self.runtime(session)
        position, logits = session.position, session.logits.copy()
        session.touch()
        state = await runtime.scheduler.between_iterations(runtime.residency.state_bytes, session)
        packed = blob.pack(
            blob.SessionBlob(runtime.name, runtime.version, position, session.seed, state, logits)
        )
        return packed, session

    async def import_session(
        self, principal: Principal, data: bytes, ttl: float | None, session_id: str = ""
    ) -> Session:
        exported = blob.unpack(data)
        runtime = self.registry.by_fingerprint(exported.fingerprint)
        if runtime is None:
            raise FailedPrecondition(
                f"the blob is for model {exported.model!r} version {exported.fingerprint[:12]}, which this server has not loaded"
            )
        if exported.logits.size != runtime.vocab_size:
            raise InvalidArgument(
                f"the blob's logits have {exported.logits.size} entries, the model's vocabulary {runtime.vocab_size}"
            )
        if not np.isfinite(exported.logits).all():
            raise InvalidArgument("the blob's logits hold non-finite values")
        session = self._register(principal, runtime, exported.seed, ttl, session_id)
        session.position = session.state_position = exported.position
        session.logits = exported.logits
        await self._claim(session)
        try:
            placed = await self._or_rolled_back(
                session,
                runtime.scheduler.between_iterations(
                    self._load_and_snapshot, runtime, session, exported.state
                ),
            )
        except ValueError as e:
            raise InvalidArgument(f"the blob's state does not fit model {runtime.name!r}: {e}") from e
        if not placed:
            self._end(session, "deleted")
            raise ResourceExhausted(
                "every device slot is in use by running requests; retry the import shortly", "capacity"
            )
        return session

    async def _or_rolled_back(self, session: Session, operation: Awaitable[T]) -> T:
        """Await a new session's set-up; if it fails (its first snapshot or log record could not
        be written) or the caller goes away meanwhile, end the session: the client never heard
        of it, and nothing of it stays in the state dir."""
        try:
            return await operation
        except BaseException:
            self._end(session, "deleted")
            raise

    def _load_and_snapshot(self, runtime: ModelRuntime, session: Session, state: bytes) -> bool:
        """Step thread: an imported state into a slot, snapshotted at once."""
        placed = runtime.residency.load(session, state)
        if placed:
            self.durability.snapshot(session, state)
        return placed

    async def delete_session(self, principal: Principal, session_id: str) -> None:
        """Returns once the deletion is on disk (with a state dir): it never comes back."""
        session = self.get_session(principal, session_id)
        await self.durability.delete(session, lambda: self._end(session, "deleted"))

    # ---- streams -------------------------------------------------------------------------

    def attach(
        self,
        principal: Principal,
        session_id: str,
        takeover: bool,
        outbox: Callable[[Callable[[], None]], Outbox] = lambda wake: Outbox(on_drain=wake),
    ) -> tuple[Session, Driver]:
        """Make a new stream the driver of the session (see SessionStore.attach); its events go
        to `outbox(wake)`, which calls `wake` when it has room again."""
        session = self.get_session(principal, session_id)
        runtime = self.runtime(session)
        driver = Driver(outbox(runtime.scheduler.wake))
        self.store.attach(session, driver, takeover)
        runtime.scheduler.wake()  # a takeover cancelled the old stream's jobs
        return session, driver

    def detach(self, session: Session, driver: Driver) -> None:
        self.store.detach(session, driver)
        if not session.closed:
            self.runtime(session).scheduler.wake()

    async def settle(self, session: Session) -> None:
        """Wait until `session` has no job queued or running (a former stream's last step)."""
        await self.runtime(session).scheduler.settle(session)

    def cancel(self, session: Session, job: Job) -> None:
        """Stop `job` at its next step."""
        job.cancel()
        self.runtime(session).scheduler.wake()

    def end_temporary(self, session: Session) -> None:
        """A Generate call's temporary session, at the end of the call."""
        self._end(session, "temporary")

    def submit(self, session: Session, job: Job) -> None:
        if session.closed:
            raise NotFound(f"session {session.id} was deleted")
        runtime = self.runtime(session)
        if job.classify and not runtime.heads:
            raise FailedPrecondition(
                f"model {runtime.name!r} version {runtime.version[:12]} has no classification heads (heads: "
                f"none): classify needs a model trained with `lstm-serve train --task classify`"
            )
        try:
            self._check_session_queue(session)
            runtime.scheduler.submit(session, job)
        except ResourceExhausted as e:
            self.metrics.sessions_rejected.labels(e.reason).inc()
            raise

    def _check_session_queue(self, session: Session) -> None:
        """RESOURCE_EXHAUSTED when `session` already has its cap of live requests queued or
        running: --max-queued-per-session, or its API key's lower max_queued_requests."""
        key_limit = self._queued_limit_of(session.owner)
        limit = min(self.settings.max_queued_per_session, key_limit or self.settings.max_queued_per_session)
        if sum(1 for job in session.jobs if not job.cancelled) >= limit:
            whose = (
                "this API key's max_queued_requests"
                if limit == key_limit
                else "this server's --max-queued-per-session"
            )
            raise ResourceExhausted(
                f"session {session.id} already has {limit} requests queued or running ({whose}); "
                f"read their events and wait for one to finish before sending another",
                "session_queue_full",
            )

    # ---- internals -----------------------------------------------------------------------

    def _register(
        self,
        principal: Principal,
        runtime: ModelRuntime,
        seed: int | None,
        ttl: float | None,
        session_id: str = "",
    ) -> Session:
        try:
            session = self.store.new(
                principal.name, runtime.name, runtime.version, seed, ttl, principal.max_sessions, session_id
            )
        except ResourceExhausted as e:
            self.metrics.sessions_rejected.labels(e.reason).inc()
            raise
        session.logits = runtime.zero_logits()
        self.metrics.sessions_created.labels(runtime.name).inc()
        return session

    async def _settled(self, session: Session, action: str) -> None:
        """Wait out cancelled requests' last steps; refuse while a live request runs."""
        if any(not job.cancelled for job in session.jobs):
            raise FailedPrecondition(
                f"cannot {action} session {session.id} while a request on it is running; wait for it to finish"
            )
        await self.runtime(session).scheduler.settle(session)
        if not session.idle:
            raise FailedPrecondition(
                f"cannot {action} session {session.id}: a new request on it started; wait for it to finish"
            )

    async def replay(self, session: Session, tokens: list[int]) -> None:
        """Feed a restored session its logged tokens again, through the same step (from the zero
        state if its state is at position 0)."""
        session.replaying = True
        try:
            await self.run_quietly(
                session, Job("", Outbox(limit=2), feed=tokens, reset=session.state_position == 0, replay=True)
            )
        finally:
            session.replaying = False

    async def run_quietly(self, session: Session, job: Job) -> None:
        """Submit `job` and wait until it has absorbed all its input (its events are not needed);
        ABORTED if it was cancelled first (a stream took the session over)."""
        self.submit(session, job)
        try:
            async for event in job.outbox.events():
                if isinstance(event, FinishedEvent):
                    break
        finally:
            job.cancel()
        if event.reason is FinishReason.CANCELLED:
            raise Aborted(
                f"session {session.id} was taken over by a stream before this request ran; retry it"
            )

    def _end(self, session: Session, reason: str) -> None:
        """Remove a session, end its stream, and free its state (between iterations)."""
        if session.closed:
            return
        self.store.remove(session, expired=reason == "expired")
        if reason == "moved":  # the session lives on, held by another server
            error: Exception = Unavailable(
                f"session {session.id} is now held by another server; retry (resume() does), and the "
                f"router sends the call there"
            )
        else:
            self.durability.deleted(session, expired=reason == "expired")
            error = NotFound(f"session {session.id} was {'deleted' if reason == 'deleted' else reason}")
        if session.driver is not None:
            session.driver.end(error)
        if not session.stranded:
            runtime = self.runtime(session)
            runtime.scheduler.wake()
            runtime.residency.release(session)
        self.metrics.session_ended(reason, time.time() - session.created_at)

    def _count_sessions(self) -> None:
        """Sessions and their states' bytes by location, for the gauges."""
        pools = {r.version: r.pool for r in self.registry.runtimes()}
        sessions = list(self.store)
        on_device = sum(1 for s in sessions if s.on_device)
        self.metrics.count_sessions(
            on_device,
            len(sessions) - on_device,
            sum(p.capacity * p.state_bytes_per_slot for p in pools.values()),
            sum(
                pools[s.version].state_bytes_per_slot
                for s in sessions
                if not s.on_device and s.version in pools
            ),
        )

    async def _sweep_forever(self) -> None:
        while True:
            try:
                now = time.time()
                for session in self.store.due_to_expire(now):
                    self._end(session, "expired")
                self._count_sessions()
            except Exception:  # keep sweeping; one bad session must not stop expiry for all
                log.exception("expiry sweep failed")
            await asyncio.sleep(EXPIRY_INTERVAL)
