"""Sessions shared through a real Redis (--session-store): fenced writes, takeover by another
replica with identical tokens, a stopped replica that comes back stale, Redis killed and
restarted. Replicas are real servers on loopback ports; Redis runs with appendfsync always."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from client import Client, ClientOptions, StatusError
from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server.durability import redis_log
from server.durability.journal import tokens_body
from server.durability.redis_log import RedisSessions, Write, index_key, keys
from server.durability.shared import SNAPSHOT_TOKENS
from server.sessions import blob
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
    assert store.write([Write("append", sid, "alice", 1, 60_000, b"first", meta % sid)]) == [True]
    assert store.take_over(sid, "mallory") is None and store.epoch_of(sid) == 1  # only the owner takes over
    taken = store.take_over(sid, "alice")
    assert (taken.epoch, taken.records, taken.meta["owner"]) == (2, [b"first"], "alice")
    assert store.write(
        [Write("append", sid, "alice", 1, 60_000, b"stale"), Write("append", sid, "alice", 2, 60_000, b"new")]
    ) == [
        False,
        True,
    ]
    assert store.client.lrange(keys(sid)[2], 0, -1) == [b"first", b"new"]  # the stale write left no trace
    assert 0 < store.client.pttl(keys(sid)[1]) <= 60_000  # every key expires a TTL after its last write
    store.client.pexpire(keys(sid)[1], 1_000)
    assert store.write(
        [Write("touch", sid, "alice", 1, 60_000), Write("touch", sid, "alice", 2, 60_000)]
    ) == [False, True]
    assert store.client.pttl(keys(sid)[1]) > 1_000  # a session held but unchanged lives on
    assert store.write([Write("snapshot", sid, "alice", 2, 60_000, b"snap")]) == [True]
    assert store.client.get(keys(sid)[3]) == b"snap" and store.client.llen(keys(sid)[2]) == 0
    assert store.write([Write("delete", sid, "alice", 1, 60_000)]) == [
        False
    ]  # a stale replica cannot delete it
    assert store.write([Write("delete", sid, "alice", 2, 60_000)]) == [True]
    assert store.client.exists(*keys(sid)) == 0


def test_an_owners_index_lists_live_sessions_and_remembers_expired_ones(redis_server, monkeypatch):
    monkeypatch.setattr(redis_log, "LIST_PAGE", 2)  # alice's sessions take two pages
    store, (a, b, c, d) = RedisSessions(redis_server.url), ("a1" * 16, "b2" * 16, "c3" * 16, "d4" * 16)

    def meta(sid: str, owner: str) -> str:
        return json.dumps({"id": sid, "owner": owner, "model": "tiny", "version": "f" * 64, "seed": 1})

    snapshot = blob.pack(blob.SessionBlob("tiny", "f" * 64, 42, 1, b"", np.zeros(4, np.float32)))
    for sid in (a, b, c, d):
        store.claim(sid)
    assert (
        store.write(
            [
                Write("append", a, "alice", 1, 60_000, tokens_body(a, 0, [1, 2, 3], 1), meta(a, "alice")),
                Write("append", a, "alice", 1, 60_000, tokens_body(a, 3, [4, 5], 1)),
                Write("snapshot", b, "alice", 1, 60_000, snapshot, meta(b, "alice")),
                Write("append", c, "bob", 1, 300, tokens_body(c, 0, [1], 1), meta(c, "bob")),
                Write("append", d, "alice", 1, 60_000, tokens_body(d, 0, [1], 1), meta(d, "alice")),
            ]
        )
        == [True] * 5
    )
    listed = {s.id: (s.epoch, s.meta["owner"], s.position) for s in store.list("alice")}
    assert listed == {a: (1, "alice", 5), b: (1, "alice", 42), d: (1, "alice", 1)}
    assert all(59 < s.remaining_ttl <= 60 for s in store.list("alice"))
    assert [s.id for s in store.list("bob")] == [c]
    time.sleep(0.4)  # c's keys expire in Redis: bob's index remembers when
    assert store.list("bob") == [] and store.client.exists(*keys(c)) == 0
    assert time.time() - 1 < store.expired_at(c, "bob") < time.time() and store.expired_at(c, "alice") is None
    assert store.write([Write("expire", a, "alice", 1, 60_000), Write("delete", b, "alice", 1, 60_000)]) == [
        True,
        True,
    ]  # a expired by its holder, b deleted: only a is "expired"
    assert store.expired_at(a, "alice") is not None and store.expired_at(b, "alice") is None
    store.client.delete(keys(d)[1])  # keys gone before their expiry (not by us): the list drops the id
    assert store.list("alice") == [] and store.client.zscore(index_key("alice"), d) is None


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


def locations(client: Client) -> dict[str, str]:
    """Session id -> location, as the replica lists the caller's sessions."""
    return {s.id: pb.SessionLocation.Name(s.location) for s in client.list_sessions()}


def not_found(client: Client, session_id: str) -> str:
    with pytest.raises(StatusError) as e:
        client.get_session(session_id)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    return e.value.details


def test_every_replica_lists_every_session_and_says_expired_from_the_store(replica):
    a, b = replica(), replica()
    with (
        Client(a.target, ClientOptions(timeout=10)) as on_a,
        Client(b.target, ClientOptions(timeout=10)) as on_b,
    ):
        kept, moved, short = (
            on_a.create_session("tiny", seed=i, ttl=ttl) for i, ttl in enumerate((60, 60, 4))
        )
        list(kept.generate(max_tokens=5, ignore_eos=True))
        for s in (kept, moved, short):
            wait_durable(on_a, s.id)
        assert set(locations(on_a).values()) <= {"SESSION_LOCATION_DEVICE", "SESSION_LOCATION_HOST"}
        assert locations(on_b) == dict.fromkeys((kept.id, moved.id, short.id), "SESSION_LOCATION_STORE")
        here, there = on_a.get_session(kept.id), next(s for s in on_b.list_sessions() if s.id == kept.id)
        assert (there.position, there.durable_position, there.seed, there.model, there.ttl) == (
            6,
            6,
            here.seed,
            here.model,
            here.ttl,
        )
        assert there.created_at == here.created_at and abs(there.expires_at.seconds - time.time() - 60) < 5
        assert on_b.get_session(moved.id).position == 1  # b takes it over: the locations swap
        assert locations(on_a)[moved.id] == "SESSION_LOCATION_STORE"
        assert locations(on_b)[moved.id] == "SESSION_LOCATION_DEVICE"
        deadline = time.monotonic() + 15  # short expires on a, its holder: gone from both lists
        while short.id in locations(on_a) or short.id in locations(on_b):
            assert time.monotonic() < deadline, "the session never expired"
            time.sleep(0.2)
        assert "expired at" in not_found(on_b, short.id) and "expired at" in not_found(on_a, short.id)
        on_a.delete_session(kept.id)  # deleted: gone from both lists, and unknown rather than expired
        assert kept.id not in locations(on_a) and kept.id not in locations(on_b)
        assert not_found(on_b, kept.id).endswith("not found")
        orphan = on_a.create_session("tiny", seed=7, ttl=3)
        wait_durable(on_a, orphan.id)
        a.proc.send_signal(signal.SIGKILL)  # nobody holds it: it expires in Redis
        a.proc.wait(10)
        assert locations(on_b)[orphan.id] == "SESSION_LOCATION_STORE"
        deadline = time.monotonic() + 15
        while orphan.id in locations(on_b):
            assert time.monotonic() < deadline, "the session never expired in Redis"
            time.sleep(0.2)
        assert "expired at" in not_found(on_b, orphan.id)


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
