"""Soak: hundreds of sessions churning for minutes; server memory, errors and latency over time.

    python bench/soak.py                                   # 500 sessions, 10 minutes
    python bench/soak.py --duration 60 --sessions 100      # a quick check
    python bench/soak.py --duration 0                      # only the cost of `log` durability

It starts `lstm-serve serve` itself, with a short --session-ttl so that expiry really happens,
and runs one asyncio worker per session slot. Each worker loops: create a session (some with
an even shorter TTL of their own), then a few rounds of streaming a generation, detaching and
idling (well inside the TTL), then either delete the session or wait until well past its TTL
and check that the server calls it expired (NOT_FOUND "expired": an expected error). Every
few seconds it samples the server's RSS (/proc/PID/status) and its live sessions (/metrics).
Errors are counted by status, expected or not; inter-token latency is kept per minute.

After the soak, the cost of `log` durability: `lstm-client bench` tokens/s at 64 sessions
against two servers, `--durability none` and `--state-dir X --durability log`, run in the
order none, log, log, none so that drift in the machine's speed cancels out.

Prints tables and writes JSON (bench/results/soak.json by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.serve_bench import client_bench, machine, serve_command, stop, table  # noqa: E402
from client.async_client import AsyncClient  # noqa: E402
from client.async_session import AsyncSession  # noqa: E402
from client.bench import percentile  # noqa: E402
from client.errors import LstmServeError, StatusError  # noqa: E402

LISTENING = re.compile(r"listening on (\S+):(\d+), metrics on (\S+)")
SESSIONS_GAUGE = re.compile(r"^lstm_serve_sessions\{location=\"\w+\"\} (\S+)$", re.M)
EXPIRY_SLACK = 1.5  # seconds past the TTL before an expired session is checked (the sweep runs every 0.25 s)


# ---- the server -------------------------------------------------------------------------------


@dataclass
class Server:
    """A `lstm-serve serve` subprocess whose output is drained (and its tail kept) by a thread."""

    proc: subprocess.Popen
    target: str
    metrics_url: str
    tail: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, models_dir: Path, threads: int, extra: list[str]) -> Server:
        """Start it and wait until its health is SERVING (models loaded)."""
        cmd = serve_command(models_dir, threads, extra)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for line in proc.stdout:
            if match := LISTENING.search(line):
                server = cls(proc, f"127.0.0.1:{match[2]}", match[3])
                threading.Thread(target=server._drain, daemon=True).start()
                server.wait_serving()
                return server
        raise RuntimeError("lstm-serve did not start")

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while time.monotonic() < deadline:
                with contextlib.suppress(grpc.RpcError):
                    if (
                        check(health_pb2.HealthCheckRequest(), timeout=5).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                time.sleep(0.1)
        raise RuntimeError(f"lstm-serve never became SERVING:\n{''.join(self.tail)}")

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.tail = [*self.tail[-50:], line]

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1]) / 1024

    def live_sessions(self) -> int:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        return int(sum(float(v) for v in SESSIONS_GAUGE.findall(text)))


# ---- the churn --------------------------------------------------------------------------------


@dataclass
class Stats:
    """Everything the workers and the sampler record, keyed by minute since the measured start."""

    start: float
    end: float
    itl: defaultdict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    events: Counter[tuple[int, str]] = field(
        default_factory=Counter
    )  # (minute, created/deleted/expired/tokens)
    errors: Counter[tuple[str, bool]] = field(default_factory=Counter)  # (status, expected)
    messages: dict[str, str] = field(default_factory=dict)  # status -> the first unexpected error's message
    samples: list[dict] = field(default_factory=list)  # {t, rss_mb, sessions}

    def minute(self) -> int:
        return int((time.monotonic() - self.start) // 60)

    def measuring(self) -> bool:
        return self.start <= time.monotonic() < self.end

    def count(self, event: str) -> None:
        if self.measuring():
            self.events[self.minute(), event] += 1

    def error(self, error: LstmServeError, expected: bool) -> None:
        """Count an error by status; unexpected ones during the warm-up too."""
        if self.measuring() or not expected:
            code = error.code.name if isinstance(error, StatusError) else type(error).__name__
            self.errors[code, expected] += 1
            if not expected:
                self.messages.setdefault(code, str(error))


class Worker:
    """One session slot: create, generate and idle a few rounds, then delete or let it expire."""

    def __init__(
        self, client: AsyncClient, stats: Stats, args: argparse.Namespace, rng: random.Random, deadline: float
    ) -> None:
        self.client, self.stats, self.args, self.rng, self.deadline = client, stats, args, rng, deadline

    async def run(self) -> None:
        await asyncio.sleep(self.rng.uniform(0, self.args.ttl / 2))  # stagger the start
        while time.monotonic() < self.deadline:
            try:
                await self.lifetime()
            except LstmServeError as e:
                self.stats.error(e, expected=False)
                await asyncio.sleep(1.0)

    async def lifetime(self) -> None:
        short = self.rng.random() < self.args.short_ttl_share
        ttl = self.args.short_ttl if short else self.args.ttl
        session = await self.client.create_session(self.args.model, ttl=ttl if short else None, keep=True)
        self.stats.count("created")
        try:
            for _ in range(self.rng.randint(1, 3)):
                await self.generate(session)
                await session.detach()
                await asyncio.sleep(self.rng.uniform(0, ttl / 2))
        except LstmServeError:
            await self.discard(session)
            raise
        if (
            self.rng.random() < self.args.expire_share
            and time.monotonic() + ttl + EXPIRY_SLACK < self.deadline
        ):
            await self.let_expire(session, ttl)
        else:
            await session.delete()
            self.stats.count("deleted")

    async def generate(self, session: AsyncSession) -> None:
        stream = await session.generate(max_tokens=self.args.max_tokens, temperature=1.0)
        last = None
        async for _ in stream:
            now = time.perf_counter()
            if last is not None and self.stats.measuring():
                self.stats.itl[self.stats.minute()].append(now - last)
            last = now
            self.stats.count("tokens")

    async def let_expire(self, session: AsyncSession, ttl: float) -> None:
        """Wait past the TTL; the session must then be NOT_FOUND and said to have expired."""
        await asyncio.sleep(ttl + EXPIRY_SLACK)
        try:
            if self.rng.random() < 0.5:
                await session.refresh()
            else:
                await self.generate(session)
        except StatusError as e:
            expired = e.code.name == "NOT_FOUND" and "expired" in e.details
            self.stats.error(e, expected=expired)
            if expired:
                self.stats.count("expired")
            await self.discard(session)
            return
        self.stats.errors["NOT_EXPIRED", False] += 1  # alive past its TTL: expiry is broken
        await self.discard(session)

    async def discard(self, session: AsyncSession) -> None:
        """Detach and delete, whatever state the session is in."""
        try:
            await session.delete()
        except LstmServeError:
            pass


async def sample(server: Server, stats: Stats, every: float) -> None:
    while time.monotonic() < stats.end:
        if stats.measuring():
            sessions = await asyncio.to_thread(server.live_sessions)
            stats.samples.append(
                {
                    "t": round(time.monotonic() - stats.start, 1),
                    "rss_mb": round(server.rss_mb(), 2),
                    "sessions": sessions,
                }
            )
        await asyncio.sleep(every)


async def churn(server: Server, args: argparse.Namespace) -> Stats:
    start = time.monotonic() + args.warmup
    stats = Stats(start, start + args.duration)
    rng = random.Random(args.seed)
    async with AsyncClient(server.target) as client:
        workers = [
            Worker(client, stats, args, random.Random(rng.random()), stats.end).run()
            for _ in range(args.sessions)
        ]
        await asyncio.gather(sample(server, stats, args.sample_every), *workers)
    return stats


# ---- the report -------------------------------------------------------------------------------


def minutes_table(stats: Stats, duration: float) -> list[dict]:
    """Per minute: RSS, live sessions, tokens/s, inter-token latency, lifecycle events."""
    rows = []
    for m in sorted({int(s["t"] // 60) for s in stats.samples}):
        seconds = min(60.0, duration - 60 * m)
        samples = [s for s in stats.samples if int(s["t"] // 60) == m]
        itl = stats.itl.get(m, [])
        rows.append(
            {
                "minute": m + 1,
                "rss_mb": round(sum(s["rss_mb"] for s in samples) / len(samples), 2),
                "sessions": round(sum(s["sessions"] for s in samples) / len(samples)),
                "tokens_per_s": round(stats.events[m, "tokens"] / seconds, 1),
                "itl_p50_ms": round(percentile(itl, 50) * 1000, 2) if itl else None,
                "itl_p99_ms": round(percentile(itl, 99) * 1000, 2) if itl else None,
                **{e: stats.events[m, e] for e in ("created", "deleted", "expired")},
            }
        )
    return rows


def summary(stats: Stats, rows: list[dict], duration: float) -> dict:
    """RSS growth (first vs last window of the measured time), errors, and p99 stability."""
    window = min(60.0, duration / 3)
    first = [s["rss_mb"] for s in stats.samples if s["t"] < window]
    last = [s["rss_mb"] for s in stats.samples if s["t"] >= duration - window]
    first_mb, last_mb = sum(first) / len(first), sum(last) / len(last)
    p99s = [r["itl_p99_ms"] for r in rows if r["itl_p99_ms"] is not None]
    return {
        "rss_window_s": window,
        "rss_first_mb": round(first_mb, 2),
        "rss_last_mb": round(last_mb, 2),
        "rss_growth": round(last_mb / first_mb - 1, 4),
        "unexpected_errors": sum(n for (_, expected), n in stats.errors.items() if not expected),
        "expected_errors": sum(n for (_, expected), n in stats.errors.items() if expected),
        "errors": {
            f"{code} ({'expected' if expected else 'unexpected'})": n
            for (code, expected), n in sorted(stats.errors.items())
        },
        "unexpected_error_messages": stats.messages,
        "itl_p99_min_ms": min(p99s, default=None),
        "itl_p99_max_ms": max(p99s, default=None),
        "itl_p99_max_over_min": round(max(p99s) / min(p99s), 2) if p99s else None,
    }


def durability_cost(models_dir: Path, args: argparse.Namespace) -> dict:
    """Tokens/s of `lstm-client bench` with --durability none vs log, in the order A B B A."""
    with tempfile.TemporaryDirectory() as state_dir:
        modes = {"none": ["--durability", "none"], "log": ["--state-dir", state_dir, "--durability", "log"]}
        servers = {mode: Server.start(models_dir, args.threads, extra) for mode, extra in modes.items()}
        runs: dict[str, list[dict]] = {"none": [], "log": []}
        try:
            for mode in ("none", "log", "log", "none"):
                print(
                    f"durability {mode}: {args.bench_sessions} sessions, {args.bench_duration:g} s",
                    file=sys.stderr,
                )
                runs[mode].append(
                    client_bench(
                        servers[mode].target,
                        args.model,
                        args.bench_sessions,
                        args.bench_duration,
                        args.bench_max_tokens,
                    )
                )
        finally:
            for server in servers.values():
                stop(server.proc)
    tokens_per_s = {mode: sum(r["tokens_per_s"] for r in rs) / len(rs) for mode, rs in runs.items()}
    return {
        "runs": runs,
        "tokens_per_s": tokens_per_s,
        "lost": round(1 - tokens_per_s["log"] / tokens_per_s["none"], 4),
    }


def print_report(report: dict) -> None:
    if (soak := report.get("soak")) is not None:
        print_soak(soak)
    if (d := report.get("durability")) is not None:
        print(
            f"\ndurability: {d['tokens_per_s']['none']:,.1f} tok/s with none, {d['tokens_per_s']['log']:,.1f} with log: "
            f"{d['lost']:.1%} lost (target < 10%)"
        )


def print_soak(soak: dict) -> None:
    keys = [
        "minute",
        "rss_mb",
        "sessions",
        "tokens_per_s",
        "itl_p50_ms",
        "itl_p99_ms",
        "created",
        "deleted",
        "expired",
    ]
    print(table(keys, [["-" if r[k] is None else r[k] for k in keys] for r in soak["minutes"]]))
    s = soak["summary"]
    print(
        f"\nRSS {s['rss_first_mb']:.1f} MB (first {s['rss_window_s']:g} s) -> {s['rss_last_mb']:.1f} MB (last {s['rss_window_s']:g} s): "
        f"{s['rss_growth']:+.1%} (target < 5%)"
    )
    print(
        f"errors: {s['unexpected_errors']} unexpected (target 0), {s['expected_errors']} expected; {s['errors'] or 'none'}"
    )
    for code, message in s["unexpected_error_messages"].items():
        print(f"  first {code}: {message}")
    print(
        f"inter-token p99 per minute: {s['itl_p99_min_ms']} .. {s['itl_p99_max_ms']} ms (max/min {s['itl_p99_max_over_min']})"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=600.0,
        help="measured seconds of churn after the warm-up (0: skip the soak)",
    )
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of churn before measuring")
    parser.add_argument("--sessions", type=int, default=500, help="concurrent session slots (workers)")
    parser.add_argument("--ttl", type=float, default=8.0, help="the server's --session-ttl, seconds")
    parser.add_argument("--short-ttl", type=float, default=3.0, help="the TTL some sessions ask for")
    parser.add_argument(
        "--short-ttl-share", type=float, default=0.3, help="share of sessions created with --short-ttl"
    )
    parser.add_argument(
        "--expire-share",
        type=float,
        default=0.4,
        help="share of sessions left to expire (the rest are deleted)",
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per generation")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bench-sessions", type=int, default=64, help="durability benchmark: sessions")
    parser.add_argument(
        "--bench-duration", type=float, default=20.0, help="durability benchmark: seconds per run (0: skip)"
    )
    parser.add_argument("--bench-max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/soak.json")
    args = parser.parse_args()
    if args.duration > 0 and args.sample_every > min(60.0, args.duration / 3):
        parser.error(
            "--sample-every must fit in a third of --duration: RSS is compared between its first and last windows"
        )
    return args


def soak(models_dir: Path, args: argparse.Namespace) -> dict:
    """The churn itself against one server: per-minute rows, their summary and the RSS samples."""
    server = Server.start(models_dir, args.threads, ["--session-ttl", str(args.ttl)])
    print(f"soak: {args.sessions} sessions, {args.warmup:g} s warm-up + {args.duration:g} s", file=sys.stderr)
    try:
        stats = asyncio.run(churn(server, args))
    finally:
        stop(server.proc)
    rows = minutes_table(stats, args.duration)
    return {"minutes": rows, "summary": summary(stats, rows, args.duration), "samples": stats.samples}


def main() -> None:
    args = parse_args()
    report = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}}
    print("machine:", json.dumps(report["machine"]), file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp)
        (models_dir / f"{args.model}.safetensors").write_bytes(
            (ROOT / f"models/{args.model}.safetensors").read_bytes()
        )
        if args.duration > 0:
            report["soak"] = soak(models_dir, args)
        if args.bench_duration > 0:
            report["durability"] = durability_cost(models_dir, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
