"""--frontends K: several gRPC front-end processes on one port, one engine core, one /metrics.

Real servers with two front ends. Which process holds a connection is read from /proc (the
socket inodes of each process against /proc/net/tcp), so the tests know that both front ends
served, and that sessions moved between them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client import Client, ClientOptions
from tests.conftest import ROOT
from tests.metrics_helpers import metric, scrape
from tests.test_engine_process import gone
from tests.test_metrics import tool

ESTABLISHED = "01"


def front_ends(server) -> list[int]:
    """The server's front-end processes: itself and its server.api.frontend children."""
    found = [server.proc.pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if ppid == server.proc.pid and b"server.api.frontend" in cmdline:
            found.append(int(stat.parent.name))
    return sorted(found)


def connections_by_process(pids: list[int], port: int) -> dict[int, int]:
    """pid -> established connections it accepted on `port`."""
    inodes = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[link[8:-1]] = pid
    counts = dict.fromkeys(pids, 0)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == ESTABLISHED and fields[9] in inodes:
                counts[inodes[fields[9]]] += 1
    return counts


def spread_clients(server, pids: list[int], at_least: int) -> list[Client]:
    """Clients on their own connections, at least `at_least`, until every front end holds one."""
    port = int(server.target.rsplit(":", 1)[1])
    clients: list[Client] = []
    while len(clients) < at_least or 0 in connections_by_process(pids, port).values():
        assert len(clients) < 64, (
            f"the kernel gave every connection to one process: {connections_by_process(pids, port)}"
        )
        clients.append(Client(server.target, ClientOptions(own_connection=True)))
        clients[-1].list_models()  # connected
    return clients


@pytest.fixture
def two_front_ends(start_server):
    return start_server("--frontends", "2", "--shutdown-delay", "0", "--max-new-tokens", "100000")


def wait_for_front_ends(server, count: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(pids := front_ends(server)) < count:
        assert time.monotonic() < deadline, f"{count} front ends expected, found {pids}"
        time.sleep(0.1)
    return pids


def test_sessions_move_between_front_ends_and_metrics_merge(two_front_ends):
    server = two_front_ends
    pids = wait_for_front_ends(server, 2)
    before = scrape(server)
    clients = spread_clients(server, pids, 8)

    # one session, created through the first connection, driven through every one in turn:
    # both processes served it, and it continues exactly as a session that never moved
    moved = clients[0].create_session("tiny", seed=8)
    with clients[0].create_session("tiny", seed=8) as steady:
        expected = [t.id for t in steady.generate(max_tokens=3 * len(clients), ignore_eos=True)]
    got = []
    for client in clients:
        with client.session(moved.id) as handle:
            got += [t.id for t in handle.generate(max_tokens=3, ignore_eos=True)]
    assert got == expected

    after = scrape(server)
    streams = "lstm_serve_rpc_requests_total"
    done = metric(after, streams, method="Stream", code="OK") - metric(
        before, streams, method="Stream", code="OK"
    )
    assert done == len(clients) + 1  # both processes' counts, summed on the one /metrics
    check = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=after, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    for client in clients:
        client.close()


def test_a_killed_front_end_is_restarted_and_its_clients_resume(two_front_ends):
    server = two_front_ends
    pids = wait_for_front_ends(server, 2)
    clients = spread_clients(server, pids, 4)
    sessions = [client.create_session("tiny", seed=100 + i) for i, client in enumerate(clients)]
    streams = [s.generate(max_tokens=100_000, ignore_eos=True) for s in sessions]
    for stream in streams:
        next(iter(stream))
    extra = pids[1] if pids[0] == server.proc.pid else pids[0]
    os.kill(extra, signal.SIGKILL)
    broken = 0
    for stream in streams:  # the killed process's streams fail; the others keep going
        try:
            for _ in range(200):
                next(iter(stream))
        except Exception:
            broken += 1
    assert 0 < broken < len(streams)
    restarted = wait_for_front_ends(server, 2)
    assert extra not in restarted
    assert "front end 1 (pid" in server.log and "restarting it" in server.log
    for session, stream in zip(sessions, streams):
        stream.cancel()
        session.resume()  # its stream was detached: no takeover needed
        position = session.refresh().position
        assert session.generate(max_tokens=5, ignore_eos=True).wait().position == position + 5
    for client in clients:
        client.close()


def test_a_second_server_on_the_port_is_refused(two_front_ends, models_dir):
    port = two_front_ends.target.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "server.cli", "serve", "--models-dir", str(models_dir), "--port", port]
    command += ["--metrics-port", "0", "--frontends", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"--port {port} on 127.0.0.1 is in use" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_sigterm_stops_every_front_end(two_front_ends):
    server = two_front_ends
    pids = wait_for_front_ends(server, 2)
    with Client(server.target) as client:
        session = client.create_session("tiny", seed=3)
        stream = session.generate(max_tokens=100_000, ignore_eos=True)
        next(iter(stream))
        server.proc.terminate()
        with pytest.raises(Exception) as ended:
            for _ in stream:
                pass
        assert "shutting down" in str(ended.value)
    assert server.proc.wait(30) == 0
    assert all(gone(pid) for pid in pids)
