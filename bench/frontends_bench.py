"""How serving scales with gRPC front-end processes (`--frontends K`), the model's cost left out.

    python bench/frontends_bench.py                        # K = 1, 2, 4, 8; 256 sessions; 10 s each
    python bench/frontends_bench.py --frontends 1 2 --rounds 5 --duration 8
    python bench/serve_bench.py --frontends 1 2 4 8        # the same, from the serving benchmark

For each K it starts `python -m server.cli serve --backend synthetic --frontends K` on the
default checkpoint (the synthetic backend replaces the model's arithmetic by a cheap hash, so
what is measured is the server's own per-token work), runs `python -m client.cli bench` in
several processes at once (`--load-processes`, a quarter of the cores by default: one client
process tops out near 20k tok/s), each spreading its sessions over one connection each (up to
16, so that every front end gets some),
and measures (b), the bare transport limit of bench/echo.py, in the same run.

Each run also reports the CPU its processes used, in cores: the engine core (one Python
thread: near 1.0 it is the ceiling, and more front ends cannot help), the front ends together,
and the load generators. `--rounds N` runs the K list N times, every other round in reverse
order, and adds a summary per K: the median tokens/s and the median of its ratio to the first
K's run in the same round (paired, so that a noisy machine's drift cancels), with their range.
Writes JSON (bench/results/frontends_bench.json).
It runs with `python3` alone (no console scripts), as on the GPU machine (bench/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from serve_bench import LISTENING, machine, table, transport_limit  # noqa: E402
from serving_gap import children, cpu_seconds  # noqa: E402

LOAD_PROCESSES = max(1, (os.cpu_count() or 1) // 4)  # a quarter of the cores


def serve(frontends: int, models_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Start the server, its output to `log`; wait until it listens and answers SERVING.

    The output goes to a file, not a pipe: a pipe read line by line blocks for good when the
    server hangs silently, or when its engine core outlives it holding the pipe open."""
    command = [
        sys.executable, "-m", "server.cli", "serve", "--models-dir", str(models_dir), "--host", "127.0.0.1",
        "--port", "0", "--metrics-port", "0", "--shutdown-delay", "0", "--backend", "synthetic",
        "--threads", "1", "--device", "cpu", "--frontends", str(frontends),
    ]  # fmt: skip
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline, target = time.monotonic() + 60, ""
    while True:
        if not target and (match := LISTENING.search(log.read_text())):
            target = f"127.0.0.1:{match[2]}"
        client = [sys.executable, "-m", "client.cli", "--target", target, "--timeout", "5", "health"]
        if target and not subprocess.run(client, capture_output=True, cwd=ROOT).returncode:
            break
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(
                f"the server with {frontends} front ends never became SERVING; its output:\n{tail}"
            )
        time.sleep(0.2)
    time.sleep(1.0 if frontends > 1 else 0)  # the other front ends join once the engine is ready
    return proc, target


def server_processes(server: subprocess.Popen) -> dict[str, list[int]]:
    """The server's processes by role: its engine core, and its front ends (itself and the
    K - 1 others it started)."""
    roles: dict[str, list[int]] = {"engine core": [], "front ends": [server.pid]}
    for pid in children(server.pid):
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        roles["engine core" if b"server.engine.process" in command else "front ends"].append(pid)
    return roles


def load(target: str, sessions: int, duration: float, processes: int, server: subprocess.Popen) -> dict:
    """`processes` load generators at once, the sessions split among them: one Python client
    process tops out near 20k tok/s, which would cap the very scaling being measured.
    Tokens/s add up; the ITL percentiles are the worst process's. `cpu_cores`: the CPU seconds
    each role used per second of the run."""
    roles = server_processes(server)
    before = {role: sum(map(cpu_seconds, pids)) for role, pids in roles.items()}
    usage, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    share = [sessions // processes + (i < sessions % processes) for i in range(processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "client.cli", "--target", target, "--json", "bench", "--model", "default"]
            + ["--sessions", str(n), "--duration", str(duration), "--max-tokens", "64", "--no-progress"]
            + ["--seed", str(1 + i), "--ignore-eos"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i, n in enumerate(share)
    ]
    results = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"a load generator exited with code {proc.returncode}")
        results.append(json.loads(stdout))
    wall = time.monotonic() - started
    cores = {role: (sum(map(cpu_seconds, pids)) - before[role]) / wall for role, pids in roles.items()}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cores["load generators"] = (after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime) / wall
    return {
        "load_processes": processes,
        "tokens_per_s": sum(r["tokens_per_s"] for r in results),
        "errors": [r["errors"] for r in results],
        "itl_ms": {q: max(r["itl_ms"][q] for r in results) for q in ("p50", "p99")},
        "cpu_cores": cores,
    }


def run(
    frontends: list[int],
    sessions: int,
    duration: float,
    out: Path,
    processes: int = LOAD_PROCESSES,
    rounds: int = 1,
) -> dict:
    report = {"machine": machine(), "sessions": sessions, "duration_s": duration, "runs": []}
    report["load_processes"] = processes
    print("machine:", json.dumps(report["machine"]), file=sys.stderr)
    connections = min(sessions, 16)  # as many as each load generator spreads its sessions over
    report["transport_limit_tokens_per_s"] = transport = transport_limit(
        [sessions], duration, 64, connections
    )[sessions]
    for round_ in range(1, rounds + 1):
        for k in frontends if round_ % 2 else frontends[::-1]:
            print(f"round {round_}, frontends {k}: {sessions} sessions", file=sys.stderr)
            proc, target = serve(k, ROOT / "models", out.with_name("frontends_server.log"))
            try:
                result = load(target, sessions, duration, processes, proc)
                report["runs"].append({"round": round_, "frontends": k, **result})
            finally:
                proc.terminate()
                proc.wait(60)
    pair_with_first(report["runs"], frontends[0])
    print(table(
        ["round", "frontends", "tok/s", "vs first", "of (b)", "ITL p50 ms", "ITL p99 ms", "engine core CPU", "front ends CPU", "load CPU"],
        [
            [r["round"], r["frontends"], f"{r['tokens_per_s']:,.0f}", f"{r['vs_first']:.2f}x"]
            + [f"{r['tokens_per_s'] / transport:.0%}", r["itl_ms"]["p50"], r["itl_ms"]["p99"]]
            + [f"{r['cpu_cores'][role]:.2f}" for role in ("engine core", "front ends", "load generators")]
            for r in report["runs"]
        ],
    ))  # fmt: skip
    print(
        f"(b) bare transport, {sessions} sessions: {transport:,.0f} tok/s; CPU in cores (1.0 = one core busy)"
    )
    if rounds > 1:
        report["summary"] = summary(report["runs"], frontends)
        print(table(
            ["frontends", "median tok/s", "median vs first", "vs first, range", "median engine core CPU"],
            [
                [s["frontends"], f"{s['median_tokens_per_s']:,.0f}", f"{s['median_vs_first']:.2f}x"]
                + [f"{s['vs_first_min']:.2f}-{s['vs_first_max']:.2f}x", f"{s['median_engine_core_cpu']:.2f}"]
                for s in report["summary"]
            ],
        ))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return report


def pair_with_first(runs: list[dict], first_k: int) -> None:
    """Set each run's `vs_first`: its tokens/s over those of the first run of `first_k` in
    the same round."""
    first: dict[int, float] = {}  # round -> tokens/s
    for r in runs:
        if r["frontends"] == first_k:
            first.setdefault(r["round"], r["tokens_per_s"])
    for r in runs:
        r["vs_first"] = r["tokens_per_s"] / first[r["round"]]


def summary(runs: list[dict], frontends: list[int]) -> list[dict]:
    """Per K, over the rounds: the median tokens/s, and the median and range of its ratio to
    the first K's run of the same round."""
    rows = []
    for k in dict.fromkeys(frontends):
        mine = [r for r in runs if r["frontends"] == k]
        ratios = [r["vs_first"] for r in mine]
        rows.append({
            "frontends": k,
            "runs": len(mine),
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
            "median_vs_first": statistics.median(ratios),
            "vs_first_min": min(ratios),
            "vs_first_max": max(ratios),
            "median_engine_core_cpu": statistics.median(r["cpu_cores"]["engine core"] for r in mine),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frontends", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per K")
    parser.add_argument(
        "--load-processes",
        type=int,
        default=LOAD_PROCESSES,
        help="load generator processes (default: a quarter of the cores, at least 1)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the K list this many times, for paired medians"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/frontends_bench.json")
    args = parser.parse_args()
    run(args.frontends, args.sessions, args.duration, args.out, args.load_processes, args.rounds)


if __name__ == "__main__":
    main()
