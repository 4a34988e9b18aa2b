"""`resume()` tries again while a server restarts or a proxy reports its replica gone, and
only then: the retry rule and its backoff in process, the server's status mark and a resume
across a real kill -9 and restart on the same port."""

from __future__ import annotations

import random
import signal
import threading
import time

import grpc
import pytest

from client import Client, ClientOptions, StatusError
from client.retry import FIRST_DELAY, MAX_DELAY, delays, retriable

Code = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "from_server", "cancelled_locally", "expected"),
    [
        (Code.UNAVAILABLE, False, False, True),
        (Code.UNAVAILABLE, True, False, True),  # the server itself says: not now
        (Code.INTERNAL, False, False, True),  # a proxy's RST_STREAM when a replica vanished
        (Code.INTERNAL, True, False, False),  # the server's own error: an answer
        (Code.CANCELLED, False, False, True),
        (Code.CANCELLED, False, True, False),  # this client cancelled
        (Code.NOT_FOUND, True, False, False),
        (Code.FAILED_PRECONDITION, True, False, False),
    ],
)
def test_what_is_retried(code, from_server, cancelled_locally, expected):
    assert retriable(StatusError(code, "", from_server), cancelled_locally) is expected


def test_backoff_is_jittered_exponential_and_ends_at_the_deadline():
    started = time.monotonic()
    waits = []
    for wait in delays(0.5, random.Random(1)):
        waits.append(wait)
        time.sleep(wait)
    assert 0.5 <= time.monotonic() - started < 0.5 + MAX_DELAY
    bounds = [min(MAX_DELAY, FIRST_DELAY * 2**i) for i in range(len(waits))]
    assert all(0 <= w <= b for w, b in zip(waits, bounds))
    assert len(set(waits)) == len(waits)  # drawn, not fixed


def test_the_servers_own_statuses_carry_its_mark(server):
    with Client(server.target) as client:
        with pytest.raises(StatusError) as e:
            client.get_session("ab" * 16)
    assert e.value.code == Code.NOT_FOUND and e.value.from_server
    with Client("127.0.0.1:1", ClientOptions(timeout=5, retry_attempts=1)) as nowhere:
        with pytest.raises(StatusError) as e:
            nowhere.list_models()
    assert e.value.code == Code.UNAVAILABLE and not e.value.from_server


def test_resume_waits_for_a_server_that_restarts_on_the_same_port(start_server, tmp_path):
    state = ("--state-dir", str(tmp_path / "state"), "--fsync-interval", "0.01", "--shutdown-delay", "0")
    first = start_server(*state)
    port = first.target.rsplit(":", 1)[1]
    with Client(first.target, ClientOptions(timeout=5)) as client:
        session = client.create_session("tiny", seed=11)
        seen = [t.id for t in session.generate(max_tokens=20, ignore_eos=True)]
        time.sleep(0.2)  # durable
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        later = threading.Timer(1.0, lambda: start_server(*state, "--port", port))
        later.start()
        try:
            result = session.resume(deadline=90)  # fails fast at first: nothing listens yet
        finally:
            later.join()
        assert result.session.position == result.position == 21 and result.refed == result.missed == []
        more = [t.id for t in session.generate(max_tokens=10, ignore_eos=True)]
        with client.create_session("tiny", seed=11) as reference:
            assert [t.id for t in reference.generate(max_tokens=30, ignore_eos=True)] == seen + more
