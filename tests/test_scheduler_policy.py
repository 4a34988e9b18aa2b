"""The scheduler's batching policy, in process: a real state pool and residency, a fake backend.

The backend's state for a session counts the tokens it absorbed since the zero state, and its
logits make next_token(count) certain, so every token, position and logprob is known in
advance. `on_record` (called once per iteration, before the step) shows which sessions ran,
from which position, with which tokens.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from server import tokenizer
from server.engine.scheduler import Scheduler, StepStats
from server.errors import ResourceExhausted, Unavailable
from server.kernels.state_pool import StatePool
from server.model import ModelConfig, State
from server.sampling import SamplingParams
from server.sessions.jobs import (
    ErrorEvent,
    Event,
    FinishedEvent,
    FinishReason,
    GenerateSpec,
    Job,
    Outbox,
    TokenEvent,
)
from server.sessions.residency import DeviceResidency
from server.sessions.store import Session

V = tokenizer.VOCAB_SIZE
CERTAIN = 100.0  # the logit of the next token; every other one is 0
ZERO_LOGPROB = -math.log(V)  # any token's logprob under all-zero logits


def next_token(count: int) -> int:
    """The token the backend makes certain after `count` absorbed tokens: 'a', 'b', ..."""
    return ord("a") + count % 26


class CountingBackend:
    """StepBackend-like: h[0, slot, 0] counts the tokens absorbed since the zero state."""

    name, dtype = "counting", torch.float32

    def __init__(self, pool: StatePool) -> None:
        self.pool = pool
        self.steps: list[tuple[list[int], list[int]]] = []  # (tokens, slots) of every sub-step
        self.fail = False

    def step(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("a bug in the backend")
        self.steps.append((tokens.tolist(), slots.tolist()))
        h = self.pool.read(slots.tolist()).h + 1  # [1, B, 1]
        self.pool.write(slots.tolist(), State(h, None))
        counts = h[0, :, 0].long().tolist()
        logits = torch.zeros(len(counts), V)
        logits[torch.arange(len(counts)), [next_token(c) for c in counts]] = CERTAIN
        return logits  # [B, V]


@dataclass
class Harness:
    sched: Scheduler
    backend: CountingBackend
    iterations: list[list[tuple[str, int, list[int]]]] = field(default_factory=list)  # from on_record
    stats: list[StepStats] = field(default_factory=list)

    def record(self, entries: list[tuple[Session, int, list[int]]]) -> None:
        self.iterations.append([(s.id, position, list(tokens)) for s, position, tokens in entries])

    def ran(self, session: Session) -> list[tuple[int, list[int]]]:
        """(position, tokens) of each iteration `session` ran in."""
        return [(p, t) for entries in self.iterations for sid, p, t in entries if sid == session.id]

    def count(self, session: Session) -> int:
        """Tokens in `session`'s state since its zero state."""
        return int(self.backend.pool.read(session.slot).h[0, 0, 0])

    async def run(self, *sessions: Session) -> None:
        """Start the loop (if it is not running) and wait until `sessions` have no work left."""
        if self.sched._task is None:
            self.sched.start()
        await asyncio.wait_for(asyncio.gather(*(self.sched.settle(s) for s in sessions)), 5)


@pytest.fixture
async def harness():
    made: list[Scheduler] = []

    def build(
        max_batch_size: int = 8, max_queue: int = 100, prefill_chunk: int = 64, classify=None
    ) -> Harness:
        pool = StatePool(ModelConfig(cell="rnn", layers=1, hidden=1, embed=1), "cpu", 4, 16)
        backend = CountingBackend(pool)
        sched = Scheduler(
            backend,
            DeviceResidency(pool),
            max_batch_size,
            max_queue,
            prefill_chunk,
            classify=classify,
            labels={"count": ("tokens",)},
        )
        h = Harness(sched, backend)
        sched.on_iteration, sched.on_record = h.stats.append, h.record
        made.append(sched)
        return h

    yield build
    for sched in made:
        await sched.stop()


def session(name: str) -> Session:
    return Session(name, "owner", "m", "v", 1, 60.0, 0.0, 0.0, logits=np.zeros(V, dtype=np.float32))


def gen(n: int, outbox: Outbox | None = None) -> Job:
    spec = GenerateSpec(n, SamplingParams(temperature=0), ignore_eos=True)
    return Job(f"gen{n}", outbox or Outbox(limit=1000), generate=spec)


def feed(tokens: list[int], outbox: Outbox | None = None, **options) -> Job:
    return Job("feed", outbox or Outbox(limit=1000), feed=list(tokens), **options)


def drain(outbox: Outbox) -> list[Event]:
    """The events queued so far, without waiting."""
    events = []
    while not outbox._queue.empty():
        events.append(outbox._queue.get_nowait())
    return events


def tokens_of(events: list[Event]) -> list[int]:
    return [e.token for e in events if isinstance(e, TokenEvent)]


def finished(events: list[Event]) -> FinishedEvent:
    assert isinstance(events[-1], FinishedEvent), events[-1]
    return events[-1]


async def test_classification_comes_after_the_whole_input_batched_and_moves_nothing(harness):
    calls: list[list[float]] = []

    def classify(h: torch.Tensor) -> dict[str, torch.Tensor]:  # the "head": the token count itself
        calls.append(h[:, 0].tolist())
        return {"count": h[:, :1]}

    h = harness(prefill_chunk=2, classify=classify)
    a, b = session("A"), session("B")
    long_feed = feed([97] * 5, classify=True)  # three iterations: 2 + 2 + 1 tokens
    h.sched.submit(a, long_feed)
    h.sched.submit(b, feed([98]))
    await h.run(a, b)
    asked = Job("ask", Outbox(limit=10), classify=True)  # no input: the state as it is
    h.sched.submit(b, asked)
    await h.run(b)
    assert calls == [[5.0], [1.0]]  # once per request, when its input is all absorbed
    events = drain(long_feed.outbox)
    assert [type(e).__name__ for e in events] == ["ClassificationEvent", "FinishedEvent"]
    assert events[0].position == 5 and events[0].heads[0].probabilities == [5.0]
    answer, done = drain(asked.outbox)
    assert answer.position == 1 and answer.heads[0].name == "count" and answer.heads[0].labels == ("tokens",)
    assert done.reason == FinishReason.FED and done.fed_tokens == 0 and b.position == 1
    assert h.ran(b) == [(0, [98])]  # the classify-only iteration logged nothing and stepped nothing
    assert h.count(b) == 1


async def test_more_ready_sessions_than_the_batch_take_turns(harness):
    h = harness(max_batch_size=2)
    sessions = [session(name) for name in "ABCD"]
    jobs = [gen(3) for _ in sessions]
    for s, job in zip(sessions, jobs):
        h.sched.submit(s, job)
    await h.run(*sessions)
    order = [[sid for sid, _, _ in entries] for entries in h.iterations]
    assert order == [["A", "B"], ["C", "D"]] * 3
    for s, job in zip(sessions, jobs):
        events = drain(job.outbox)
        assert tokens_of(events) == [0, next_token(1), next_token(2)]  # zero logits: argmax 0
        assert finished(events).reason == FinishReason.LENGTH and s.position == 3
    assert [st.rows for st in h.stats] == [2] * 6 and h.sched.queued == 0
    assert [len(st.queue_wait) for st in h.stats] == [2, 2, 0, 0, 0, 0]  # each job's first step only
    assert all(0 <= wait < 5 for wait in h.stats[1].queue_wait)


async def test_a_sessions_jobs_run_fifo_one_per_iteration(harness):
    h = harness(max_batch_size=4)
    a, b = session("A"), session("B")
    shared = Outbox(limit=1000)
    j1, j2, j3 = feed([97, 98], shared), gen(2, shared), feed([99], shared)
    for job in (j1, j2, j3):
        h.sched.submit(a, job)
    h.sched.submit(b, gen(4))
    await h.run(a, b)
    assert h.ran(a) == [(0, [97, 98]), (2, [next_token(2)]), (3, [next_token(3)]), (4, [99])]
    assert [len(entries) for entries in h.iterations] == [2, 2, 2, 2]  # b ran beside every one
    events = drain(shared)
    kinds = [(e.request_id, type(e).__name__) for e in events]
    assert kinds == [
        ("feed", "FinishedEvent"),
        ("gen2", "TokenEvent"),
        ("gen2", "TokenEvent"),
        ("gen2", "FinishedEvent"),
        ("feed", "FinishedEvent"),
    ]
    assert [e.position for e in events if isinstance(e, FinishedEvent)] == [2, 4, 5]


async def test_a_long_feed_absorbs_a_chunk_per_iteration_while_others_generate(harness):
    h = harness(max_batch_size=2, prefill_chunk=4)
    long, other = session("L"), session("G")
    prompt = [97] + [next_token(c) for c in range(1, 10)]  # each one the certain next token
    fed, generating = feed(prompt, return_logprobs=True), gen(5)
    h.sched.submit(long, fed)
    h.sched.submit(other, generating)
    await h.run(long, other)
    assert h.ran(long) == [(0, prompt[:4]), (4, prompt[4:8]), (8, prompt[8:])]
    assert [p for p, _ in h.ran(other)] == [0, 1, 2, 3, 4]  # a token every iteration
    assert [(st.steps, st.fed, st.generated) for st in h.stats] == [(4, 4, 1), (4, 4, 1), (2, 2, 1)] + [
        (1, 0, 1)
    ] * 2
    slot_l, slot_g = long.slot, other.slot
    assert h.backend.steps[:4] == [
        ([97, 0], [slot_l, slot_g]),
        ([98], [slot_l]),
        ([99], [slot_l]),
        ([100], [slot_l]),
    ]
    events = drain(fed.outbox)
    logprobs = [e.logprob for e in events if isinstance(e, TokenEvent)]
    assert [e.position for e in events if isinstance(e, TokenEvent)] == list(range(1, 11))
    assert logprobs[0] == pytest.approx(ZERO_LOGPROB) and logprobs[1:] == pytest.approx([0] * 9, abs=1e-9)
    assert finished(events).reason == FinishReason.FED and h.count(long) == 10


async def test_a_reset_job_starts_from_position_0_and_the_zero_state(harness):
    h = harness(prefill_chunk=2)
    s = session("S")
    h.sched.submit(s, feed([97, 98, 99]))
    reset = feed(
        [tokenizer.BOS, next_token(1), next_token(2)], return_logprobs=True, top_logprobs=2, reset=True
    )
    h.sched.submit(s, reset)
    after = gen(1)
    h.sched.submit(s, after)
    await h.run(s)
    # the reset's second chunk goes on from where its first left (no second reset)
    assert h.ran(s) == [
        (0, [97, 98]),
        (2, [99]),
        (0, [tokenizer.BOS, next_token(1)]),
        (2, [next_token(2)]),
        (3, [next_token(3)]),
    ]
    events = [e for e in drain(reset.outbox) if isinstance(e, TokenEvent)]
    assert [e.position for e in events] == [1, 2, 3]
    # <bos> from zero logits, not from the logits the session had (which made 'd' certain)
    assert [e.logprob for e in events] == pytest.approx([ZERO_LOGPROB, 0, 0], abs=1e-9)
    assert [e.top_logprobs[0][0] for e in events] == [next_token(1), next_token(2), next_token(3)]
    assert tokens_of(drain(after.outbox)) == [next_token(3)]
    assert s.position == s.state_position == 4 and h.count(s) == 4
    assert s.history == [tokenizer.BOS, next_token(1), next_token(2), next_token(3)]


@pytest.mark.parametrize("when", ["between iterations", "during a step"])
async def test_a_cancelled_job_ends_at_its_next_step_and_the_next_job_runs(harness, when):
    h = harness()
    s = session("S")
    endless, then = gen(100), feed([97])

    def cancel_after_two(stats: StepStats) -> None:
        h.stats.append(stats)
        if len(h.stats) == 2:
            endless.cancel()

    def cancel_in_second(entries) -> None:
        h.record(entries)
        if len(h.iterations) == 2:
            endless.cancel()

    if when == "between iterations":
        h.sched.on_iteration = cancel_after_two
    else:
        h.sched.on_record = cancel_in_second
    h.sched.submit(s, endless)
    h.sched.submit(s, then)
    await h.run(s)
    events = drain(endless.outbox)
    assert tokens_of(events) == [0, next_token(1)]
    assert finished(events).reason == FinishReason.CANCELLED and finished(events).position == 2
    assert h.ran(s) == [(0, [0]), (1, [next_token(1)]), (2, [97])]
    assert finished(drain(then.outbox)).reason == FinishReason.FED and s.position == 3
    assert h.sched.queued == 0


async def test_a_full_queue_refuses_with_queue_full(harness):
    h = harness(max_queue=2)
    a, b = session("A"), session("B")
    h.sched.submit(a, gen(1))
    h.sched.submit(b, gen(1))
    with pytest.raises(ResourceExhausted) as err:
        h.sched.submit(a, gen(1))
    assert err.value.reason == "queue_full" and h.sched.queued == 2
    await h.run(a, b)
    assert h.sched.queued == 0
    h.sched.submit(a, gen(1))  # room again
    await h.run(a)


async def test_a_session_whose_outbox_is_full_waits_until_it_drains(harness):
    h = harness(max_batch_size=2)
    paused, other = session("P"), session("Q")
    slow = gen(5, Outbox(limit=2))
    h.sched.submit(paused, slow)
    h.sched.submit(other, gen(5))
    await h.run(other)
    assert slow.generated == 2 and paused.scheduled and len(h.ran(paused)) == 2
    iterations = len(h.iterations)
    await asyncio.sleep(0.05)
    assert len(h.iterations) == iterations  # nothing runs while it waits (no busy loop)
    events = []
    while not slow.done:
        events += drain(slow.outbox)
        h.sched.wake()  # what the outbox's reader does once it has room
        await asyncio.sleep(0.001)
    await h.run(paused)
    events += drain(slow.outbox)
    assert tokens_of(events) == [0] + [next_token(c) for c in range(1, 5)]
    assert finished(events).reason == FinishReason.LENGTH and paused.position == 5


async def test_when_the_log_refuses_the_tokens_no_state_moves_and_the_jobs_fail(harness):
    h = harness()
    a, b = session("A"), session("B")
    h.sched.submit(a, feed([97]))
    h.sched.submit(b, feed([97]))
    await h.run(a, b)
    before = {s.id: (s.position, s.state_position, list(s.history), s.logits.copy()) for s in (a, b)}
    refused = Unavailable("the state dir refused the tokens")
    calls = []

    def refuse(entries) -> None:
        calls.append([(s.id, position, list(tokens)) for s, position, tokens in entries])
        raise refused

    h.sched.on_record = refuse
    jobs = {a.id: gen(3), b.id: feed([98, 99])}
    h.sched.submit(a, jobs[a.id])
    h.sched.submit(b, jobs[b.id])
    await h.run(a, b)
    assert calls == [[("A", 1, [next_token(1)]), ("B", 1, [98, 99])]]
    for s in (a, b):
        position, state_position, history, logits = before[s.id]
        assert (s.position, s.state_position, s.history) == (position, state_position, history)
        assert np.array_equal(s.logits, logits) and h.count(s) == 1
        job = jobs[s.id]
        assert job.done and job.fed == job.generated == 0
        assert drain(job.outbox) == [ErrorEvent(refused)]
    assert (h.stats[-1].rows, h.stats[-1].steps, h.stats[-1].fed, h.stats[-1].generated) == (2, 0, 0, 0)
    assert h.sched.queued == 0
    h.sched.on_record = h.record  # the log takes tokens again: the sessions go on where they were
    again = gen(1)
    h.sched.submit(a, again)
    await h.run(a)
    assert tokens_of(drain(again.outbox)) == [next_token(1)] and a.position == 2


async def test_a_failing_step_cancels_its_batch_and_the_loop_goes_on(harness, caplog):
    h = harness()
    s = session("S")
    h.sched.submit(s, feed([97]))
    await h.run(s)
    h.backend.fail = True
    broken = gen(2)
    h.sched.submit(s, broken)
    await h.run(s)
    assert finished(drain(broken.outbox)).reason == FinishReason.CANCELLED and h.stats[-1].steps == 0
    assert "step failed; cancelling the 1 requests" in caplog.text
    h.backend.fail = False
    fine = gen(1)
    h.sched.submit(s, fine)
    await h.run(s)
    assert finished(drain(fine.outbox)).reason == FinishReason.LENGTH


def test_rows_that_did_not_run_leave_the_logprobs_of_the_others_alone():
    """A row whose session could not be made resident is left out of the step: the logprob of
    each row that ran still comes from its own logits before the iteration."""
    from server.engine.runner import Row, StepBatch, StepOutput, SubStep
    from server.sampling import log_softmax

    sessions = [session(name) for name in "ABC"]
    for n, s in enumerate(sessions):
        s.logits = np.zeros(V, dtype=np.float32)
        s.logits[next_token(n)] = CERTAIN / 10 * (n + 1)  # a different distribution per row
    jobs = [feed([next_token(n)], return_logprobs=True) for n in range(3)]
    batch = StepBatch([Row(s, job, list(job.feed), 0, False) for s, job in zip(sessions, jobs)])
    Scheduler._sample(batch)
    before = batch.before.copy()
    rows = [batch.rows[0], batch.rows[2]]  # B did not run
    after = np.zeros((2, V), dtype=np.float32)
    substep = SubStep([0, 1], np.array([next_token(0), next_token(2)]), after)
    Scheduler._absorb(batch, StepOutput(rows, [0, 2], [substep]))
    expected = log_softmax(before[[0, 2]])[[0, 1], [next_token(0), next_token(2)]]
    assert [rows[0].absorbed[0].logprob, rows[1].absorbed[0].logprob] == expected.tolist()
    assert expected[1] > expected[0] > ZERO_LOGPROB  # C's logits, not B's (the row after A)
    assert batch.rows[1].absorbed == []
