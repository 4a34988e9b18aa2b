"""Real HAProxy and Redis processes for the scale-out tests (tests/test_haproxy.py,
tests/test_session_store.py, tests/test_scale_out.py), and helpers they share with the deployment
tests (tests/test_k8s_manifests.py, tests/test_compose_scale.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from client import StatusError, retry
from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthz(server) -> int:
    try:
        with urllib.request.urlopen(server.metrics_url.replace("/metrics", "/healthz"), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def settings_lines(config: str) -> set[str]:
    """The directives of the defaults and backend sections, addresses left out."""
    kept, section = set(), ""
    for line in config.splitlines():
        text = line.split("#", 1)[0].strip()
        if text and not line.startswith(" "):
            section = text.split()[0]
        elif text and section in ("defaults", "backend") and not text.startswith(("server", "bind")):
            kept.add(text)
    return kept


def generate_through_faults(session, total: int, tokens: list[int], resumed: list[int]) -> None:
    """Generate until `tokens` holds `total` new tokens, resuming after every retriable fault
    (and counting the resumes in `resumed`)."""
    while len(tokens) < total:
        try:
            for token in session.generate(max_tokens=total - len(tokens), ignore_eos=True):
                tokens.append(token.id)
        except StatusError as e:
            if not retry.retriable(e):
                raise
            resumed.append(1)
            tokens += session.resume(deadline=60).missed  # what the server absorbed that we never heard


@contextlib.contextmanager
def haproxy(replicas) -> Iterator[str]:
    """HAProxy running deploy/haproxy.cfg in front of two replicas; yields its gRPC target once
    both are UP."""
    listen, stats = free_port(), free_port()
    env = {
        **os.environ,
        "LISTEN": f"127.0.0.1:{listen}",
        "STATS": f"127.0.0.1:{stats}",
        **{f"REPLICA{i + 1}": r.target for i, r in enumerate(replicas)},
        **{f"HEALTH{i + 1}": r.metrics_url.rsplit(":", 1)[1].split("/")[0] for i, r in enumerate(replicas)},
    }
    proxy = subprocess.Popen(
        ["haproxy", "-db", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    target = f"127.0.0.1:{listen}"
    deadline = time.monotonic() + 20
    while True:  # until both replicas are UP in HAProxy's exporter
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{stats}/metrics", timeout=2) as r:
                up = [
                    line
                    for line in r.read().decode().splitlines()
                    if line.startswith("haproxy_server_status{")
                ]
            if sum('state="UP"' in line and line.endswith(" 1") for line in up) == 2:
                break
        except OSError:
            pass
        if proxy.poll() is not None or time.monotonic() > deadline:
            proxy.kill()
            raise AssertionError("HAProxy never saw both replicas UP:\n" + proxy.communicate()[0])
        time.sleep(0.2)
    try:
        yield target
    finally:
        proxy.terminate()
        proxy.wait(10)


@dataclass
class RedisServer:
    """A real redis-server: AOF on, fsynced before every reply (the session store's rule)."""

    directory: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory)]
            + ["--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
