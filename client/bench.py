"""`lstm-client bench`: N concurrent sessions streaming generation; throughput and latency.

Each worker drives one session over a Stream call: (feed the prompt, if any, then)
generate up to `max_tokens`, again and again, until the duration or the token budget
is spent. A failed request is counted under its gRPC status; the worker then starts
over on a new session.

Latencies are per token, a token arriving with its message: with `stream_interval` N > 1
the tokens of one message are 0 ms apart, and the first message's arrival is the time to
first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from client.async_client import AsyncClient
from client.async_session import AsyncSession
from client.errors import LstmServeError, StatusError
from client.options import ClientOptions
from client.render import table

PERCENTILES = (50, 95, 99)
MAX_CONNECTIONS = 16  # the default's cap: enough to reach every front end of a large machine


@dataclass(frozen=True)
class BenchConfig:
    model: str
    sessions: int = 8
    duration: float | None = None
    """Seconds to run; with `tokens`, whichever ends first (neither: 10 s)."""
    tokens: int | None = None
    """Generated tokens to run for, all sessions together."""
    max_tokens: int = 64
    """Tokens per generation request (> 0)."""
    prompt: str = ""
    """Fed before each generation request."""
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    seed: int | None = None
    """Session i gets seed + i; None: random seeds."""
    ignore_eos: bool = False
    """Generate past <eos>: every request then runs to `max_tokens`."""
    stream_interval: int = 1
    """Generated tokens per message from the server (0 or 1: each in its own)."""
    connections: int | None = None
    """HTTP/2 connections the sessions are spread over (None: one per session, at most
    MAX_CONNECTIONS), so that they reach every front-end process of the server."""
    progress: bool = True


@dataclass
class BenchResult:
    config: BenchConfig
    elapsed_s: float = 0.0
    requests: int = 0
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON report."""
        return {
            "model": self.config.model,
            "sessions": self.config.sessions,
            "max_tokens": self.config.max_tokens,
            "stream_interval": max(1, self.config.stream_interval),  # 0 means 1
            "prompt_bytes": len(self.config.prompt.encode()),
            "duration_s": round(self.elapsed_s, 3),
            "requests": self.requests,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "ttft_ms": percentiles_ms(self.ttft_s),
            "itl_ms": percentiles_ms(self.itl_s),
            "errors": dict(self.errors),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentiles_ms(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": round(percentile(values, q) * 1000, 3) if values else None for q in PERCENTILES}


class _Run:
    def __init__(self, clients: list[AsyncClient], config: BenchConfig) -> None:
        self.clients = clients
        self.config = config
        self.result = BenchResult(config)
        duration = config.duration if config.duration is not None or config.tokens is not None else 10.0
        self.deadline = math.inf if duration is None else time.perf_counter() + duration
        self.budget = math.inf if config.tokens is None else config.tokens
        self.claimed = 0  # tokens asked for by requests in flight or done

    def over(self) -> bool:
        return time.perf_counter() >= self.deadline or self.claimed >= self.budget

    async def worker(self, index: int) -> None:
        seed = None if self.config.seed is None else self.config.seed + index
        session: AsyncSession | None = None
        while not self.over():
            try:
                if session is None:
                    client = self.clients[index % len(self.clients)]
                    session = await client.create_session(self.config.model, seed=seed)
                await self.request(session)
            except LstmServeError as e:
                self.result.errors[e.code.name if isinstance(e, StatusError) else type(e).__name__] += 1
                if session is not None:
                    with contextlib.suppress(LstmServeError):
                        await session.close()
                session = None
                await asyncio.sleep(0.1)
        if session is not None:
            with contextlib.suppress(LstmServeError):
                await session.close()

    async def request(self, session: AsyncSession) -> None:
        claim = int(min(self.config.max_tokens, self.budget - self.claimed))
        if claim <= 0:  # others claimed the rest meanwhile (0 would mean the server's limit)
            return
        self.claimed += claim
        got = 0
        try:
            c = self.config
            last = time.perf_counter()
            stream = await session.generate(
                c.prompt,
                max_tokens=claim,
                temperature=c.temperature,
                top_k=c.top_k,
                top_p=c.top_p,
                ignore_eos=c.ignore_eos,
                stream_interval=c.stream_interval,
            )
            received = 0  # tokens of the messages received (a message's all count once it arrives)
            async for _ in stream:
                if len(stream.tokens) > received:  # the first token of a message: it just arrived
                    received = len(stream.tokens)
                    now = time.perf_counter()
                    if now >= self.deadline:
                        await stream.cancel()
                else:  # another token of the same message: it arrived then too
                    now = last
                (self.result.itl_s if got else self.result.ttft_s).append(now - last)
                last = now
                got += 1
                self.result.tokens += 1
            self.result.requests += 1
        finally:
            self.claimed -= claim - got

    async def progress(self, start: float) -> None:
        try:
            from tqdm import tqdm
        except ImportError:  # the bar is a nicety: tqdm is not a core dependency
            return
        tokens = self.config.tokens  # the bar counts tokens if there is a budget, else seconds
        total: float = tokens if tokens is not None else round(self.deadline - start, 1)
        time_format = "{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}{postfix}]"
        with tqdm(
            total=total,
            unit="tok",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
            bar_format=None if tokens is not None else time_format,
        ) as bar:
            while True:
                elapsed = time.perf_counter() - start
                bar.n = min(self.result.tokens if tokens is not None else round(elapsed, 1), total)
                bar.set_postfix(
                    tok_s=f"{self.result.tokens / max(elapsed, 1e-9):.0f}",
                    errors=sum(self.result.errors.values()),
                )
                await asyncio.sleep(0.25)


async def run_bench(target: str, options: ClientOptions, config: BenchConfig) -> BenchResult:
    """Run the load and measure it."""
    connections = config.connections or min(config.sessions, MAX_CONNECTIONS)
    own = dataclasses.replace(options, own_connection=connections > 1)
    clients = [AsyncClient(target, own) for _ in range(connections)]
    run = _Run(clients, config)
    start = time.perf_counter()
    bar = asyncio.create_task(run.progress(start)) if config.progress else None
    try:
        await asyncio.gather(*(run.worker(i) for i in range(config.sessions)))
    finally:
        run.result.elapsed_s = time.perf_counter() - start
        if bar is not None:
            bar.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bar
        for client in clients:
            await client.close()
    return run.result


def report(result: BenchResult) -> str:
    """The table printed at the end."""
    d = result.to_dict()
    errors = ", ".join(f"{code} {n}" for code, n in sorted(d["errors"].items())) or "none"
    summary = table(
        ("model", "sessions", "duration_s", "requests", "tokens", "tokens/s", "stream_interval", "errors"),
        [
            (
                d["model"],
                d["sessions"],
                d["duration_s"],
                d["requests"],
                d["tokens"],
                d["tokens_per_s"],
                d["stream_interval"],
                errors,
            )
        ],
    )
    latency = table(
        ("latency (ms)", *(f"p{q}" for q in PERCENTILES)),
        [
            (name, *("-" if v is None else f"{v:.2f}" for v in d[key].values()))
            for name, key in (("time to first token", "ttft_ms"), ("inter-token", "itl_ms"))
        ],
    )
    return f"{summary}\n\n{latency}"
