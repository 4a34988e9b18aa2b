"""`stream_interval` (tokens per message) end to end: the wire, the client library, resume, the CLI.

The tokens never depend on the interval: each check compares a batched run with one token per
message from the same state and seed (ignore_eos, so every run has exactly max_tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from client import AsyncClient, Client, StatusError, TokenStream
from client.lstmserve.v1 import lstm_serve_pb2 as pb
from tests.stubs import connect, create, open_request

ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny"
N = 10  # tokens per request
SAMPLED = {"max_tokens": N, "temperature": 0.8, "ignore_eos": True}


def ids(stream: TokenStream) -> list[int]:
    return [t.id for t in stream]


def lstm_client(target: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", "--target", target, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        env=dict(os.environ),
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def batch_sizes(responses: list) -> list[int | str]:
    """Each event: a batch's size, or its kind."""
    kinds = [r.WhichOneof("event") for r in responses]
    return [len(r.tokens.tokens) if k == "tokens" else k for r, k in zip(responses, kinds, strict=True)]


def batched_tokens(responses: list) -> list[pb.Token]:
    return [t for r in responses if r.WhichOneof("event") == "tokens" for t in r.tokens.tokens]


@pytest.fixture
def client(server):
    with Client(server.target) as c:
        yield c


def test_the_wire_carries_batches_of_stream_interval_then_the_rest(server):
    stub = connect(server.target)

    def generate(interval: int) -> list[pb.GenerateResponse]:
        request = pb.GenerateRequest(
            model=TINY,
            prompt=pb.Input(text="hi"),
            seed=7,
            max_tokens=N,
            sampling=pb.SamplingOptions(temperature=0.8),
            ignore_eos=True,
            stream_interval=interval,
        )
        return list(stub.Generate(request, timeout=60))

    one, batched = generate(1), generate(4)
    assert batch_sizes(one) == ["token"] * N + ["finished"] and batch_sizes(generate(0)) == batch_sizes(one)
    assert batch_sizes(batched) == [4, 4, 2, "finished"]
    tokens = batched_tokens(batched)
    assert [(t.id, t.position) for t in tokens] == [(r.token.id, r.token.position) for r in one[:-1]]
    assert [t.position for t in tokens] == list(range(4, 4 + N))  # <bos>, "hi", then one each
    assert batched[-1].finished == one[-1].finished and batched[-1].finished.generated_tokens == N

    def stream(interval: int) -> list[pb.StreamResponse]:
        session = create(stub, TINY, seed=11)
        generate = pb.GenerateTokensRequest(
            max_tokens=N,
            sampling=pb.SamplingOptions(temperature=0.8),
            ignore_eos=True,
            stream_interval=interval,
        )
        requests = [open_request(session.id), pb.StreamRequest(request_id="g", generate=generate)]
        responses = [r for r in stub.Stream(iter(requests), timeout=60) if r.request_id == "g"]
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.id), timeout=30)
        return responses

    one, batched = stream(1), stream(4)
    assert batch_sizes(one) == ["token"] * N + ["finished"] and batch_sizes(batched) == [4, 4, 2, "finished"]
    assert [t.id for t in batched_tokens(batched)] == [r.token.id for r in one[:-1]]
    assert [t.position for t in batched_tokens(batched)] == list(range(2, 2 + N))
    assert batched[-1].finished.position == one[-1].finished.position == 1 + N


def test_the_library_yields_the_same_tokens_one_by_one(client):
    with client.create_session(TINY, seed=5) as a:
        a.feed("xy")
        with a.fork() as b, a.fork() as c:
            batched = a.generate(stream_interval=4, **SAMPLED)
            first = next(batched)
            assert len(batched.tokens) == 4 and batched.position == first.position + 3  # its message's
            tokens = [first, *batched]
            assert [t.id for t in tokens] == ids(b.generate(**SAMPLED))  # stream_interval=1
            assert [t.id for t in tokens] == ids(c.generate(stream_interval=3, **SAMPLED))
            assert (
                [t.position for t in tokens] == list(range(4, 4 + N)) == [t.position for t in batched.tokens]
            )
            assert batched.finished.generated_tokens == N and a.position == b.position == c.position == 3 + N
            # the session goes on from the same place
            assert ids(a.generate(stream_interval=2, **SAMPLED)) == ids(b.generate(**SAMPLED))

    temporary = client.generate("xy", model=TINY, seed=5, stream_interval=4, **SAMPLED)
    assert len(ids(temporary)) == N == temporary.finished.generated_tokens and temporary.session_id
    assert [t.id for t in temporary.tokens] == ids(client.generate("xy", model=TINY, seed=5, **SAMPLED))


def test_cancelling_a_batched_generation(client):
    with client.create_session(TINY) as s:
        stream = s.generate(ignore_eos=True, stream_interval=4)  # up to the server's limit
        next(stream)
        stream.cancel()
        rest = list(stream)
        assert stream.finished.reason == pb.FINISH_REASON_CANCELLED and len(rest) >= 3
        assert stream.finished.position == stream.tokens[-1].position == s.position


async def test_the_async_library_yields_the_same_tokens_one_by_one(server):
    async with AsyncClient(server.target) as client, await client.create_session(TINY, seed=9) as a:
        async with await a.fork() as b:
            batched = await a.generate(stream_interval=4, **SAMPLED)
            tokens = [t.id async for t in batched]
            assert tokens == [t.id async for t in await b.generate(**SAMPLED)]
            assert len(tokens) == N and a.position == b.position == 1 + N
        temporary = client.generate(model=TINY, seed=9, stream_interval=4, **SAMPLED)
        assert [t.id async for t in temporary] == tokens


@pytest.mark.parametrize("cut_after", [1, 5])  # in the first batch; in the second
def test_resume_after_a_cut_mid_batches_recovers_exactly(server, cut_after):
    """The stream is cut (the connection closed) after reading `cut_after` tokens: resume()
    reports the tokens the server absorbed that no received batch held, and the session goes
    on exactly as one never cut (a fork generating the same count one token per message)."""
    total = 3 * N
    with Client(server.target) as second:
        first = Client(server.target)
        session = first.create_session(TINY, seed=13, keep=True)
        session.feed("abc")
        reference = session.fork()
        expected = ids(reference.generate(max_tokens=total, temperature=0.8, ignore_eos=True))
        reference.close()

        stream = session.generate(max_tokens=total, temperature=0.8, ignore_eos=True, stream_interval=4)
        for _ in range(cut_after):
            next(stream)
        first.close()  # the connection drops
        with pytest.raises(StatusError):
            for _ in stream:  # the rest of the messages received, then the error
                pass
        received = [t.id for t in stream.tokens]
        assert len(received) >= cut_after and len(received) % 4 == 0  # whole batches, never all 30

        result = session.resume(second)
        assert result.refed == [] and result.position == session.position == 4 + len(received) + len(
            result.missed
        )
        tokens = received + result.missed
        if len(tokens) < total:  # max_tokens=0 would mean the server's limit
            tokens += ids(
                session.generate(
                    max_tokens=total - len(tokens), temperature=0.8, ignore_eos=True, stream_interval=4
                )
            )
        assert tokens == expected and session.position == 4 + total
        session.delete()


def test_resume_after_a_takeover_mid_batches(client):
    """Another stream takes the session over while a batched generation runs: the first
    handle's resume() reports what it had not received, counting whole batches as received."""
    with client.create_session(TINY, seed=17) as s:
        with s.fork() as reference:
            expected = ids(reference.generate(max_tokens=2 * N, temperature=0.8, ignore_eos=True))
        stream = s.generate(max_tokens=2 * N, temperature=0.8, ignore_eos=True, stream_interval=4)
        next(stream)
        other = client.session(s.id)
        other.attach(takeover=True)
        try:
            stream.wait()  # what was sent before the takeover (the server may have sent all)
        except StatusError as e:
            assert e.code == grpc.StatusCode.ABORTED
        result = s.resume()
        tokens = [t.id for t in stream.tokens] + result.missed
        assert result.position == s.position == 1 + len(tokens)
        if len(tokens) < 2 * N:
            tokens += ids(s.generate(max_tokens=2 * N - len(tokens), temperature=0.8, ignore_eos=True))
        assert tokens == expected


def test_cli_generate_stream_interval(server):
    args = (
        "generate",
        "--model",
        TINY,
        "--seed",
        "3",
        "--max-tokens",
        str(N),
        "--ignore-eos",
        "--json",
        "hi",
    )
    one = jsonl(ok(lstm_client(server.target, *args)))
    batched = jsonl(ok(lstm_client(server.target, *args, "--stream-interval", "4")))
    assert len(batched) == N + 1 and all("token" in e for e in batched[:-1])  # one line per token still
    assert [e.get("token") for e in batched] == [e.get("token") for e in one]
    assert batched[-1]["finished"] == one[-1]["finished"] and batched[-1]["finished"]["generated_tokens"] == N
    text = args[:-2] + ("hi",)
    assert ok(lstm_client(server.target, *text, "--stream-interval", "4")) == ok(
        lstm_client(server.target, *text)
    )


def test_cli_bench_stream_interval(server):
    result = lstm_client(
        server.target,
        "bench",
        "--model",
        TINY,
        "--sessions",
        "2",
        "--tokens",
        "32",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--stream-interval",
        "4",
        "--json",
        "--no-progress",
        timeout=120,
    )
    report = json.loads(ok(result))
    assert report["stream_interval"] == 4 and report["errors"] == {}
    assert (report["requests"], report["tokens"]) == (4, 32)
    assert report["ttft_ms"]["p50"] > 0
    # per request 7 gaps: 6 within a message (0 ms), 1 between its two messages
    assert report["itl_ms"]["p50"] == 0 and report["itl_ms"]["p99"] > 0
    text = lstm_client(
        server.target, "bench", "--model", TINY, "--sessions", "1", "--tokens", "8", "--stream-interval", "2"
    )
    assert "stream_interval" in ok(text) and "time to first token" in text.stdout
