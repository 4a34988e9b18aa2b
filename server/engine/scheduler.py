"""Continuous batching: one loop per model turns every session's pending work into batched steps.

Each iteration runs in three typed phases (the records are in runner.py), one after the other
on the engine core's one thread, to the end before anything else runs:
  plan() -> StepBatch: up to max_batch_size sessions that have a job
     (round-robin; at most one job per session, FIFO within it; a session whose client
     stopped reading is skipped); a row feeding a prompt takes up to `prefill_chunk` tokens
     of it, so a long prompt moves fast yet delays the others' next token by a bounded amount.
     Then the next token of every generating row is sampled from its stored logits, in one
     batch.
  Runner.execute(batch) -> StepOutput: residency, logging the tokens
     (with a state dir; if the log refuses them, no state moves and the requests end
     UNAVAILABLE), resets, the batched sub-steps, and each session's new state position,
     history and logits (with its state, so a snapshot between iterations is consistent).
  update(batch, output): the logprobs of what each row absorbed, handed to its job; the
     sessions requeued; the iteration's stats reported.
Between iterations the loop yields once: the iteration's events leave (one frame to the front
end), and the commands that arrived meanwhile are taken. Pool operations (fork, reset,
export, import, free) run then too, so none ever overlaps a step: no lock, no thread hand-off
(the engine core process has no gRPC beside it: its thread is the step's).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from server.engine.runner import Absorbed, ClassifyFn, RecordFn, Row, Runner, StepBatch, StepOutput
from server.errors import ResourceExhausted, Unavailable
from server.kernels import StepBackend
from server.sampling import log_softmax, sample, top_logprobs
from server.sessions.jobs import FinishReason, Job
from server.sessions.residency import DeviceResidency
from server.sessions.store import Session

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class StepStats:
    """What one iteration did, for metrics."""

    rows: int
    steps: int
    seconds: float
    queue_wait: list[float]  # of the requests that got their first step
    fed: int  # tokens absorbed from input
    generated: int  # tokens sampled and absorbed


class Scheduler:
    def __init__(
        self,
        backend: StepBackend,
        residency: DeviceResidency,
        max_batch_size: int,
        max_queue: int,
        prefill_chunk: int,
        on_iteration: Callable[[StepStats], None] = lambda stats: None,
        on_record: RecordFn = lambda entries: None,
        classify: ClassifyFn | None = None,
        labels: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.backend = backend
        self.residency = residency
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.on_iteration = on_iteration
        self.runner = Runner(backend, residency, on_record, classify, labels)
        self._ready: deque[Session] = deque()
        self._queued = 0  # jobs submitted and not finished
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._settle_waiters: dict[str, list[asyncio.Future]] = {}  # session id -> settle() calls

    # ---- the public surface --------------------------------------------------------------

    @property
    def on_record(self) -> RecordFn:
        """Step thread, before the step: (session, start position, tokens) per row, for the log;
        raises Unavailable if they cannot be recorded, and then no state moves."""
        return self.runner.on_record

    @on_record.setter
    def on_record(self, fn: RecordFn) -> None:
        self.runner.on_record = fn

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        """Finish the running iteration, then stop."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def submit(self, session: Session, job: Job) -> None:
        """Queue `job` behind `session`'s earlier ones; RESOURCE_EXHAUSTED when the queue is full."""
        if self._queued >= self.max_queue:
            raise ResourceExhausted(
                f"the model's request queue is full ({self.max_queue} requests); retry later", "queue_full"
            )
        self._queued += 1
        job.submitted_at = time.perf_counter()
        session.jobs.append(job)
        self._mark_ready(session)

    def wake(self) -> None:
        self._wake.set()

    async def settle(self, session: Session) -> None:
        """Wait until `session` has no job queued or running (e.g. a cancelled one's last step)."""
        if session.idle:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._settle_waiters.setdefault(session.id, []).append(waiter)
        await waiter

    async def between_iterations(self, fn: Callable[..., T], *args: object) -> T:
        """Run a pool operation: called from the loop, it runs between iterations (an iteration
        runs to its end before the loop takes anything else)."""
        return fn(*args)

    @property
    def queued(self) -> int:
        return self._queued

    # ---- the loop ------------------------------------------------------------------------

    def _mark_ready(self, session: Session) -> None:
        if not session.scheduled:
            session.scheduled = True
            self._ready.append(session)
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            batch = self.plan()
            if not batch.rows:
                await self._wake.wait()
                continue
            try:
                self._sample(batch)
                output = self.runner.execute(batch)
            except Exception as e:  # handled by update: the requests of this batch end
                output = StepOutput(error=e)
            self.update(batch, output)
            await asyncio.sleep(0)  # the events leave, new commands come in

    # ---- plan: which sessions run --------------------------------------------------------

    def plan(self) -> StepBatch:
        """Up to max_batch_size sessions with runnable jobs, in round-robin order."""
        rows: list[Row] = []
        waiting: list[Session] = []
        limit = min(self.max_batch_size, self.residency.pool.max_slots)
        while self._ready and len(rows) < limit:
            session = self._ready.popleft()
            job = self._current_job(session)
            if job is None:
                self._unschedule(session)
            elif not job.outbox.has_room():
                waiting.append(session)  # its client is not reading: pause it
            else:
                tokens = job.feed_chunk(self.prefill_chunk) if job.feeding else []
                position = 0 if job.starts_over else session.position
                generating = job.generate is not None and not job.feeding
                rows.append(Row(session, job, tokens, position, generating))
        self._ready.extendleft(reversed(waiting))
        return StepBatch(rows)

    def _current_job(self, session: Session) -> Job | None:
        """The session's first live job; cancelled ones are finished on the way."""
        while session.jobs:
            job = session.jobs[0]
            if not (job.cancelled or job.done or session.closed):
                return job
            job.finish(FinishReason.CANCELLED, session.position, session.durable_position)
            self._retire(session)
        return None

    def _unschedule(self, session: Session) -> None:
        """`session` has no work left: wake whoever waits for it to settle."""
        session.scheduled = False
        for waiter in self._settle_waiters.pop(session.id, []):
            if not waiter.done():
                waiter.set_result(None)

    def _retire(self, session: Session) -> None:
        session.jobs.popleft()
        self._queued -= 1

    @staticmethod
    def _sample(batch: StepBatch) -> None:
        """Note every row's logits before this iteration (zeros for a row starting over), for
        the logprobs of what it absorbs, and draw the next token of every generating row from
        them, as one batch."""
        rows = batch.rows
        logits = np.stack([r.session.logits for r in rows])  # [R, V]
        gen = [i for i, r in enumerate(rows) if r.generating]
        if gen:
            specs = [rows[i].job.generate.sampling for i in gen]
            chosen = sample(
                logits if len(gen) == len(rows) else logits[gen],
                np.array([rows[i].session.seed for i in gen], dtype=np.uint64),
                np.array([rows[i].position for i in gen], dtype=np.int64),
                np.array([s.temperature for s in specs]),
                np.array([s.top_k for s in specs]),
                np.array([s.top_p for s in specs]),
            )
            for i, token in zip(gen, chosen.tolist()):
                rows[i].tokens = [token]
        starting_over = [i for i, r in enumerate(rows) if r.job.starts_over]
        if starting_over:
            logits[starting_over] = 0
        batch.before = logits

    # ---- update: back on the event loop ----------------------------------------------------

    def update(self, batch: StepBatch, output: StepOutput) -> None:
        """Give each row its absorbed tokens with their logprobs, hand them to its job, requeue
        its session, and report the iteration's stats."""
        error = output.error
        if error is None:
            try:
                self._absorb(batch, output)
            except Exception as e:
                error = e
        if isinstance(error, Unavailable):  # the log refused this iteration's tokens: no state moved
            for row in batch.rows:
                row.job.fail(error)
        elif error is not None:  # a bug, not bad input: keep serving the other sessions
            log.error(
                "step failed; cancelling the %d requests of this batch", len(batch.rows), exc_info=error
            )
            for row in batch.rows:
                row.job.cancel()
        steps = 0 if error is not None else len(output.substeps)
        started, seconds = batch.started, time.perf_counter() - batch.started
        waits = [
            started - (started if r.job.submitted_at is None else r.job.submitted_at)
            for r in batch.rows
            if r.job.fed + r.job.generated == 0
        ]
        generated = sum(len(r.absorbed) for r in batch.rows if r.generating)
        fed = sum(len(r.absorbed) for r in batch.rows) - generated
        self._deliver(batch)
        self.on_iteration(StepStats(len(batch.rows), steps, seconds, waits, fed, generated))

    @staticmethod
    def _absorb(batch: StepBatch, output: StepOutput) -> None:
        """Give each row that ran its absorbed tokens, logprobs and top alternatives, sub-step by sub-step."""
        rows = output.rows
        if not rows:
            return
        # [R, V]: the logits each absorbed token was drawn from (overwritten sub-step by sub-step)
        prev = batch.before if len(rows) == len(batch.rows) else batch.before[output.ran]
        for sub in output.substeps:
            logprobs = log_softmax(prev[sub.active])[np.arange(len(sub.active)), sub.tokens].tolist()
            for n, (i, token) in enumerate(zip(sub.active, sub.tokens.tolist())):
                job = rows[i].job
                top = (
                    top_logprobs(sub.logits[n], job.top_logprobs)
                    if job.return_logprobs and job.top_logprobs
                    else ()
                )
                rows[i].absorbed.append(Absorbed(token, logprobs[n], top))
            prev[sub.active] = sub.logits

    def _deliver(self, batch: StepBatch) -> None:
        """Hand each job its absorbed tokens, then requeue its session."""
        for row in batch.rows:
            session, job = row.session, row.job
            if row.absorbed and job.starts_over:
                session.position = 0
            for a in row.absorbed:
                session.position += 1
                job.absorbed(a.token, a.logprob, session.position, a.top, session.durable_position)
            if row.absorbed:
                session.touch()
            if row.classified is not None and not job.done:
                job.classified(row.classified, session.position, session.durable_position)
            if job.cancelled and not job.done:
                job.finish(FinishReason.CANCELLED, session.position, session.durable_position)
            if job.done and session.jobs and session.jobs[0] is job:
                self._retire(session)
            if session.jobs:  # closed sessions too: plan retires their jobs
                session.scheduled = False
                self._mark_ready(session)
            else:
                self._unschedule(session)
