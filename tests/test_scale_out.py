"""Failover through the whole scale-out stack: real Redis, two replicas on it, HAProxy in front.
A replica killed with -9 mid-stream costs its clients a resume(), and every session still
produces exactly the tokens of an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from client import Client, ClientOptions
from client.lstmserve.v1 import lstm_serve_pb2 as pb
from tests.cluster import RedisServer, free_port, generate_through_faults, haproxy
from tests.conftest import ROOT
from tests.stubs import connect

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None or shutil.which("redis-server") is None,
    reason="needs haproxy and redis-server (make test-deps)",
)
SESSIONS, TOKENS = 16, 300


@pytest.fixture
def cluster(start_server, tmp_path):
    """(HAProxy's target, the two replicas), sessions shared through Redis."""
    store = RedisServer(tmp_path / "redis", free_port())
    store.directory.mkdir()
    store.start()
    replicas = [
        start_server("--session-store", store.url, "--shutdown-delay", "0", "--snapshot-interval", "0.5")
        for _ in range(2)
    ]
    try:
        with haproxy(replicas) as target:
            yield target, replicas
    finally:
        store.kill()


def held_by(replica) -> set[str]:
    """The sessions the replica holds (it lists the others it knows of from Redis, in STORE)."""
    listed = connect(replica.target).ListSessions(pb.ListSessionsRequest(), timeout=10).sessions
    return {s.id for s in listed if s.location != pb.SESSION_LOCATION_STORE}


def test_a_replica_killed_mid_stream_costs_only_a_resume(cluster):
    target, replicas = cluster
    with Client(target, ClientOptions(timeout=30)) as client:
        sessions = [client.create_session("tiny", seed=seed) for seed in range(SESSIONS)]
        victims = held_by(replicas[0])
        assert 0 < len(victims) < SESSIONS  # the router spread them
        tokens: list[list[int]] = [[] for _ in sessions]
        resumed: list[int] = []
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                generate_through_faults(sessions[i], TOKENS, tokens[i], resumed)
            except BaseException as e:  # reported below, with the session's index
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(SESSIONS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while min(len(tokens[i]) for i, s in enumerate(sessions) if s.id in victims) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        replicas[0].proc.send_signal(signal.SIGKILL)  # mid-stream: its sessions are half done
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        assert len(resumed) >= 1  # the kill interrupted streams: they finished through resume()
        assert held_by(replicas[1]) >= victims  # the survivor took every session of the dead one
        for seed, got in enumerate(tokens):
            with client.create_session("tiny", seed=seed) as reference:
                expected = [t.id for t in reference.generate(max_tokens=len(got), ignore_eos=True)]
            assert got == expected, f"session {seed} differs after the failover"


def test_the_cli_resumes_its_session_through_a_replica_failure(cluster):
    target, replicas = cluster
    with Client(target, ClientOptions(timeout=30)) as client:
        session = client.create_session("tiny", seed=21, keep=True)
        session.detach()
    holder = next(r for r in replicas if session.id in held_by(r))
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "client.cli",
            "--target",
            target,
            "--json",
            "generate",
            "--session",
            session.id,
        ]
        + ["--max-tokens", "3000", "--ignore-eos", "--temperature", "1.0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    lines = []
    for line in cli.stdout:
        lines.append(json.loads(line))
        if len(lines) == 50:
            holder.proc.send_signal(signal.SIGKILL)  # mid-generation: the pipe holds far fewer than 3000
    assert cli.wait(60) == 0
    tokens = [line["token"]["id"] for line in lines if "token" in line]
    assert "resumed session" in cli.stderr.read()  # the kill interrupted it: it went on elsewhere
    with Client(target, ClientOptions(timeout=30)) as client:
        with client.create_session("tiny", seed=21) as reference:
            assert [
                t.id for t in reference.generate(max_tokens=3000, ignore_eos=True, temperature=1.0)
            ] == tokens
