"""Sessions in Redis, shared by every replica: keys, fenced writes, and the writer thread.

    lstm:{<id>}:epoch   the epoch the session is held under (INCR by every takeover)
    lstm:{<id>}:meta    its metadata, JSON (owner, model, version, seed, ttl, created_at)
    lstm:{<id>}:snap    its last snapshot (the bytes of a state dir's .snap file)
    lstm:{<id>}:log     its absorbed tokens since that snapshot: journal TOKENS record bodies
    lstm:owner:<owner>  the owner's session ids, scored by their expiry (ListSessions, "expired")

A replica holds a session under an epoch: it claims epoch 1 when it creates the session, or
takes it over (from a replica that died, or that a router no longer sends it to) by bumping
the epoch atomically with reading its snapshot and log. Every write runs WRITE, which checks
the epoch first: a replica that lost a session (stopped, partitioned, then back) can never
write over the new holder's state. Every key expires a TTL after it was last refreshed (see
WRITE); the owner's index keeps an expired id a while longer, so that every replica can answer
"expired" (see redis_scripts.INDEX). The scripts are in redis_scripts.py.

The writer sends what the engine queued, in order, as one pipeline per round trip (one
scheduler iteration's records, or several when Redis is slower than the steps). A token is
durable once Redis acknowledged its record (the server runs it with appendfsync always).
When Redis cannot be written, appends are refused (UNAVAILABLE) and the unacknowledged
writes are sent again every `retry_interval` seconds, in the same order, until they succeed.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import msgspec
import redis

from server.durability.redis_scripts import LIST, LIST_MORE, LIST_PAGE, TAKE_OVER, WRITE
from server.errors import Unavailable

log = logging.getLogger(__name__)

CHUNK = 256  # writes per WRITE call: a backlog after an outage does not hold Redis in one long script
FAILURES = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)


@functools.lru_cache(maxsize=1 << 16)  # every iteration writes the same sessions' keys
def keys(session_id: str) -> tuple[str, str, str, str]:
    base = f"lstm:{{{session_id}}}"  # one hash slot per session
    return f"{base}:epoch", f"{base}:meta", f"{base}:log", f"{base}:snap"


def index_key(owner: str) -> str:
    """The owner's index: its session ids, scored by their expiry time (redis_scripts.INDEX)."""
    return f"lstm:owner:{owner}"


@functools.lru_cache(maxsize=1 << 16)
def write_keys(session_id: str, owner: str) -> tuple[str, str, str, str, str]:
    """A write's KEYS (redis_scripts.WRITE)."""
    return *keys(session_id), index_key(owner)


class Write(NamedTuple):
    """One fenced write of a session: a log record, a snapshot, or its deletion (a tuple: one
    per session per iteration is made on the engine's thread)."""

    op: str  # "append", "snapshot", "touch", "delete" or "expire"
    session_id: str
    owner: str
    epoch: int
    ttl_ms: int
    payload: bytes = b""
    meta: str = ""  # the session's metadata JSON, on its first write


@dataclass(frozen=True)
class Stored:
    """A session as the store lists it (LIST)."""

    id: str
    epoch: int | None
    meta: dict
    remaining_ttl: float  # seconds
    position: int  # what a takeover would restore; -1: unknown


@dataclass(frozen=True)
class TakenOver:
    epoch: int
    meta: dict
    snapshot: bytes  # b"": none yet
    records: list[bytes]  # TOKENS record bodies since the snapshot
    remaining_ttl: float  # seconds


def unreachable(url: str, error: Exception) -> Unavailable:
    return Unavailable(
        f"the session store {url} cannot be reached or written ({error}); the server retries and serves "
        f"again once Redis answers"
    )


class RedisSessions:
    """The session store's client: claims, epochs, takeovers, and the fenced writes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._shas: dict[str, str] = {}  # script -> its SHA1, once loaded

    def check(self) -> None:
        """ConnectionError (and friends) if Redis cannot be reached or does not answer."""
        self.client.ping()

    def claim(self, session_id: str) -> bool:
        """Epoch 1 for a new session id; False if the store knows the id already."""
        return bool(self.client.set(keys(session_id)[0], 1, nx=True))

    def epoch_of(self, session_id: str) -> int | None:
        value = self.client.get(keys(session_id)[0])
        return None if value is None else int(value)

    def expired_at(self, session_id: str, owner: str) -> float | None:
        """For a session whose keys are gone: when it expired (unix time), if it is the owner's
        and did lately (a deleted one leaves the index); None if the store does not know it."""
        score = self.client.zscore(index_key(owner), session_id)
        return None if score is None else min(score / 1000, time.time())  # Redis's clock may run ahead

    def _sha(self, script: str) -> str:
        if script not in self._shas:
            self._shas[script] = self.client.script_load(script)
        return self._shas[script]

    def list(self, owner: str) -> list[Stored]:
        """The owner's live sessions (see redis_scripts.LIST_PAGE)."""
        key = index_key(owner)
        try:
            first, rest = self.client.evalsha(self._sha(LIST), 1, key, LIST_PAGE)
            pipe = self.client.pipeline(transaction=False)
            for start in range(0, len(rest), LIST_PAGE):
                pipe.evalsha(self._sha(LIST_MORE), 1, key, *rest[start : start + LIST_PAGE])
            pages = pipe.execute() if rest else []
        except redis.exceptions.NoScriptError:  # Redis restarted with an empty script cache
            self._shas.clear()
            return self.list(owner)
        return [
            Stored(i.decode(), None if e is None else int(e), msgspec.json.decode(m), max(0, t) / 1000, p)
            for page in (first, *pages)
            for i, e, m, t, p in page
        ]

    def take_over(self, session_id: str, owner: str) -> TakenOver | None:
        """Hold the session under a new epoch and read it; None if it is not `owner`'s."""
        found = self.client.eval(TAKE_OVER, 4, *keys(session_id), owner)
        if found is None:
            return None
        epoch, meta, snapshot, records, pttl = found
        return TakenOver(int(epoch), json.loads(meta), snapshot, list(records), max(0, int(pttl)) / 1000)

    def write(self, batch: list[Write]) -> list[bool]:
        """One round trip: every write of `batch` in order (WRITE calls of up to CHUNK writes,
        pipelined); False where the epoch had moved on."""
        sha = self._sha(WRITE)
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, len(batch), CHUNK):
            chunk = batch[start : start + CHUNK]
            names = [key for w in chunk for key in write_keys(w.session_id, w.owner)]
            args = [arg for w in chunk for arg in (w.op, w.epoch, w.ttl_ms, w.payload, w.meta)]
            pipe.evalsha(sha, len(names), *names, *args)
        try:
            results = pipe.execute()
        except redis.exceptions.NoScriptError:  # Redis restarted with an empty script cache
            self._shas.clear()
            return self.write(batch)
        return [bool(done) for chunk in results for done in chunk]


class RedisWriter:
    """Sends the writes the engine queues, from its own thread, one pipeline per round trip.

    on_durable(marks): the marks (session, life, position) of acknowledged records;
    on_fenced(session ids): sessions whose writes were refused (another replica holds them);
    on_fault(error) once when Redis stops accepting writes, on_recovered() when it accepts them again.
    """

    def __init__(
        self,
        sessions: RedisSessions,
        on_durable: Callable[[list], None],
        on_fenced: Callable[[set[str]], None],
        on_fault: Callable[[Exception], None],
        on_recovered: Callable[[], None],
        retry_interval: float = 0.5,
    ) -> None:
        self.sessions = sessions
        self.retry_interval = retry_interval
        self._on_durable, self._on_fenced = on_durable, on_fenced
        self._on_fault, self._on_recovered = on_fault, on_recovered
        self._lock = threading.Lock()  # the queue and the failure
        self._flush_lock = threading.Lock()  # one round trip at a time, in queue order
        self._queue: list[tuple[list[Write], list]] = []  # (writes, their marks), oldest first
        self.failure: Exception | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send_forever, name="redis-writer", daemon=True)
        self._thread.start()

    def append(self, writes: list[Write], marks: list) -> None:
        """Queue writes (marks: made durable once acknowledged); UNAVAILABLE, nothing queued,
        while Redis cannot be written."""
        with self._lock:
            if self.failure is not None:
                raise unreachable(self.sessions.url, self.failure)
            self._queue.append((writes, marks))
        self._wake.set()

    def flush(self) -> None:
        """Send everything queued so far, from the calling thread; UNAVAILABLE if Redis cannot
        be written (the writes stay queued and are sent again)."""
        with self._flush_lock:
            with self._lock:
                batch, self._queue = self._queue, []
            if not batch:
                if self.failure is not None:
                    raise unreachable(self.sessions.url, self.failure)
                return
            writes = [w for ws, _ in batch for w in ws]
            try:
                accepted = self.sessions.write(writes)
            except FAILURES as e:
                with self._lock:
                    self._queue[:0] = batch
                    first, self.failure = self.failure is None, e
                if first:
                    self._on_fault(e)
                raise unreachable(self.sessions.url, e) from e
            with self._lock:
                recovered, self.failure = self.failure is not None, None
        ended = ("delete", "expire")
        fenced = {w.session_id for w, ok in zip(writes, accepted) if not ok and w.op not in ended}
        marks = [mark for _, ms in batch for mark in ms if mark[0].id not in fenced]
        if marks:
            self._on_durable(marks)
        if fenced:
            self._on_fenced(fenced)
        if recovered:
            self._on_recovered()

    def _send_forever(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.retry_interval if self.failure is not None else None)
            self._wake.clear()
            try:
                self.flush()
            except Unavailable:
                pass  # logged by on_fault; sent again after retry_interval
            except Exception:  # never die silently: the writes must go on
                log.exception("redis writer error")

    def close(self) -> None:
        """Send what is queued, then stop the thread (UNAVAILABLE if Redis cannot be written)."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self.flush()
