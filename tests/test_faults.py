"""Faults a serving system meets: clients that stop reading or vanish, SIGTERM mid-stream."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from tests.metrics_helpers import metric, scrape
from tests.stubs import LiveStream, connect, create, generate, generate_request

LONG = 100_000  # tokens asked for: far more than any test lets run


def rss_kib(pid: int) -> int:
    return int(
        next(
            line.split()[1]
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS")
        )
    )


def position(stub, session_id: str) -> int:
    return stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.position


def stable_position(stub, session_id: str, quiet: float = 1.0, timeout: float = 20.0) -> int:
    """The session's position once it has not moved for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last = position(stub, session_id)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = position(stub, session_id)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the position kept moving for {timeout} s: generation never paused")


def test_a_client_that_stops_reading_pauses_its_generation(start_server):
    proc = start_server("--shutdown-delay", "0", "--max-new-tokens", str(LONG))
    stub = connect(proc.target)
    session = create(stub)
    live = LiveStream(stub, session.id)
    live.send(generate_request("g", LONG))
    received = [next(live.call) for _ in range(5)]
    stalled = stable_position(stub, session.id)  # the server fills what gRPC will buffer, then stalls
    both = (proc.proc.pid, proc.engine_pid)  # the front end and the engine core
    memory = sum(map(rss_kib, both))
    time.sleep(2.0)
    assert position(stub, session.id) == stalled, "generation went on while nobody read"
    # bounded by gRPC's flow-control window (tokens are ~40 bytes on the wire) plus our outbox,
    # whose credits cross from the front end to the engine core
    assert stalled - received[-1].token.position < 1000
    assert sum(map(rss_kib, both)) - memory < 2048
    later = [next(live.call) for _ in range(50)]  # reading again resumes generation
    assert later[-1].token.position == received[-1].token.position + 50
    live.call.cancel()


def test_a_vanished_client_releases_its_stream_and_leaves_a_consistent_session(server):
    stub = connect(server.target)
    session = create(stub, seed=21)
    live = LiveStream(stub, session.id)
    live.send(generate_request("g", 4000))
    got = [next(live.call).token for _ in range(30)]
    live.call.cancel()  # the client goes away mid-generation
    reopened = LiveStream(stub, session.id)  # no takeover needed: the stream was released
    final = reopened.opened.position
    assert final >= got[-1].position
    absorbed = [t.id for t in got] + list(
        stub.GetSession(pb.GetSessionRequest(session_id=session.id, tokens_after=got[-1].position)).tokens
    )
    reopened.close()
    # the session is exactly <bos> plus the tokens it reports, whatever the client saw
    reference = create(stub, seed=21)
    assert generate(stub, reference.id, max_tokens=len(absorbed))[0] == absorbed
    assert generate(stub, session.id, max_tokens=10)[0] == generate(stub, reference.id, max_tokens=10)[0]
    deadline = time.monotonic() + 5
    while metric(scrape(server), "lstm_serve_streams_in_flight", method="Stream") != 0:
        assert time.monotonic() < deadline, "a stream stayed in flight"
        time.sleep(0.05)


def test_sigterm_mid_stream_ends_streams_unavailable_and_the_restart_continues(start_server, tmp_path):
    state = ("--state-dir", str(tmp_path / "state"), "--shutdown-delay", "0")
    proc = start_server(*state, "--max-new-tokens", str(LONG))
    stub = connect(proc.target)
    session = create(stub, seed=33)
    live = LiveStream(stub, session.id)
    live.send(generate_request("g", LONG))
    tokens = [next(live.call).token for _ in range(20)]
    proc.proc.terminate()
    with pytest.raises(grpc.RpcError) as err:
        for response in live.call:
            tokens.append(response.token)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    said = int(err.value.details().rsplit("position ", 1)[1])
    assert said == tokens[-1].position  # every absorbed token was delivered before the end
    assert proc.proc.wait(30) == 0

    restarted = connect(start_server(*state).target)
    assert position(restarted, session.id) == said
    reference = create(restarted, seed=33)
    assert generate(restarted, reference.id, max_tokens=len(tokens))[0] == [t.id for t in tokens]
    assert (
        generate(restarted, session.id, max_tokens=15)[0]
        == generate(restarted, reference.id, max_tokens=15)[0]
    )


def test_sigterm_with_a_paused_stream_still_stops_promptly(start_server):
    proc = start_server("--shutdown-delay", "0", "--grace-period", "5", "--max-new-tokens", str(LONG))
    stub = connect(proc.target)
    session = create(stub)
    live = LiveStream(stub, session.id)
    live.send(generate_request("g", LONG))
    next(live.call)
    stable_position(stub, session.id)  # the client stopped reading: its generation is paused
    started = time.monotonic()
    proc.proc.terminate()
    assert proc.proc.wait(30) == 0
    assert time.monotonic() - started < 5
    live.call.cancel()
