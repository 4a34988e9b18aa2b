"""Sessions shared through a real Redis (--session-store): fenced writes, takeover by another
replica with identical tokens, a stopped replica that comes back stale, Redis killed and
restarted. Replicas are real servers on loopback ports; Redis runs with appendfsync always."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from client import Client, ClientOptions, StatusError
from server.durability.redis_log import RedisSessions, Write, keys
from server.durability.shared import SNAPSHOT_TOKENS
from tests.cluster import RedisServer, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (make test-deps)"
)


@pytest.fixture
def redis_server(tmp_path) -> RedisServer:
    server = RedisServer(tmp_path / "redis", free_port())
    server.directory.mkdir()
    server.start()
    yield server
    if server.proc.poll() is None:
        server.kill()


@pytest.fixture
def replica(start_server, redis_server):
    """Start a replica on the shared store (extra flags allowed)."""

    def start(*args: str):
        return start_server(
            "--session-store", redis_server.url, "--shutdown-delay", "0", "--snapshot-interval", "0.5", *args
        )

    return start


def wait_durable(client: Client, session_id: str, timeout: float = 10) -> int:
    """Until the session's durable position reaches its position; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.get_session(session_id)
        if info.durable_position == info.position or time.monotonic() > deadline:
            assert info.durable_position == info.position, "the session never became durable"
            return info.position
        time.sleep(0.05)


def pause(server, sig: int) -> None:
    """SIGSTOP or SIGCONT the front end and its engine core together."""
    for pid in (server.engine_pid, server.proc.pid):
        os.kill(pid, sig)


def continuation_matches(client: Client, session, seed: int) -> None:
    """The session, continued greedily, gives what a new session fed the same tokens gives."""
    tokens = client.session_tokens(session.id, 0)[1:]  # without <bos>
    continued = [t.id for t in session.generate(max_tokens=12, temperature=0.0, ignore_eos=True)]
    with client.create_session("tiny", seed=seed) as reference:
        reference.feed(tokens)
        assert [
            t.id for t in reference.generate(max_tokens=12, temperature=0.0, ignore_eos=True)
        ] == continued


def test_writes_are_fenced_by_the_epoch(redis_server):
    store, sid = RedisSessions(redis_server.url), "ab" * 16
    meta = '{"id": "%s", "owner": "alice", "model": "tiny", "version": "v", "seed": 1, "ttl": 60, "created_at": 0}'
    assert store.claim(sid) and not store.claim(sid)  # a second creation of the id is refused
    assert store.write([Write("append", sid, 1, 60_000, b"first", meta % sid)]) == [True]
    assert store.take_over(sid, "mallory") is None and store.epoch_of(sid) == 1  # only the owner takes over
    taken = store.take_over(sid, "alice")
    assert (taken.epoch, taken.records, taken.meta["owner"]) == (2, [b"first"], "alice")
    assert store.write(
        [Write("append", sid, 1, 60_000, b"stale"), Write("append", sid, 2, 60_000, b"new")]
    ) == [
        False,
        True,
    ]
    assert store.client.lrange(keys(sid)[2], 0, -1) == [b"first", b"new"]  # the stale write left no trace
    assert 0 < store.client.pttl(keys(sid)[1]) <= 60_000  # every key expires a TTL after its last write
    store.client.pexpire(keys(sid)[1], 1_000)
    assert store.write([Write("touch", sid, 1, 60_000), Write("touch", sid, 2, 60_000)]) == [False, True]
    assert store.client.pttl(keys(sid)[1]) > 1_000  # a session held but unchanged lives on
    assert store.write([Write("snapshot", sid, 2, 60_000, b"snap")]) == [True]
    assert store.client.get(keys(sid)[3]) == b"snap" and store.client.llen(keys(sid)[2]) == 0
    assert store.write([Write("delete", sid, 1, 60_000)]) == [False]  # a stale replica cannot delete it
    assert store.write([Write("delete", sid, 2, 60_000)]) == [True]
    assert store.client.exists(*keys(sid)) == 0


def test_a_session_moves_between_replicas_and_survives_kill_9(replica):
    a, b = replica(), replica()
    with (
        Client(a.target, ClientOptions(timeout=10)) as on_a,
        Client(b.target, ClientOptions(timeout=10)) as on_b,
    ):
        session = on_a.create_session("tiny", seed=11)
        seen = [t.id for t in session.generate(max_tokens=20, ignore_eos=True)]
        wait_durable(on_a, session.id)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        result = session.resume(on_b)  # b takes it over: its creation or snapshot, plus its log replayed
        assert result.position == 21 and result.refed == result.missed == []
        seen += [t.id for t in session.generate(max_tokens=10, ignore_eos=True)]
        wait_durable(on_b, session.id)
        c = replica()  # a fresh replica takes it from b, which is alive: b's copy goes stale
        with Client(c.target, ClientOptions(timeout=10)) as on_c:
            assert session.resume(on_c).position == 31
            seen += [t.id for t in session.generate(max_tokens=10, ignore_eos=True)]
            wait_durable(on_c, session.id)
            assert session.resume(on_b).position == 41  # b drops its stale copy and takes it back
            seen += [t.id for t in session.generate(max_tokens=10, ignore_eos=True)]
            with on_c.create_session("tiny", seed=11) as reference:
                assert [t.id for t in reference.generate(max_tokens=50, ignore_eos=True)] == seen
    assert "taken over under epoch 2" in b.log and "taken over under epoch 3" in c.log
    assert "taken over under epoch 4" in b.log


def test_a_stopped_replica_comes_back_and_neither_serves_nor_writes_stale_state(replica):
    a, b = replica("--max-new-tokens", "100000"), replica()
    with (
        Client(a.target, ClientOptions(timeout=30)) as on_a,
        Client(b.target, ClientOptions(timeout=30)) as on_b,
    ):
        session = on_a.create_session("tiny", seed=5)
        list(session.generate(max_tokens=8, ignore_eos=True))
        wait_durable(on_a, session.id)
        received, outcome = [], {}

        def stream_on_a() -> None:  # a long generation, frozen mid-stream with its replica
            try:
                for token in session.generate(max_tokens=100_000, ignore_eos=True):
                    received.append(token.id)
            except StatusError as e:
                outcome["error"] = e

        streaming = threading.Thread(target=stream_on_a)
        streaming.start()
        while len(received) < 50:
            assert streaming.is_alive(), outcome
            time.sleep(0.01)
        pause(a, signal.SIGSTOP)
        try:
            moved = on_b.session(session.id)
            position = moved.refresh().position  # b takes it over at what a made durable
            list(moved.generate(max_tokens=30, ignore_eos=True))
            wait_durable(on_b, session.id)
            before = on_b.session_tokens(session.id, 0)
        finally:
            pause(a, signal.SIGCONT)
        streaming.join(30)
        # a's queued writes were refused (its epoch is old): its stream ended, b's state is untouched
        assert outcome["error"].code == grpc.StatusCode.UNAVAILABLE, outcome
        assert "now held by another server" in outcome["error"].details
        assert on_b.session_tokens(session.id, 0) == before and len(before) == position + 30
        continuation_matches(on_b, moved, seed=5)


def test_redis_killed_and_restarted_loses_nothing_acknowledged(replica, redis_server):
    a = replica()
    with Client(a.target, ClientOptions(timeout=10)) as client:
        session = client.create_session("tiny", seed=3)
        list(session.generate(max_tokens=25, ignore_eos=True))
        durable = wait_durable(client, session.id)
        redis_server.kill()
        with pytest.raises(StatusError) as refused:  # steps stop: nothing advances unrecorded
            for _ in range(20):
                list(session.generate(max_tokens=5, ignore_eos=True))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert "session store" in refused.value.details
        deadline = time.monotonic() + 10
        while a.health() != 2 and time.monotonic() < deadline:  # NOT_SERVING while Redis is down
            time.sleep(0.05)
        assert a.health() == 2
        redis_server.start()  # the same AOF: everything it acknowledged
        a.wait_serving(20)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
    b = replica()
    with Client(b.target, ClientOptions(timeout=10)) as client:
        assert client.get_session(session.id).position >= durable
        continuation_matches(client, client.session(session.id), seed=3)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--session-store", "redis://127.0.0.1:1/0", "--state-dir", "state"], "not both"),
        (["--session-store", "http://127.0.0.1:1"], "session_store"),
        (["--session-store", "redis://127.0.0.1:{port}/0"], "cannot be reached"),
    ],
)
def test_a_session_store_that_cannot_work_is_refused_at_start(models_dir, tmp_path, flags, words):
    flags = [flag.format(port=free_port()) for flag in flags]
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--models-dir", str(models_dir), "--port", "0"]
        + ["--metrics-port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_snapshots_by_tokens_keep_a_takeovers_replay_short(start_server, redis_server):
    a = start_server(
        "--session-store", redis_server.url, "--shutdown-delay", "0", "--snapshot-interval", "3600"
    )
    store = RedisSessions(redis_server.url)
    with Client(a.target, ClientOptions(timeout=30)) as client:
        session = client.create_session("tiny", seed=2)
        list(session.generate(max_tokens=700, ignore_eos=True))  # 700 iterations: 700 log records
        deadline = time.monotonic() + 10
        while store.client.llen(keys(session.id)[2]) >= SNAPSHOT_TOKENS:  # no time-based snapshot for an hour
            assert time.monotonic() < deadline, "no snapshot by tokens"
            time.sleep(0.1)
        assert store.client.exists(keys(session.id)[3])
