"""docker-compose.scale.yml: the overlay agrees with the base compose file, the image, the server's
settings, deploy/haproxy.cfg and Prometheus (always); and, under `make test-docker`
(deploy/test-docker.sh brings the overlay up and sets LSTM_SERVE_COMPOSE_*), a replica killed
with `docker kill` mid-stream costs its clients a resume() through the published port, with the
tokens of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from client import Client, ClientOptions
from server.config import ServeSettings
from tests.cluster import generate_through_faults, settings_lines
from tests.conftest import ROOT

BASE, OVERLAY = ROOT / "docker-compose.yml", ROOT / "docker-compose.scale.yml"
HAPROXY_CFG = ROOT / "deploy" / "haproxy-compose.cfg"
REPLICAS = ("replica1", "replica2", "replica3")
# set by deploy/test-docker.sh once the overlay is up: compose project, published gRPC target and
# Prometheus port
PROJECT = os.environ.get("LSTM_SERVE_COMPOSE_PROJECT")
TARGET = os.environ.get("LSTM_SERVE_COMPOSE_TARGET")
PROMETHEUS = os.environ.get("LSTM_SERVE_COMPOSE_PROMETHEUS")
under_compose = pytest.mark.skipif(
    not (PROJECT and TARGET and PROMETHEUS), reason="runs under make test-docker, on the overlay it brings up"
)
SESSIONS, TOKENS = 12, 300


def services(path) -> dict:
    return yaml.safe_load(path.read_text())["services"]


def image_port(name: str) -> int:
    return int(re.search(rf"LSTM_SERVE_{name}=(\d+)", (ROOT / "Dockerfile").read_text())[1])


def test_the_overlays_replicas_share_sessions_through_its_redis():
    overlay = services(OVERLAY)
    fields = {f"LSTM_SERVE_{name.upper()}": name for name in ServeSettings.model_fields}
    for name in REPLICAS:
        replica = overlay[name]
        assert "build" not in replica  # the trainer builds the image
        env = replica["environment"]
        assert env.keys() <= fields.keys(), env.keys() - fields.keys()
        ServeSettings(**{fields[k]: v for k, v in env.items()})  # values the server accepts
        assert re.fullmatch(r"redis://redis:6379/\d+", env["LSTM_SERVE_SESSION_STORE"])
        assert replica["depends_on"]["redis"] == {"condition": "service_healthy"}
    redis_args = overlay["redis"]["command"]
    assert "--appendfsync" in redis_args and redis_args[redis_args.index("--appendfsync") + 1] == "always"


def test_haproxy_takes_the_published_ports_and_no_build():
    base, overlay = services(BASE), services(OVERLAY)
    assert set(base) == {"trainer", "server", "prometheus", "grafana"}
    # Compose merges the overlay's `server` into the base's: it must not inherit a build of our
    # image, and the base's published container ports must be the ones HAProxy binds
    assert "build" not in base["server"] and "build" in base["trainer"]
    published = {int(p.rsplit(":", 1)[1]) for p in base["server"]["ports"]}
    config = HAPROXY_CFG.read_text()
    assert published == {int(p) for p in re.findall(r"^\s*bind :(\d+)", config, re.MULTILINE)}
    assert published == {image_port("PORT"), image_port("METRICS_PORT")}
    assert "haproxy-compose.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in " ".join(
        overlay["server"]["volumes"]
    )
    assert set(overlay["server"]["depends_on"]) == set(REPLICAS)


def test_haproxy_compose_cfg_routes_to_every_replica_with_haproxy_cfgs_settings():
    config = HAPROXY_CFG.read_text()
    servers = re.findall(r"^\s*server (\w+) (\w+):(\d+) .* port (\d+)", config, re.MULTILINE)
    assert [(name, host) for name, host, *_ in servers] == [(r, r) for r in REPLICAS]
    assert {(int(g), int(m)) for *_, g, m in servers} == {(image_port("PORT"), image_port("METRICS_PORT"))}
    assert settings_lines((ROOT / "deploy" / "haproxy.cfg").read_text()) <= settings_lines(config)


def test_prometheus_scrapes_every_replica_and_haproxy():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus-scale.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    metrics = image_port("METRICS_PORT")
    assert jobs == {"lstm-serve": [f"{r}:{metrics}" for r in REPLICAS], "haproxy": [f"server:{metrics}"]}


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (make test-deps)")
def test_haproxy_accepts_the_compose_config():
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs docker-compose")
def test_compose_accepts_the_merged_files():
    merged = subprocess.run(
        ["docker-compose", "-f", str(BASE), "-f", str(OVERLAY), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert merged.returncode == 0, merged.stderr
    server = yaml.safe_load(merged.stdout)["services"]["server"]
    assert server["entrypoint"][0] == "haproxy" and "build" not in server


# --- against the running overlay (make test-docker) ---------------------------------------------


def compose(*args: str) -> str:
    command = ["docker-compose", "-p", PROJECT, "-f", str(BASE), "-f", str(OVERLAY), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120, cwd=ROOT).stdout


def held_by(container: str) -> set[str]:
    """The sessions a replica holds, from its own ListSessions (inside its container)."""
    out = subprocess.run(
        [
            "docker",
            "exec",
            container,
            "lstm-client",
            "--target",
            "127.0.0.1:50051",
            "--json",
            "sessions",
            "list",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return {s["id"] for s in json.loads(out) if s["location"] in ("device", "host")}


@under_compose
def test_a_replica_docker_killed_mid_stream_costs_only_a_resume():
    containers = {name: compose("ps", "-q", name).strip() for name in REPLICAS}
    with Client(TARGET, ClientOptions(timeout=30)) as client:
        sessions = [client.create_session("default", seed=seed) for seed in range(SESSIONS)]
        holders = {name: held_by(c) for name, c in containers.items()}
        victim = max(holders, key=lambda name: len(holders[name]))
        victims = holders[victim]
        assert 0 < len(victims) < SESSIONS, holders  # HAProxy spread the sessions
        tokens: list[list[int]] = [[] for _ in sessions]
        resumed: list[int] = []
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                generate_through_faults(sessions[i], TOKENS, tokens[i], resumed)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(SESSIONS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while min(len(tokens[i]) for i, s in enumerate(sessions) if s.id in victims) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        subprocess.run(["docker", "kill", containers[victim]], check=True, capture_output=True, timeout=60)
        for thread in threads:
            thread.join(180)
        assert not errors, errors
        assert resumed  # the kill interrupted streams: they finished through resume()
        for seed, got in enumerate(tokens):
            with client.create_session("default", seed=seed) as reference:
                expected = [t.id for t in reference.generate(max_tokens=len(got), ignore_eos=True)]
            assert got == expected, f"session {seed} differs after the failover"


@under_compose
def test_prometheus_scrapes_the_replicas_and_haproxy_under_compose():
    query = "count by (job) (up == 1)"
    url = f"http://127.0.0.1:{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    deadline, up = time.monotonic() + 60, {}
    while up.get("haproxy", 0) < 1 or up.get("lstm-serve", 0) < 2:  # one replica may be restarting
        assert time.monotonic() < deadline, f"Prometheus saw only {up}"
        time.sleep(1)
        with urllib.request.urlopen(url, timeout=10) as response:
            up = {r["metric"]["job"]: int(r["value"][1]) for r in json.load(response)["data"]["result"]}
