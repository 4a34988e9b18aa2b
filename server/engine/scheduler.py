"""Continuous batching: one loop per model turns every session's pending work into batched steps.

Each iteration takes up to max_batch_size sessions that have a job (round-robin; at most
one job per session, FIFO within it; a session whose client stopped reading is skipped),
samples the next token of every generating row from its stored logits in one batch, then,
in the step thread:
  1. makes their states resident in the device pool and logs the iteration's tokens (with a
     state dir; if the log refuses them, no state moves and the requests end UNAVAILABLE),
  2. runs batched steps: sub-step 0 holds every row; a row that is feeding a prompt goes on
     for up to `prefill_chunk` tokens in the following sub-steps, so a long prompt moves fast
     yet delays the others' next token by a bounded amount,
  3. records each session's new state position, history and logits (with its state, so a
     snapshot between iterations is consistent),
and back on the event loop computes the logprobs and hands each job its absorbed tokens.
Pool operations (fork, reset, export, import, free) also run in the step thread, between
iterations. The event loop keeps only light numpy work: the step thread holds the GIL as
little as it can, since the event loop's gRPC writes need it too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from server.errors import ResourceExhausted, Unavailable
from server.kernels import StepBackend
from server.sampling import sample
from server.sessions.jobs import FinishReason, Job
from server.sessions.residency import DeviceResidency
from server.sessions.store import Session

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Row:
    """One session's part of an iteration."""

    session: Session
    job: Job
    tokens: list[int]  # to absorb: a prompt chunk, or filled with the sampled token
    position: int  # the session's position before this iteration
    generating: bool  # the tokens are sampled, not fed
    absorbed: list[tuple[int, float, tuple]] = field(default_factory=list)  # (token, logprob, top)


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
        on_record: Callable[[list[tuple[Session, int, list[int]]]], None] = lambda entries: None,
    ) -> None:
        self.backend = backend
        self.residency = residency
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.on_iteration = on_iteration
        # step thread, before the step: (session, start position, tokens) per row, for the log;
        # raises Unavailable if they cannot be recorded, and then no state moves
        self.on_record = on_record
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="step")
        self._ready: deque[Session] = deque()
        self._queued = 0  # jobs submitted and not finished
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._submitted_at: dict[int, float] = {}  # id(job) -> when it was submitted
        self._settle_waiters: dict[str, list[asyncio.Future]] = {}  # session id -> settle() calls

    # ---- the public surface --------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        """Finish the running iteration, then stop; the step thread ends after pending pool ops."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    def submit(self, session: Session, job: Job) -> None:
        """Queue `job` behind `session`'s earlier ones; RESOURCE_EXHAUSTED when the queue is full."""
        if self._queued >= self.max_queue:
            raise ResourceExhausted(
                f"the model's request queue is full ({self.max_queue} requests); retry later", "queue_full"
            )
        self._queued += 1
        self._submitted_at[id(job)] = time.perf_counter()
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

    async def in_step_thread(self, fn: Callable[..., T], *args: object) -> T:
        """Run a pool operation in the step thread, between iterations."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

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
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            rows = self._plan()
            if not rows:
                await self._wake.wait()
                continue
            started = time.perf_counter()
            try:
                before = self._sample(rows)
                runnable, outputs = await loop.run_in_executor(self.executor, self._execute, rows)
                self._record(runnable, before, outputs)
            except Unavailable as e:  # the log refused this iteration's tokens: no state moved
                for row in rows:
                    row.job.fail(e)
                outputs = []
            except Exception:  # a bug, not bad input: keep serving the other sessions
                log.exception("step failed; cancelling the %d requests of this batch", len(rows))
                for row in rows:
                    row.job.cancel()
                outputs = []
            steps, seconds = len(outputs), time.perf_counter() - started
            waits = [
                started - self._submitted_at.get(id(r.job), started)
                for r in rows
                if r.job.fed + r.job.generated == 0
            ]
            generated = sum(len(r.absorbed) for r in rows if r.generating)
            fed = sum(len(r.absorbed) for r in rows) - generated
            self._deliver(rows)
            self.on_iteration(StepStats(len(rows), steps, seconds, waits, fed, generated))

    def _plan(self) -> list[Row]:
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
                position = 0 if job.reset and job.fed == 0 else session.position
                rows.append(Row(session, job, tokens, position, generating=not job.feeding))
        self._ready.extendleft(reversed(waiting))
        return rows

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
        job = session.jobs.popleft()
        self._queued -= 1
        self._submitted_at.pop(id(job), None)

    def _deliver(self, rows: list[Row]) -> None:
        """Hand each job its absorbed tokens (on the event loop), then requeue its session."""
        for row in rows:
            session, job = row.session, row.job
            if row.absorbed and job.reset and job.fed == 0:
                session.position = 0
            for token, logprob, top in row.absorbed:
                session.position += 1
                job.absorbed(token, logprob, session.position, top, session.durable_position)
            if row.absorbed:
                session.touch()
            if job.cancelled and not job.done:
                job.finish(FinishReason.CANCELLED, session.position, session.durable_position)
            if job.done and session.jobs and session.jobs[0] is job:
                self._retire(session)
            if session.jobs:  # closed sessions too: _plan retires their jobs
                session.scheduled = False
                self._mark_ready(session)
            else:
                self._unschedule(session)

    def _sample(self, rows: list[Row]) -> dict[int, np.ndarray]:
        """Draw the next token of every generating row, as one batch; returns each row's
        logits before this iteration (by id(row)), for the logprobs of what it absorbs."""
        gen = [r for r in rows if r.generating]
        if gen:
            specs = [r.job.generate.sampling for r in gen]
            chosen = sample(
                np.stack([r.session.logits for r in gen]),
                np.array([r.session.seed for r in gen], dtype=np.uint64),
                np.array([r.position for r in gen], dtype=np.int64),
                np.array([s.temperature for s in specs]),
                np.array([s.top_k for s in specs]),
                np.array([s.top_p for s in specs]),
            )
            for row, token in zip(gen, chosen.tolist()):
                row.tokens = [token]
        return {
            id(r): np.zeros_like(r.session.logits) if r.job.reset and r.job.fed == 0 else r.session.logits
            for r in rows
        }

    # ---- the step thread -------------------------------------------------------------------

    def _execute(self, rows: list[Row]) -> tuple[list[Row], list[tuple[list[int], np.ndarray, np.ndarray]]]:
        """Step thread: residency and the batched steps of one iteration.

        Returns the rows that ran and, per sub-step, (row indices, tokens, logits [A, V]).
        Each session's state position, history and logits are updated here, with its state,
        so that a snapshot taken between iterations is consistent.
        """
        pinned = {row.session.id for row in rows}
        runnable = [
            r for r in rows if not r.session.closed and self.residency.make_resident(r.session, pinned)
        ]
        self.on_record([(row.session, row.position, row.tokens) for row in runnable if not row.job.replay])
        for row in runnable:
            if row.job.reset and row.job.fed == 0:
                self.residency.reset(row.session)
        outputs = []
        for j in range(max((len(r.tokens) for r in runnable), default=0)):
            active = [i for i, r in enumerate(runnable) if len(r.tokens) > j]
            tokens = np.array([runnable[i].tokens[j] for i in active], dtype=np.int64)
            slots = np.array([runnable[i].session.slot for i in active], dtype=np.int64)
            logits = (
                self.backend.step(torch.from_numpy(tokens), torch.from_numpy(slots)).cpu().numpy()
            )  # [A, V]
            outputs.append((active, tokens, logits))
            for n, i in enumerate(active):
                runnable[i].session.logits = logits[n]
        for row in runnable:
            row.session.remember(row.position, row.tokens)
        return runnable, outputs

    # ---- back on the event loop ---------------------------------------------------------------

    @staticmethod
    def _record(rows: list[Row], before: dict[int, np.ndarray], outputs: list) -> None:
        """Give each row its absorbed (token, logprob, top alternatives), sub-step by sub-step."""
        if not rows:
            return
        prev = np.stack(
            [before[id(r)] for r in rows]
        )  # [R, V]: the logits each absorbed token was drawn from
        for active, tokens, logits in outputs:
            logprobs = log_softmax(prev[active])[np.arange(len(active)), tokens].tolist()
            for n, (i, token) in enumerate(zip(active, tokens.tolist())):
                job = rows[i].job
                top = (
                    top_logprobs(logits[n], job.top_logprobs)
                    if job.return_logprobs and job.top_logprobs
                    else ()
                )
                rows[i].absorbed.append((token, logprobs[n], top))
            prev[active] = logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of [N, V] logits, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def top_logprobs(logits: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The k likeliest next tokens of one row [V], best first, with their log-probabilities."""
    logprobs = log_softmax(logits[None])[0]
    best = np.argsort(-logprobs, kind="stable")[:k]
    return tuple(zip(best.tolist(), logprobs[best].tolist()))
