"""The engine core's own ceiling: tokens/s through it with no gRPC in front.

    python bench/engine_bench.py                          # synthetic backend, 256 sessions, 8 s
    python bench/engine_bench.py --sessions 64 256 --backend torch --duration 5
    python bench/engine_bench.py --backend triton --device cuda   # the real step on a GPU

Every token of every front end passes through the one engine core process, so its per-token
cost caps what `--frontends K` can reach on any number of cores. This benchmark measures that
cap on two: it starts the engine core the way a front end does (server/api/engine_client.py's
EngineClient, our real IPC client) and drives it from this process, with no gRPC, no protobuf
and no network: `--sessions` sessions each generate `--max-tokens` tokens per request, back to
back, the next request sent when one finishes. It reports tokens/s, the engine core's CPU
(in cores: near 1.0 it is the ceiling) and its CPU microseconds per token, and this driver's
own CPU, so that a run limited by the driver rather than the engine shows as such.
Writes JSON (bench/results/engine_bench.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from serve_bench import machine, prepare_models, table  # noqa: E402
from serving_gap import cpu_seconds  # noqa: E402

from server.api.engine_client import EngineClient  # noqa: E402
from server.config import ServeSettings  # noqa: E402
from server.ipc import messages as m  # noqa: E402
from server.sampling import SamplingParams  # noqa: E402
from server.sessions.jobs import FinishedEvent, GenerateSpec, TokenEvent  # noqa: E402
from server.sessions.principal import ANONYMOUS  # noqa: E402

WARMUP = 1.0  # seconds before the measurement starts: every session is streaming by then


class Counter:
    tokens = 0


async def generate_forever(
    client: EngineClient, session_id: str, spec: GenerateSpec, stop: asyncio.Event, counter: Counter
) -> None:
    """One session: a request of `spec`, then the next as soon as it finishes, until `stop`."""
    stream = client.open_stream(ANONYMOUS, session_id, takeover=False)
    await stream.opened()
    requests = 0
    stream.submit(f"r{requests}", [], spec)
    async for event in stream.events():
        if isinstance(event, TokenEvent):
            counter.tokens += 1
        elif isinstance(event, FinishedEvent):
            if stop.is_set():
                break
            requests += 1
            stream.submit(f"r{requests}", [], spec)
    stream.close()


async def measure(
    models_dir: Path, backend: str, device: str, sessions: int, duration: float, max_tokens: int
) -> dict:
    settings = ServeSettings(
        models_dir=models_dir, backend=backend, device=device, threads=1, port=0, metrics_port=0
    )
    client = EngineClient(settings)
    await client.start()
    await client.ready_event.wait()
    ids = []
    for seed in range(sessions):
        reply = await client.call(lambda c, s=seed: m.CreateSession(c, ANONYMOUS, "default", "", s, None))
        ids.append(reply.session.id)
    spec = GenerateSpec(max_tokens, SamplingParams(temperature=1.0), ignore_eos=True)
    stop, counter = asyncio.Event(), Counter()
    tasks = [asyncio.create_task(generate_forever(client, i, spec, stop, counter)) for i in ids]
    await asyncio.sleep(WARMUP)
    engine_pid = client.engine_pid
    tokens, engine_cpu, started = counter.tokens, cpu_seconds(engine_pid), time.monotonic()
    own = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(duration)
    tokens, engine_cpu = counter.tokens - tokens, cpu_seconds(engine_pid) - engine_cpu
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    driver_cpu = after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime
    stop.set()
    await asyncio.gather(*tasks)
    await client.shutdown()
    return {
        "backend": backend,
        "device": device,
        "sessions": sessions,
        "tokens_per_s": tokens / wall,
        "engine_core_cores": engine_cpu / wall,
        "engine_core_us_per_token": 1e6 * engine_cpu / tokens,
        "driver_cores": driver_cpu / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=[256])
    parser.add_argument("--backend", choices=["synthetic", "torch", "triton"], default="synthetic")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per run")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/engine_bench.json")
    args = parser.parse_args()
    report = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}, "runs": []}
    print("machine:", json.dumps(report["machine"]), file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        models = prepare_models(Path(tmp), ["default"])["default"].parent
        for n in args.sessions:
            print(f"{args.backend}, {n} sessions ...", file=sys.stderr, flush=True)
            run = asyncio.run(measure(models, args.backend, args.device, n, args.duration, args.max_tokens))
            report["runs"].append(run)
    rows = [
        [
            r["backend"],
            r["device"],
            r["sessions"],
            f"{r['tokens_per_s']:,.0f}",
            f"{r['engine_core_cores']:.2f}",
        ]
        + [f"{r['engine_core_us_per_token']:.1f}", f"{r['driver_cores']:.2f}"]
        for r in report["runs"]
    ]
    headers = [
        "backend",
        "device",
        "sessions",
        "tok/s",
        "engine core CPU",
        "engine core µs/tok",
        "driver CPU",
    ]
    print(table(headers, rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
