"""/metrics after a scripted workload: exact deltas, promtool's lint, and a real Prometheus
server scraping the server and answering every query of the Grafana dashboard."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from tests.metrics_helpers import metric, scrape
from tests.stubs import connect, create, generate

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/dashboards/lstm-serve.json"


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin:/bin")
    assert path, f"{name} is missing: install Debian's prometheus package (make test does)"
    return path


def deltas(before: str, after: str, name: str, /, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def test_a_scripted_workload_shows_exact_deltas(start_server):
    proc = start_server("--shutdown-delay", "0")
    stub = connect(proc.target)
    before = scrape(proc)

    solo = create(stub, seed=1)
    generate(stub, solo.id, "ab", max_tokens=10)
    crowd = [create(stub, seed=s) for s in range(2, 6)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: generate(stub, s.id, max_tokens=20), crowd))
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            stub.GetSession(pb.GetSessionRequest(session_id="f" * 32))
    with pytest.raises(grpc.RpcError):
        generate(stub, solo.id, temperature=-1)
    short = create(stub, ttl=0.2)
    time.sleep(1.0)
    after = scrape(proc)

    sessions_made = 1 + 4 + 1
    assert deltas(before, after, "lstm_serve_tokens_generated_total", model="tiny") == 10 + 4 * 20
    assert (
        deltas(before, after, "lstm_serve_tokens_fed_total", model="tiny") == sessions_made + 2
    )  # <bos> each, "ab"
    assert (
        deltas(before, after, "lstm_serve_rpc_requests_total", method="CreateSession", code="OK")
        == sessions_made
    )
    assert deltas(before, after, "lstm_serve_rpc_requests_total", method="Generate", code="OK") == 5
    assert deltas(before, after, "lstm_serve_rpc_requests_total", method="GetSession", code="NOT_FOUND") == 3
    assert (
        deltas(before, after, "lstm_serve_rpc_requests_total", method="Generate", code="INVALID_ARGUMENT")
        == 1
    )
    assert deltas(before, after, "lstm_serve_sessions_created_total", model="tiny") == sessions_made
    assert deltas(before, after, "lstm_serve_sessions_expired_total") == 1
    assert deltas(before, after, "lstm_serve_sessions_ended_total", reason="expired") == 1
    assert deltas(before, after, "lstm_serve_time_to_first_token_seconds_count", model="tiny") == 5
    assert deltas(before, after, "lstm_serve_inter_token_latency_seconds_count", model="tiny") == 9 + 4 * 19
    multi_row = deltas(before, after, "lstm_serve_batch_size_rows_count", model="tiny") - deltas(
        before, after, "lstm_serve_batch_size_rows_bucket", model="tiny", le="1.0"
    )
    assert multi_row >= 1, "no batch of 2 or more rows was recorded"
    assert metric(after, "lstm_serve_sessions", location="device") == sessions_made - 1
    assert (
        metric(
            after, "lstm_serve_model_info", name="tiny", cell="lstm", layers="2", hidden="48", backend="torch"
        )
        == 1
    )
    assert short.id


def test_promtool_accepts_the_scrape(server, tmp_path):
    generate(connect(server.target), create(connect(server.target)).id, max_tokens=3)
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=scrape(server), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_query(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"].replace("$__rate_interval", "15s") for p in panels for t in p["targets"]]


@pytest.fixture
def prometheus(server, tmp_path):
    """A real Prometheus, configured from deploy/prometheus.yml, scraping `server` every second."""
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    metrics_target = urllib.parse.urlparse(server.metrics_url).netloc
    config["scrape_configs"][0]["static_configs"] = [{"targets": [metrics_target]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield port
    proc.terminate()
    proc.wait(30)


def wait_for(port: int, query: str, accept, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = prometheus_query(port, query)
            if accept(result):
                return result
        except OSError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"{query} never satisfied the test"
        time.sleep(0.5)


def test_a_real_prometheus_scrapes_the_server_and_runs_every_dashboard_query(server, prometheus):
    stub = connect(server.target)
    stop = threading.Event()

    def load() -> None:
        sessions = [create(stub, seed=s) for s in range(3)]
        while not stop.is_set():
            for s in sessions:
                generate(stub, s.id, max_tokens=20)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        up = wait_for(prometheus, 'up{job="lstm-serve"}', lambda r: r and r[0]["value"][1] == "1")
        assert up[0]["metric"]["job"] == "lstm-serve"
        rate = wait_for(
            prometheus,
            "sum(rate(lstm_serve_tokens_generated_total[10s]))",
            lambda r: r and float(r[0]["value"][1]) > 0,
        )
        assert float(rate[0]["value"][1]) > 0
        time.sleep(3)  # a few more scrapes for the 15s windows
        for query in dashboard_queries():
            assert prometheus_query(prometheus, query), f"no data for dashboard query: {query}"
    finally:
        stop.set()
        worker.join(30)


def test_every_metric_is_documented(server):
    documented = (ROOT / "docs/metrics.md").read_text()
    names = {line.split()[2] for line in scrape(server).splitlines() if line.startswith("# TYPE")}
    missing = sorted(n for n in names if f"`{n}" not in documented)
    assert not missing, f"metrics missing from docs/metrics.md: {missing}"
