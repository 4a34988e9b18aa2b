"""Session-affine routing through a real HAProxy (deploy/haproxy.cfg) in front of two replicas.

The client library chooses each new session's id and sends it as `x-session-id` on every call
about the session; HAProxy hashes it, so a session is created on, and always reached at, one
replica. A replica that goes NOT_SERVING (its /healthz answers 503) gets no new sessions.
"""

from __future__ import annotations

import shutil
import signal
import time

import grpc
import pytest

from client import Client, StatusError
from client.lstmserve.v1 import lstm_serve_pb2 as pb
from tests.cluster import haproxy, healthz
from tests.stubs import connect

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (make test-deps)")


@pytest.fixture
def routed(start_server):
    """(haproxy's target, the two replicas), HAProxy running deploy/haproxy.cfg."""
    replicas = [start_server("--shutdown-delay", "60", "--session-ttl", "300") for _ in range(2)]
    with haproxy(replicas) as target:
        yield target, replicas
    for replica in replicas:  # not SIGTERM: that would wait out the 60 s shutdown delay
        replica.stop(signal.SIGKILL)


def where(replicas, session_id: str) -> list[int]:
    """Which replicas hold the session."""
    held = []
    for i, replica in enumerate(replicas):
        listed = connect(replica.target).ListSessions(pb.ListSessionsRequest(), timeout=10).sessions
        if session_id in {s.id for s in listed}:
            held.append(i)
    return held


def test_every_session_stays_on_the_replica_its_id_hashes_to(routed):
    target, replicas = routed
    with Client(target) as client:
        sessions = [client.create_session("tiny", seed=i) for i in range(24)]
        for session in sessions:
            session.feed("ab")
            generated = session.generate(max_tokens=4, ignore_eos=True).wait()
            assert client.get_session(session.id).position == generated.position == 7
            session.detach()
        homes = [where(replicas, s.id) for s in sessions]
        assert all(len(h) == 1 for h in homes), homes  # each on exactly one replica
        assert {h[0] for h in homes} == {0, 1}  # and the hash spreads them
        fork = sessions[0].fork()  # routed by its source: made where the source is
        assert where(replicas, fork.id) == homes[0]
        assert client.generate("x", model="tiny", max_tokens=3).wait().generated_tokens == 3  # no id: any


def test_a_draining_replica_gets_no_new_sessions(routed):
    target, replicas = routed
    assert healthz(replicas[1]) == 200
    replicas[1].proc.send_signal(signal.SIGTERM)  # NOT_SERVING for its 60 s shutdown delay
    deadline = time.monotonic() + 10
    while healthz(replicas[1]) != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(2.0)  # HAProxy's checks (every 0.5 s, down after 2 failures) take it out
    with Client(target) as client:
        new = [client.create_session("tiny") for _ in range(12)]
        assert all(where(replicas, s.id) == [0] for s in new)


def test_chosen_ids_and_route_metadata_are_checked(server):
    stub = connect(server.target)
    chosen = "ab" * 16
    made = stub.CreateSession(pb.CreateSessionRequest(model="tiny", session_id=chosen), timeout=10)
    assert made.session.id == chosen
    for request, code, words in (
        (
            pb.CreateSessionRequest(model="tiny", session_id=chosen),
            grpc.StatusCode.ALREADY_EXISTS,
            "already exists",
        ),
        (
            pb.CreateSessionRequest(model="tiny", session_id="Not-An-Id"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "32 lowercase",
        ),
    ):
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateSession(request, timeout=10)
        assert e.value.code() == code and words in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # the router would have hashed another session
        stub.GetSession(
            pb.GetSessionRequest(session_id=chosen), metadata=(("x-session-id", "cd" * 16),), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-session-id" in e.value.details()
    with Client(server.target) as client:
        with pytest.raises(StatusError) as e:
            client.create_session("tiny", session_id=chosen)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert client.session(chosen).generate(max_tokens=2, ignore_eos=True).wait().position == 3
