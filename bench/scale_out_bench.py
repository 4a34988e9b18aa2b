"""Scale-out figures (docs/scale-out.md): failover time, the Redis store's cost, replicas behind HAProxy.

    python bench/scale_out_bench.py                      # all three, 64 sessions, 10 s runs
    python bench/scale_out_bench.py --only cost --duration 5

It starts everything itself on loopback (redis-server with appendonly yes and appendfsync
always, `lstm-serve serve` replicas on the default model, HAProxy with deploy/haproxy.cfg's
settings and one server line per replica) and measures, in one run:
  cost      tokens/s of `lstm-client bench` against one server with --state-dir (log mode,
            the local write-ahead log) and against one with --session-store (Redis);
  replicas  tokens/s through HAProxy with 1, 2 and 3 replicas sharing the Redis store;
  failover  64 sessions streaming through HAProxy to two replicas; one replica is killed
            with SIGKILL; for each of its sessions, the time from the kill to the first token
            after resume() (the router notices, another replica takes the session over).
Prints tables, writes JSON (bench/results/scale_out_bench.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from serve_bench import LISTENING, machine, table  # noqa: E402

from client import Client, ClientOptions, StatusError, retry  # noqa: E402
from tests.cluster import RedisServer, free_port  # noqa: E402


def serve(work: Path, name: str, *flags: str) -> tuple[subprocess.Popen, str, str]:
    """(the server, its gRPC target, its metrics port), its output in work/<name>.log."""
    log = work / f"{name}.log"
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    command += ["--metrics-port", "0", "--shutdown-delay", "0", "--session-ttl", "600", *flags]
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (match := LISTENING.search(log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    metrics_url = re.search(r"metrics on (\S+)", log.read_text())[1]  # http://HOST:PORT/metrics
    target, metrics = f"127.0.0.1:{match[2]}", metrics_url.rsplit(":", 1)[1].split("/")[0]
    with Client(target, ClientOptions(timeout=5)) as client:
        while client.health() != "SERVING":
            time.sleep(0.1)
    return proc, target, metrics


def haproxy(work: Path, replicas: list[tuple[str, str]]) -> tuple[subprocess.Popen, str]:
    """HAProxy with deploy/haproxy.cfg's settings and one server per replica."""
    lines = (ROOT / "deploy/haproxy.cfg").read_text().splitlines()
    servers = [
        f"    server replica{i} {target} proto h2 check check-proto h1 port {metrics}"
        for i, (target, metrics) in enumerate(replicas, 1)
    ]
    kept = [line for line in lines if not line.strip().startswith("server replica")]
    at = next(i for i, line in enumerate(kept) if "default-server" in line) + 1
    config = work / f"haproxy-{len(replicas)}.cfg"
    config.write_text("\n".join(kept[:at] + servers + kept[at:]) + "\n")
    listen, stats = free_port(), free_port()
    env = {**os.environ, "LISTEN": f"127.0.0.1:{listen}", "STATS": f"127.0.0.1:{stats}"}
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], env=env, stdout=subprocess.DEVNULL)
    time.sleep(1.5)  # its first health checks (every 0.5 s, up after 2)
    return proc, f"127.0.0.1:{listen}"


def load(target: str, sessions: int, duration: float) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "--target", target, "--json", "bench", "--model", "default"]
        + ["--sessions", str(sessions), "--duration", str(duration), "--max-tokens", "64", "--no-progress"]
        + ["--seed", "1", "--ignore-eos"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout)


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(60)


def store_cost(work: Path, store: RedisServer, sessions: int, duration: float, pairs: int = 2) -> dict:
    """Alternating runs (state dir, Redis) x `pairs`, each store's ratio within its pair."""
    runs = []
    for pair in range(pairs):
        flags = {
            "state dir": ["--state-dir", str(work / f"state{pair}")],
            "redis": ["--session-store", store.url],
        }
        tps = {}
        for name, extra in flags.items():
            proc, target, _ = serve(work, f"{name.replace(' ', '-')}-{pair}", *extra)
            try:
                tps[name] = load(target, sessions, duration)["tokens_per_s"]
            finally:
                stop(proc)
        runs.append({**tps, "ratio": tps["redis"] / tps["state dir"]})
    rows = [
        [i + 1, f"{r['state dir']:,.0f}", f"{r['redis']:,.0f}", f"{r['ratio']:.2f}"]
        for i, r in enumerate(runs)
    ]
    print(table(["pair", "state dir tok/s", "redis tok/s", "redis / state dir"], rows))
    return {"pairs": runs}


def replica_scaling(work: Path, store: RedisServer, sessions: int, duration: float) -> dict:
    runs = {}
    for n in (1, 2, 3):
        servers = [serve(work, f"replica{n}-{i}", "--session-store", store.url) for i in range(n)]
        proxy, target = haproxy(work, [(t, m) for _, t, m in servers])
        try:
            runs[n] = load(target, sessions, duration)["tokens_per_s"]
        finally:
            stop(proxy, *(p for p, _, _ in servers))
    print(table(["replicas", "tok/s"], [[n, f"{v:,.0f}"] for n, v in runs.items()]))
    return runs


def failover(work: Path, store: RedisServer, sessions: int) -> dict:
    servers = [serve(work, f"failover-{i}", "--session-store", store.url) for i in range(2)]
    proxy, target = haproxy(work, [(t, m) for _, t, m in servers])
    killed_at, first_after, resumed = [0.0], {}, set()
    error_after, resumed_after = {}, {}  # per session: when its stream failed, when resume() returned
    with Client(target, ClientOptions(timeout=30)) as client:
        handles = [client.create_session("default", seed=i) for i in range(sessions)]
        started = threading.Barrier(sessions + 1)

        def run(i: int) -> None:
            handle, count = handles[i], 0
            started.wait()
            while count < 400:
                try:
                    for _ in handle.generate(max_tokens=400 - count, ignore_eos=True):
                        count += 1
                        if killed_at[0] and i in resumed and i not in first_after:
                            first_after[i] = time.monotonic() - killed_at[0]
                except StatusError as e:
                    if not retry.retriable(e):
                        raise
                    resumed.add(i)
                    error_after.setdefault(i, time.monotonic() - killed_at[0])
                    count += len(handle.resume(deadline=60).missed)
                    resumed_after.setdefault(i, time.monotonic() - killed_at[0])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(sessions)]
        for thread in threads:
            thread.start()
        started.wait()
        time.sleep(2.0)  # every stream under way
        killed_at[0] = time.monotonic()
        servers[0][0].send_signal(signal.SIGKILL)
        for thread in threads:
            thread.join(300)
    stop(proxy, servers[1][0])
    times = sorted(first_after.values())

    def median(values: dict) -> float:
        return sorted(values.values())[len(values) // 2]

    result = {
        "sessions": sessions,
        "interrupted": len(resumed),
        "first_token_after_kill_s": {
            "p50": times[len(times) // 2],
            "p99": times[min(len(times) - 1, int(len(times) * 0.99))],
            "max": times[-1],
        },
        "stream_failed_after_kill_s_p50": median(error_after),
        "resumed_after_kill_s_p50": median(resumed_after),
    }
    print(
        table(
            ["interrupted sessions", "p50 s", "p99 s", "max s"],
            [
                [len(resumed)]
                + [f"{result['first_token_after_kill_s'][q]:.2f}" for q in ("p50", "p99", "max")]
            ],
        )
    )
    print(
        f"p50: the stream failed {result['stream_failed_after_kill_s_p50']:.2f} s after the kill, "
        f"resume() returned after {result['resumed_after_kill_s_p50']:.2f} s"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run")
    parser.add_argument("--only", choices=["cost", "replicas", "failover"], nargs="+")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/scale_out_bench.json")
    args = parser.parse_args()
    parts = args.only or ["cost", "replicas", "failover"]
    report = {"machine": machine(), "sessions": args.sessions, "duration_s": args.duration}
    print("machine:", json.dumps(report["machine"]), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
        work = Path(tmp)
        store = RedisServer(work / "redis", free_port())
        store.directory.mkdir()
        store.start()
        try:
            if "cost" in parts:
                report["store_cost_tokens_per_s"] = store_cost(work, store, args.sessions, args.duration)
            if "replicas" in parts:
                report["replicas_tokens_per_s"] = replica_scaling(work, store, args.sessions, args.duration)
            if "failover" in parts:
                report["failover"] = failover(work, store, args.sessions)
        finally:
            store.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
