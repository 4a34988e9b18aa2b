"""Where serving's per-token time goes: CPU microseconds per token, per process, for the bare
transport, the transport paced as serving paces it, and the server itself.

    python bench/serving_gap.py                        # 64 and 256 sessions, 8 s per run
    python bench/serving_gap.py --sessions 64 --duration 5

Runs, at each session count, one after the other on this machine:
  echo        bench/echo.py's server and client: tokens written back to back on each stream,
              what serve_bench.py calls (b), the transport limit;
  echo paced  the same with `server --paced`: one token per waiting stream per iteration,
              through each stream's queue, as a serving front end must deliver them;
  synthetic   `lstm-serve serve --backend synthetic` (no model arithmetic) and `lstm-client
              bench`, the load generator of serve_bench.py's e2e figures;
  default     the same with the default model.
For each process (server or front end, engine core, load generator) it reads the CPU time it
used during the run (/proc/PID/stat for the servers, getrusage for the client) and divides by
the tokens delivered: the table says which process costs what per token, so the distance
between e2e and (b) splits into its parts. Writes JSON (bench/results/serving_gap.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from serve_bench import BIN, machine, prepare_models, serve, start, stop, table  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def measured(servers: dict[str, int], client: list[str]) -> dict:
    """Run the client to completion; tokens/s and each process's CPU microseconds per token."""
    before = {name: cpu_seconds(pid) for name, pid in servers.items()}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = json.loads(subprocess.run(client, capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = {name: cpu_seconds(pid) - before[name] for name, pid in servers.items()}
    seconds["load generator"] = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    tokens = out["tokens"]
    return {
        "tokens_per_s": out["tokens_per_s"],
        "cpu_us_per_token": {name: 1e6 * s / tokens for name, s in seconds.items()},
    }


def echo_run(sessions: int, duration: float, paced: bool, connections: int) -> dict:
    echo = str(ROOT / "bench/echo.py")
    server, target = start([sys.executable, echo, "server", *(["--paced"] if paced else [])])
    try:
        client = [sys.executable, echo, "client", "--target", target, "--sessions", str(sessions)]
        client += ["--duration", str(duration), "--max-tokens", "64", "--connections", str(connections)]
        return measured({"server": server.pid}, client)
    finally:
        stop(server)


def serve_run(models_dir: Path, backend: str, sessions: int, duration: float, connections: int) -> dict:
    extra = ["--backend", backend, "--frontends", "1"]
    server, target = serve(models_dir, 1, extra)
    try:
        (engine,) = children(server.pid)
        client = [
            str(BIN / "lstm-client"),
            "--target",
            target,
            "--json",
            "bench",
            "--sessions",
            str(sessions),
        ]
        client += ["--duration", str(duration), "--max-tokens", "64", "--no-progress", "--seed", "1"]
        client += ["--connections", str(connections)]
        return measured({"front end": server.pid, "engine core": engine}, client)
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=1, help="HTTP/2 connections, every run alike")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/serving_gap.json")
    args = parser.parse_args()
    report = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}, "runs": []}
    print("machine:", json.dumps(report["machine"]), file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        models = prepare_models(Path(tmp), ["default"])["default"].parent
        for n in args.sessions:
            for name, setup, run, argument in (
                ("echo", "echo", echo_run, False),
                ("echo paced", "echo", echo_run, True),
                ("synthetic", "serve", serve_run, "synthetic"),
                ("default", "serve", serve_run, "torch"),
            ):
                print(f"{name}, {n} sessions ...", file=sys.stderr, flush=True)
                connections = min(args.connections, n)
                if setup == "echo":
                    result = run(n, args.duration, paced=argument, connections=connections)
                else:
                    result = run(models, argument, n, args.duration, connections)
                report["runs"].append({"setup": name, "sessions": n} | result)
    processes = ["server", "front end", "engine core", "load generator"]
    rows = []
    for r in report["runs"]:
        cost = r["cpu_us_per_token"]
        rows.append(
            [r["setup"], r["sessions"], round(r["tokens_per_s"])]
            + [f"{cost[p]:.1f}" if p in cost else "-" for p in processes]
            + [f"{sum(cost.values()):.1f}"]
        )
    print(table(["setup", "sessions", "tok/s", *(f"{p} µs/tok" for p in processes), "all µs/tok"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
