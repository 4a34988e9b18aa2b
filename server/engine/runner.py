"""One iteration's data, and the step's part of it.

The scheduler's phases hand each other typed records:
    plan()            -> StepBatch: a Row per session that runs
    sampling             fills each generating row's token and the batch's `before`
    Runner.execute    -> StepOutput: the rows that ran and one SubStep per batched step
    update               an Absorbed per token of each row, delivered to its job
The runner makes the rows' states resident, has their tokens logged (before the step: if the
log refuses them, nothing moves), resets the rows that start over, runs the backend's
batched sub-steps and records each session's new position, history and logits with its
state, so that a snapshot taken between iterations is consistent. Rows whose request asks
for a classification once its input is absorbed get it after the sub-steps, from the top
layer's h in the pool, all such rows in one batch per head.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from server.kernels import StepBackend
from server.sessions.jobs import HeadProbabilities, Job
from server.sessions.residency import DeviceResidency
from server.sessions.store import Session

# before the step: (session, start position, tokens) per row, for the log
RecordFn = Callable[[list[tuple[Session, int, list[int]]]], None]
# the top layer's h [B, H] -> each head's label probabilities [B, labels] (RecurrentLM.classify)
ClassifyFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class Absorbed(NamedTuple):  # one per token: a tuple builds in half the time of a frozen dataclass
    """One token a row absorbed, with the log-probability it had and the top alternatives after it."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Row:
    """One session's part of an iteration."""

    session: Session
    job: Job
    tokens: list[int]  # to absorb: a prompt chunk, or filled with the sampled token
    position: int  # where the state starts this iteration (0: from the zero state)
    generating: bool  # the tokens are sampled, not fed
    absorbed: list[Absorbed] = field(default_factory=list)
    classified: list[HeadProbabilities] | None = None  # the heads' answer after this iteration

    @property
    def classifies(self) -> bool:
        """Its request wants a classification, and this iteration absorbs the rest of its input."""
        job = self.job
        return job.classify and not self.generating and job.fed + len(self.tokens) == len(job.feed)


@dataclass
class StepBatch:
    """What plan() chose: at most one row per session, in round-robin order."""

    rows: list[Row]
    started: float = field(default_factory=time.perf_counter)  # for the queue wait and step time
    # [R, V] each row's logits before this iteration (zeros when starting over), set by sampling
    before: np.ndarray | None = None


@dataclass(frozen=True)
class SubStep:
    """One batched backend step: sub-step j holds the rows with more than j tokens."""

    active: list[int]  # indices into StepOutput.rows
    tokens: np.ndarray  # [A] int64, what they absorbed
    logits: np.ndarray  # [A, V] the next-token logits after it


@dataclass
class StepOutput:
    """What the step did: the rows that ran (resident and not closed) and their sub-steps."""

    rows: list[Row] = field(default_factory=list)
    ran: list[int] = field(default_factory=list)  # the rows' indices in StepBatch.rows
    substeps: list[SubStep] = field(default_factory=list)
    error: Exception | None = None  # the iteration failed (sampling, logging or a step)


class Runner:
    """Runs a planned batch (between iterations, where every pool operation runs too)."""

    def __init__(
        self,
        backend: StepBackend,
        residency: DeviceResidency,
        on_record: RecordFn = lambda entries: None,
        classify: ClassifyFn | None = None,
        labels: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.backend = backend
        self.residency = residency
        self.classify = classify  # None: the model has no classification heads
        self.labels = labels or {}  # head name -> its labels
        # raises Unavailable if the tokens cannot be recorded, and then no state moves
        self.on_record = on_record

    def execute(self, batch: StepBatch) -> StepOutput:
        """Residency, logging, resets and the batched steps of one iteration."""
        pinned = {row.session.id for row in batch.rows}
        ran = [
            i
            for i, r in enumerate(batch.rows)
            if not r.session.closed and self.residency.make_resident(r.session, pinned)
        ]
        rows = [batch.rows[i] for i in ran]
        self.on_record(
            [(row.session, row.position, row.tokens) for row in rows if row.tokens and not row.job.replay]
        )
        for row in rows:
            if row.job.starts_over:
                self.residency.reset(row.session)
        substeps = []
        for j in range(max((len(r.tokens) for r in rows), default=0)):
            active = [i for i, r in enumerate(rows) if len(r.tokens) > j]
            tokens = np.array([rows[i].tokens[j] for i in active], dtype=np.int64)
            slots = np.array([rows[i].session.slot for i in active], dtype=np.int64)
            logits = (
                self.backend.step(torch.from_numpy(tokens), torch.from_numpy(slots)).cpu().numpy()
            )  # [A, V]
            substeps.append(SubStep(active, tokens, logits))
            for n, i in enumerate(active):
                rows[i].session.logits = logits[n]
        for row in rows:
            row.session.remember(row.position, row.tokens)
        self._classify([row for row in rows if row.classifies])
        return StepOutput(rows, ran, substeps)

    def _classify(self, rows: list[Row]) -> None:
        """Each head on the rows' current top-layer h, in one batch."""
        if not rows or self.classify is None:
            return
        slots = torch.tensor([row.session.slot for row in rows], dtype=torch.int64)
        h = self.residency.pool.top_h(slots.to(self.residency.pool.device))  # [R, H]
        answers = {name: p.cpu().tolist() for name, p in self.classify(h).items()}  # name -> [R][labels]
        for i, row in enumerate(rows):
            row.classified = [
                HeadProbabilities(name, self.labels[name], probabilities[i])
                for name, probabilities in answers.items()
            ]
