"""How serving scales with gRPC front-end processes (`--frontends K`), the model's cost left out.

    python bench/frontends_bench.py                        # K = 1, 2, 4, 8; 256 sessions; 10 s each
    python bench/frontends_bench.py --frontends 1 2 --duration 5
    python bench/serve_bench.py --frontends 1 2 4 8        # the same, from the serving benchmark

For each K it starts `python -m server.cli serve --backend synthetic --frontends K` on the
default checkpoint (the synthetic backend replaces the model's arithmetic by a cheap hash, so
what is measured is the server's own per-token work), runs `python -m client.cli bench` in
several processes at once (`--load-processes`, a quarter of the cores by default: one client
process tops out near 20k tok/s), each spreading its sessions over one connection each (up to
16, so that every front end gets some),
and measures (b), the bare transport limit of bench/echo.py, in the same run. Prints tokens/s
per run (a K given twice runs twice, for a paired comparison), the speed-up over the first
run and the share of (b); writes JSON (bench/results/frontends_bench.json).
It runs with `python3` alone (no console scripts), as on the GPU machine (bench/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from serve_bench import LISTENING, machine, table, transport_limit  # noqa: E402

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


def load(target: str, sessions: int, duration: float, processes: int) -> dict:
    """`processes` load generators at once, the sessions split among them: one Python client
    process tops out near 20k tok/s, which would cap the very scaling being measured.
    Tokens/s add up; the ITL percentiles are the worst process's."""
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
    return {
        "load_processes": processes,
        "tokens_per_s": sum(r["tokens_per_s"] for r in results),
        "errors": [r["errors"] for r in results],
        "itl_ms": {q: max(r["itl_ms"][q] for r in results) for q in ("p50", "p99")},
    }


def run(
    frontends: list[int], sessions: int, duration: float, out: Path, processes: int = LOAD_PROCESSES
) -> dict:
    report = {"machine": machine(), "sessions": sessions, "duration_s": duration, "runs": []}
    report["load_processes"] = processes
    print("machine:", json.dumps(report["machine"]), file=sys.stderr)
    connections = min(sessions, 16)  # as many as each load generator spreads its sessions over
    report["transport_limit_tokens_per_s"] = transport = transport_limit(
        [sessions], duration, 64, connections
    )[sessions]
    for k in frontends:
        print(f"frontends {k}: {sessions} sessions", file=sys.stderr)
        proc, target = serve(k, ROOT / "models", out.with_name("frontends_server.log"))
        try:
            report["runs"].append({"frontends": k, **load(target, sessions, duration, processes)})
        finally:
            proc.terminate()
            proc.wait(60)
    base = report["runs"][0]["tokens_per_s"]
    rows = [
        [r["frontends"], f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base:.2f}x"]
        + [f"{r['tokens_per_s'] / transport:.0%}", r["itl_ms"]["p50"], r["itl_ms"]["p99"]]
        for r in report["runs"]
    ]
    print(table(["frontends", "tok/s", "vs first", "of (b)", "ITL p50 ms", "ITL p99 ms"], rows))
    print(f"(b) bare transport, {sessions} sessions: {transport:,.0f} tok/s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return report


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
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/frontends_bench.json")
    args = parser.parse_args()
    run(args.frontends, args.sessions, args.duration, args.out, args.load_processes)


if __name__ == "__main__":
    main()
