"""End-to-end serving benchmark against the limits, all measured in one run.

    python bench/serve_bench.py                       # default, 2-layer H=256, synthetic backend
    python bench/serve_bench.py --sessions 1 8 64 --duration 5 --models default h1024x2

Models: `default` (models/default.safetensors), `h256x2` and `h1024x2` (2-layer LSTMs with
random weights: speed does not depend on them), and `synthetic`: the default checkpoint
served with `--backend synthetic`, which replaces the model's arithmetic by a cheap hash, so
that its row shows what the server itself costs.

For each model it starts `lstm-serve serve` itself and runs `lstm-client bench` (a second
process) at each session count, then measures in the same run:
  (a) model limit: the backend's in-process batched step at the same batch sizes, tokens/s;
  (b) transport limit: bench/echo.py, a bare grpc.aio server and client pair streaming
      token-sized lstm-serve messages with no model behind them;
  (c) no batching: the same server with --max-batch-size 1.
e2e is compared with a·b/(a+b), what the machine allows when the model and the transport share
its cores perfectly. e2e and (b) spread their streams over the same number of HTTP/2
connections (`--connections`, default 1: per-message costs grow with the connections, 15% at
64 sessions over 16 here); bench/serving_gap.py splits the distance into each process's part. Prints tables and the ratios, writes JSON (bench/results/serve_bench.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from server import checkpoint  # noqa: E402
from server.kernels import make_backend  # noqa: E402
from server.kernels.state_pool import StatePool  # noqa: E402
from server.model import ModelConfig, RecurrentLM  # noqa: E402

BIN = Path(sys.executable).parent
LISTENING = re.compile(r"listening on (\S+):(\d+)")


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpc": grpc.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


RANDOM_MODELS = {
    "h256x2": ModelConfig(cell="lstm", layers=2, hidden=256, embed=128),
    "h1024x2": ModelConfig(cell="lstm", layers=2, hidden=1024, embed=128),
}


def backend_of(name: str) -> str:
    return "synthetic" if name == "synthetic" else "torch"


def prepare_models(workdir: Path, names: list[str]) -> dict[str, Path]:
    """Each model's file in a directory of its own (see the module docstring)."""
    paths = {}
    for name in names:
        path = workdir / name / f"{name}.safetensors"
        path.parent.mkdir(parents=True)
        if name in ("default", "synthetic"):
            path.write_bytes((ROOT / "models/default.safetensors").read_bytes())
        elif name in RANDOM_MODELS:
            torch.manual_seed(0)
            checkpoint.save(path, RecurrentLM(RANDOM_MODELS[name]))
        else:
            raise SystemExit(f"unknown model {name!r}: use default, synthetic, {', '.join(RANDOM_MODELS)}")
        paths[name] = path
    return paths


def step_limit(
    path: Path, batch_sizes: list[int], threads: int, backend_name: str, seconds: float = 1.5
) -> dict[int, float]:
    """(a) tokens/s of the backend's batched step, in this process."""
    torch.set_num_threads(threads)
    model = checkpoint.load(path).model
    pool = StatePool(model.config, "cpu", max(batch_sizes), max(batch_sizes))
    backend = make_backend(model, pool, backend_name)
    slots = torch.tensor([pool.allocate() for _ in range(max(batch_sizes))])
    limits = {}
    for b in batch_sizes:
        tokens = torch.randint(0, 256, (b,))
        for _ in range(5):
            backend.step(tokens, slots[:b])
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            backend.step(tokens, slots[:b])
            steps += 1
        limits[b] = b * steps / (time.perf_counter() - start)
    return limits


def start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in proc.stdout:
        match = LISTENING.search(line)
        if match:
            return proc, f"127.0.0.1:{match[2]}"
    raise RuntimeError(f"{cmd[:3]} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(30)


def serve_command(models_dir: Path, threads: int, extra: list[str]) -> list[str]:
    """`lstm-serve serve` on loopback, free ports, no shutdown delay: the benchmarks' server."""
    return [
        str(BIN / "lstm-serve"), "serve", "--models-dir", str(models_dir), "--host", "127.0.0.1",
        "--port", "0", "--metrics-port", "0", "--shutdown-delay", "0", "--threads", str(threads), *extra,
    ]  # fmt: skip


def serve(models_dir: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc, target = start(serve_command(models_dir, threads, extra))
    deadline = time.monotonic() + 120
    while subprocess.run(
        [str(BIN / "lstm-client"), "--target", target, "--timeout", "5", "health"], capture_output=True
    ).returncode:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the server never became SERVING")
        time.sleep(0.2)  # still loading its models
    return proc, target


def client_bench(
    target: str,
    model: str,
    sessions: int,
    duration: float,
    max_tokens: int,
    stream_interval: int = 1,
    connections: int = 1,
) -> dict:
    out = subprocess.run(
        [
            str(BIN / "lstm-client"),
            "--target",
            target,
            "--json",
            "bench",
            "--model",
            model,
            "--sessions",
            str(sessions),
            "--duration",
            str(duration),
            "--max-tokens",
            str(max_tokens),
            "--no-progress",
            "--seed",
            "1",
            "--stream-interval",
            str(stream_interval),
            "--connections",
            str(min(connections, sessions)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def transport_limit(
    batch_sizes: list[int], duration: float, max_tokens: int, connections: int = 1
) -> dict[int, float]:
    """(b) tokens/s of bench/echo.py's bare grpc.aio pair, the streams over as many connections
    as the e2e run's."""
    echo = str(ROOT / "bench/echo.py")
    server, target = start([sys.executable, echo, "server"])
    try:
        limits = {}
        for n in batch_sizes:
            out = subprocess.run(
                [
                    sys.executable,
                    echo,
                    "client",
                    "--target",
                    target,
                    "--sessions",
                    str(n),
                    "--duration",
                    str(duration),
                    "--max-tokens",
                    str(max_tokens),
                    "--connections",
                    str(min(connections, n)),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            limits[n] = json.loads(out.stdout)["tokens_per_s"]
        return limits
    finally:
        stop(server)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["default", "h256x2", "synthetic"])
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 8, 64, 256])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per generate request")
    parser.add_argument(
        "--threads", type=int, default=2, help="the server's (and the step limit's) torch threads"
    )
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="tokens per message (the transport limit (b) is then per message: a*N*b/(a+N*b) is the bound)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="HTTP/2 connections the sessions are spread over, in e2e and (b) alike (default: 1)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/serve_bench.json")
    parser.add_argument(
        "--frontends",
        nargs="+",
        type=int,
        help="instead: how the synthetic backend scales with K front ends (bench/frontends_bench.py)",
    )
    args = parser.parse_args()
    if args.frontends:
        import frontends_bench

        frontends_bench.run(
            args.frontends, max(args.sessions), args.duration, ROOT / "bench/results/frontends_bench.json"
        )
        return
    report = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}, "models": {}}
    print("machine:", json.dumps(report["machine"]), file=sys.stderr)

    transport = transport_limit(args.sessions, args.duration, args.max_tokens, args.connections)
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in prepare_models(Path(tmp), args.models).items():
            limit = step_limit(path, args.sessions, args.threads, backend_of(name))
            rows = {}
            for batching, extra in (
                ("batched", ["--max-batch-size", str(max(args.sessions))]),
                ("unbatched", ["--max-batch-size", "1"]),
            ):
                proc, target = serve(path.parent, args.threads, [*extra, "--backend", backend_of(name)])
                try:
                    counts = args.sessions if batching == "batched" else [n for n in args.sessions if n <= 64]
                    for n in counts:
                        print(f"{name}: {batching}, {n} sessions", file=sys.stderr)
                        rows.setdefault(n, {})[batching] = client_bench(
                            target,
                            name,
                            n,
                            args.duration,
                            args.max_tokens,
                            args.stream_interval,
                            args.connections,
                        )
                finally:
                    stop(proc)
            report["models"][name] = {
                "step_limit_tokens_per_s": limit,
                "transport_limit_tokens_per_s": transport,
                "runs": rows,
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwrote {args.out}", file=sys.stderr)


def print_report(report: dict) -> None:
    headers = [
        "model",
        "sessions",
        "e2e tok/s",
        "(a) model tok/s",
        "(b) transport tok/s",
        "e2e/min(a,b)",
        "e2e/(ab/(a+b))",
        "(c) unbatched tok/s",
        "e2e/(c)",
        "TTFT p50 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "p99/p50",
    ]
    rows = []
    for name, m in report["models"].items():
        for n, runs in m["runs"].items():
            e2e = runs["batched"]
            a, b = m["step_limit_tokens_per_s"][n], m["transport_limit_tokens_per_s"][n]
            b *= report["settings"]["stream_interval"]  # (b) counts messages of one token each
            unbatched = runs.get("unbatched", {}).get("tokens_per_s")
            itl = e2e["itl_ms"]
            rows.append(
                [
                    name,
                    n,
                    e2e["tokens_per_s"],
                    a,
                    b,
                    f"{e2e['tokens_per_s'] / min(a, b):.0%}",
                    f"{e2e['tokens_per_s'] * (a + b) / (a * b):.0%}",
                    unbatched if unbatched is not None else "-",
                    f"{e2e['tokens_per_s'] / unbatched:.1f}x" if unbatched else "-",
                    e2e["ttft_ms"]["p50"],
                    itl["p50"],
                    itl["p99"],
                    f"{itl['p99'] / itl['p50']:.2f}" if itl["p50"] else "-",
                ]
            )
    print(table(headers, rows))


if __name__ == "__main__":
    main()
