"""Shared fixtures: small real checkpoints and real servers on loopback ports.

`server` starts `lstm-serve serve` as a subprocess (port 0: it prints the ports it bound) on a
models directory with `tiny` (LSTM) and `tiny-rnn` (Elman RNN), waits for health SERVING,
and stops it with SIGTERM afterwards. Tests talk to it through the real client.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import checkpoint
from server.model import ModelConfig, RecurrentLM

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (\S+):(\d+), metrics on (\S+)")
TINY_MODELS = {
    "tiny": ModelConfig(cell="lstm", layers=2, hidden=48, embed=16),
    "tiny-rnn": ModelConfig(cell="rnn", layers=1, hidden=40, embed=16),
}


def write_model(path: Path, config: ModelConfig, seed: int = 0) -> str:
    """A real checkpoint with seeded random weights (scaled up so sampling is not uniform)."""
    torch.manual_seed(seed)
    model = RecurrentLM(config)
    with torch.no_grad():
        model.head.weight.mul_(8.0)
    return checkpoint.save(path, model)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for i, (name, config) in enumerate(TINY_MODELS.items()):
        write_model(root / f"{name}.safetensors", config, seed=i)
    return root


@dataclass
class ServerProcess:
    """A real `lstm-serve serve` subprocess."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    target: str = ""
    metrics_url: str = ""
    output: list[str] = field(default_factory=list)
    models_dir: Path | None = None
    keys: dict[str, str] = field(default_factory=dict)  # API key name -> key
    credentials: grpc.ChannelCredentials | None = None  # for a TLS server's health checks
    launcher: list[str] = field(
        default_factory=lambda: [sys.executable, "-m", "server.cli"]
    )  # the command before `serve`

    def start(self, timeout: float = 60) -> ServerProcess:
        cmd = [
            *self.launcher,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            *self.args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env
        )
        bound = threading.Event()
        threading.Thread(target=self._read_output, args=(bound,), daemon=True).start()
        if not bound.wait(timeout):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.output))
        self.wait_serving(timeout)
        return self

    def _read_output(self, bound: threading.Event) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            match = LISTENING.search(line)
            if match:
                self.target = f"{match[1]}:{match[2]}"
                self.metrics_url = match[3]
                bound.set()

    def health(self, service: str = "") -> int:
        channel = (
            grpc.secure_channel(self.target, self.credentials)
            if self.credentials
            else grpc.insecure_channel(self.target)
        )
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.output))
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server never became SERVING:\n" + "".join(self.output))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    @property
    def log(self) -> str:
        return "".join(self.output)

    @property
    def engine_pid(self) -> int:
        """The engine core process: the server's child running server.engine.process."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and b"server.engine.process" in cmdline:
                return int(stat.parent.name)
        raise LookupError(f"server {self.proc.pid} has no engine core process")


@pytest.fixture(scope="module")
def server(models_dir) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        ["--models-dir", str(models_dir), "--shutdown-delay", "0", "--session-ttl", "300"],
        models_dir=models_dir,
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def start_server(models_dir) -> Iterator:
    """Start servers with extra flags; every one is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        models: Path | None = None,
        credentials=None,
        launcher: list[str] | None = None,
    ) -> ServerProcess:
        models = models or models_dir
        proc = ServerProcess(
            ["--models-dir", str(models), *args], env or {}, models_dir=models, credentials=credentials
        )
        if launcher is not None:
            proc.launcher = launcher
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


API_KEYS = {
    "alice": "alice-secret-key",
    "bob": "bob-secret-key",
    "limited": "limited-key",
    "queued": "queued-key",
}


@pytest.fixture(scope="module")
def auth_server(models_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    lines = []
    for name, key in API_KEYS.items():
        lines.append(f"- name: {name}\n  sha256: {hashlib.sha256(key.encode()).hexdigest()}\n")
        if name == "limited":
            lines.append("  max_sessions: 2\n  max_tokens_per_request: 16\n")
        elif name == "queued":
            lines.append("  max_queued_requests: 2\n")
    keys_file.write_text("".join(lines))
    args = ["--models-dir", str(models_dir), "--shutdown-delay", "0", "--api-keys-file", str(keys_file)]
    proc = ServerProcess(args, models_dir=models_dir, keys=dict(API_KEYS)).start()
    yield proc
    proc.stop()
