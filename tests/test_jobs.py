"""A job's events in process: tokens batched by stream_interval, and flushed when it finishes."""

from __future__ import annotations

from server.sampling import SamplingParams
from server.sessions.jobs import (
    FinishedEvent,
    FinishReason,
    GenerateSpec,
    Job,
    Outbox,
    TokenBatchEvent,
    TokenEvent,
)


def events_of(outbox: Outbox) -> list:
    return [outbox._queue.get_nowait() for _ in range(outbox._queue.qsize())]


def generating_job(interval: int, max_tokens: int = 10) -> Job:
    spec = GenerateSpec(max_tokens, SamplingParams(temperature=0), ignore_eos=True, stream_interval=interval)
    return Job("g", Outbox(limit=100), generate=spec)


def absorb(job: Job, count: int, start: int = 1) -> None:
    for position in range(start, start + count):
        job.absorbed(65, -0.5, position)


def test_tokens_come_n_at_a_time_and_the_rest_before_finished():
    job = generating_job(4)
    absorb(job, 10)
    events = events_of(job.outbox)
    assert [type(e) for e in events] == [TokenBatchEvent, TokenBatchEvent, TokenBatchEvent, FinishedEvent]
    assert [[t.position for t in e.tokens] for e in events[:3]] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert events[3].reason is FinishReason.LENGTH and events[3].generated_tokens == 10


def test_a_cancelled_job_sends_what_it_absorbed_before_its_finished_event():
    job = generating_job(4)
    absorb(job, 6)
    job.finish(FinishReason.CANCELLED, 6)
    events = events_of(job.outbox)
    assert [len(e.tokens) for e in events[:2]] == [4, 2] and events[2].reason is FinishReason.CANCELLED


def test_an_interval_of_one_sends_single_token_events():
    job = generating_job(1, max_tokens=3)
    absorb(job, 3)
    assert [type(e) for e in events_of(job.outbox)] == [TokenEvent, TokenEvent, TokenEvent, FinishedEvent]
