"""The write-ahead log of absorbed tokens: segment files of checksummed frames of records.

    state_dir/wal/000001.log, 000002.log, ...

A segment starts with `SEGMENT_MAGIC`, then frames `<u32 length><u32 crc32 of body><body>`.
A frame is one scheduler iteration's records, written with one `os.write` (unbuffered), so a
crash or a write error mid-frame loses the whole iteration and never half of it: the step
runs only after its frame was written, so no state is ahead of its log. Inside a frame each
record is `<u32 length><u8 kind><16-byte session id>` followed by, for TOKENS, `<u32 life><u64
start position><u16 count><count × u16 token>`, for CREATE the session's metadata as JSON, and
nothing for DELETE. `life` counts a session's restarts from position 0 (creation, resets): a
record of an older life is stale, whatever its position.

A background thread fsyncs the segment every `fsync_interval` seconds; then the sessions'
durable positions move up. A write or fsync error is a fault: appends are refused (the step
threads' requests end UNAVAILABLE) and, every `retry_interval` seconds, the log tries a new
segment (never the failed one), writes the frames not yet fsynced into it again and fsyncs;
on success it serves again. A frame cut short at the end of a segment (a crash, a full disk)
is expected and ignored; a checksum mismatch or a damaged length field inside a segment
stops the reading of that segment and is reported.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from server.config import MAX_TOKENS_PER_RECORD
from server.errors import Unavailable

log = logging.getLogger(__name__)
SEGMENT_MAGIC = b"LSWAL\x00\x02\n"  # format 2: frames of records
_FRAME = struct.Struct("<II")  # length, crc32
_RECORD = struct.Struct("<I")  # record length
_HEAD = struct.Struct("<B16s")  # kind, session id
_TOKENS = struct.Struct("<IQH")  # life, start position, count (at most MAX_TOKENS_PER_RECORD)
MAX_FRAME_BYTES = 64 << 20  # far above any iteration's frame: a longer length field is damage


class RecordKind(enum.IntEnum):
    CREATE = 1
    TOKENS = 2
    DELETE = 3


@dataclass(frozen=True)
class Record:
    kind: RecordKind
    session_id: str
    start: int = 0  # TOKENS: the position before the first token (0: from the zero state)
    tokens: tuple[int, ...] = ()
    life: int = 0  # TOKENS: the session's life (see the module docstring)
    meta: dict | None = None  # CREATE


def tokens_body(session_id: str, start: int, tokens: list[int] | tuple[int, ...], life: int) -> bytes:
    """A TOKENS record's body (what decode_body reads), without building a Record."""
    if len(tokens) > MAX_TOKENS_PER_RECORD:
        raise ValueError(f"a log record holds at most {MAX_TOKENS_PER_RECORD} tokens, got {len(tokens)}")
    return (
        _HEAD.pack(RecordKind.TOKENS, bytes.fromhex(session_id))
        + _TOKENS.pack(life, start, len(tokens))
        + struct.pack(f"<{len(tokens)}H", *tokens)
    )


def encode(record: Record) -> bytes:
    if record.kind == RecordKind.TOKENS:
        body = tokens_body(record.session_id, record.start, record.tokens, record.life)
        return _RECORD.pack(len(body)) + body
    body = _HEAD.pack(record.kind, bytes.fromhex(record.session_id))
    if record.kind == RecordKind.CREATE:
        body += json.dumps(record.meta, separators=(",", ":")).encode()
    return _RECORD.pack(len(body)) + body


def encode_frame(records: list[Record]) -> bytes:
    body = b"".join(encode(r) for r in records)
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def decode_body(body: bytes) -> Record:
    kind, raw_id = _HEAD.unpack_from(body)
    session_id = raw_id.hex()
    rest = body[_HEAD.size :]
    if kind == RecordKind.TOKENS:
        life, start, count = _TOKENS.unpack_from(rest)
        tokens = struct.unpack_from(f"<{count}H", rest, _TOKENS.size)
        return Record(RecordKind.TOKENS, session_id, start, tokens, life)
    if kind == RecordKind.CREATE:
        return Record(RecordKind.CREATE, session_id, meta=json.loads(rest))
    return Record(RecordKind(kind), session_id)


def decode_frame(body: bytes) -> list[Record]:
    records, offset = [], 0
    while offset < len(body):
        (length,) = _RECORD.unpack_from(body, offset)
        offset += _RECORD.size
        if offset + length > len(body):
            raise ValueError("a record runs past the end of its frame")
        records.append(decode_body(body[offset : offset + length]))
        offset += length
    return records


def _valid_frame_after(data: bytes, offset: int) -> bool:
    """Whether a whole frame with a matching checksum starts anywhere after `offset`: then a
    frame that seems cut short is damage inside the segment, not the end of the log."""
    for start in range(offset + 1, len(data) - _FRAME.size + 1):
        length, crc = _FRAME.unpack_from(data, start)
        end = start + _FRAME.size + length
        if 0 < length and end <= len(data) and zlib.crc32(data[start + _FRAME.size : end]) == crc:
            return True
    return False


def read_segment(path: Path) -> tuple[list[Record], str | None]:
    """The valid records of a segment, and a problem description if it is damaged."""
    data = path.read_bytes()
    if not data.startswith(SEGMENT_MAGIC):
        if len(data) < len(SEGMENT_MAGIC) and SEGMENT_MAGIC.startswith(data):
            return [], None  # created at a crash, before its header was written
        return [], f"{path.name}: not a log segment of this format (no header); it is ignored"
    records, offset = [], len(SEGMENT_MAGIC)
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length
        if end > len(data) or length > MAX_FRAME_BYTES:
            if _valid_frame_after(data, offset):
                return (
                    records,
                    f"{path.name}: damaged length field at byte {offset}; the rest of the segment is ignored",
                )
            break  # a frame cut short by a crash or a failed write: the end of this segment
        body = data[offset + _FRAME.size : end]
        if zlib.crc32(body) != crc:
            return (
                records,
                f"{path.name}: checksum mismatch at byte {offset}; the rest of the segment is ignored",
            )
        try:
            records += decode_frame(body)
        except (struct.error, ValueError) as e:
            return (
                records,
                f"{path.name}: undecodable record at byte {offset} ({e}); the rest of the segment is ignored",
            )
        offset = end
    return records, None


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentFile:
    """One segment open for appending, unbuffered: a frame is recorded once `write` returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            self.write(SEGMENT_MAGIC)
            os.fsync(self.fd)
            fsync_directory(path.parent)  # the new file's name is durable too
        except BaseException:
            self.close()
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_failed(error: OSError) -> Unavailable:
    return Unavailable(
        f"state dir write failed: {error.strerror or error}; the server retries and serves again once the disk accepts writes"
    )


class WriteAheadLog:
    """Appends from the engine's loop (before each step); fsyncs, and retries after a fault, from its own thread."""

    def __init__(
        self,
        directory: Path,
        fsync_interval: float,
        on_durable: Callable[[list], None],
        on_fault: Callable[[str, OSError], None] = lambda operation, error: None,
        on_recovered: Callable[[], None] = lambda: None,
        retry_interval: float = 1.0,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.fsync_interval = fsync_interval
        self.retry_interval = retry_interval
        self._on_durable = on_durable  # called with the marks made durable by an fsync
        self._on_fault = on_fault  # called with ("write" or "fsync", the error) when the log fails
        self._on_recovered = on_recovered
        self._lock = threading.Lock()  # the current segment, the unsynced frames, the failure
        self._sync_lock = (
            threading.Lock()
        )  # one fsync, rotation or recovery at a time; only it closes segments
        self._unsynced: list[tuple[bytes, list]] = []  # frames written since the last fsync, with their marks
        self.failure: OSError | None = None
        self._number = max((int(p.stem) for p in self.segments()), default=0) + 1
        self._segment = SegmentFile(self._path(self._number))
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by a fault (retry on the retry interval) and by close
        self._thread = threading.Thread(target=self._sync_forever, name="wal-sync", daemon=True)
        self._thread.start()

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:06d}.log"

    @property
    def last_segment(self) -> int:
        return self._number

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("*.log"))

    def append(self, records: list[Record], marks: list) -> None:
        """Write one frame; `marks` are handed to on_durable once it is fsynced. UNAVAILABLE
        (nothing recorded) while the log is failed or if this write fails."""
        frame = encode_frame(records)
        with self._lock:
            if self.failure is not None:
                raise write_failed(self.failure)
            try:
                self._segment.write(frame)
            except OSError as e:
                self.failure = e
                error = e
            else:
                self._unsynced.append((frame, marks))
                return
        self._wake.set()
        self._on_fault("write", error)
        raise write_failed(error) from error

    def sync(self) -> None:
        """fsync now and report the marks that became durable (nothing while failed)."""
        with self._sync_lock:
            with self._lock:
                if self.failure is not None:
                    return
                segment, batch, self._unsynced = self._segment, self._unsynced, []
            if not batch:
                return
            try:
                segment.fsync()  # outside the append lock: a slow disk does not stall the steps
            except OSError as e:
                with self._lock:
                    self._unsynced[:0] = batch  # still to be made durable, in a new segment
                    self.failure = e
                self._wake.set()
                self._on_fault("fsync", e)
                return
        self._report(batch)

    def rotate(self) -> int:
        """Continue in a new segment (the old one fsynced); returns the number of the last old one."""
        with self._sync_lock:
            with self._lock:
                if self.failure is not None:
                    raise write_failed(self.failure)
            new = SegmentFile(self._path(self._number + 1))
            with self._lock:
                old, batch = self._segment, self._unsynced
                self._segment, self._unsynced = new, []
                number, self._number = self._number, self._number + 1
            try:
                old.fsync()
            except OSError as e:
                with self._lock:
                    self._unsynced[:0] = batch
                    self.failure = e
                self._wake.set()
                self._on_fault("fsync", e)
                raise write_failed(e) from e
            finally:
                old.close()
        self._report(batch)
        return number

    def _recover(self) -> bool:
        """After a fault: a new segment holding every unsynced frame, fsynced; True on success."""
        with self._sync_lock:
            self._number += 1
            try:
                segment = SegmentFile(self._path(self._number))
            except OSError as e:
                log.warning("state dir still failing: %s", e)
                with contextlib.suppress(OSError):
                    self._path(self._number).unlink(missing_ok=True)
                return False
            with self._lock:  # appends are refused while failed: nothing is added meanwhile
                batch = list(self._unsynced)
            try:
                for frame, _ in batch:
                    segment.write(frame)
                segment.fsync()
            except OSError as e:
                log.warning("state dir still failing: %s", e)
                segment.close()
                with contextlib.suppress(OSError):
                    segment.path.unlink(missing_ok=True)  # it holds nothing that is not elsewhere
                return False
            with self._lock:
                old, self._segment = self._segment, segment
                self._unsynced, self.failure = [], None
            old.close()
        self._report(batch)
        self._on_recovered()
        return True

    def _report(self, batch: list[tuple[bytes, list]]) -> None:
        marks = [mark for _, frame_marks in batch for mark in frame_marks]
        if marks:
            self._on_durable(marks)

    def delete_through(self, number: int) -> None:
        """Remove segments up to `number` (their records are covered by snapshots)."""
        for path in self.segments():
            if int(path.stem) <= number:
                path.unlink()

    def _sync_forever(self) -> None:
        while True:
            self._wake.wait(self.retry_interval if self.failure is not None else self.fsync_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.failure is None:
                    self.sync()
                else:
                    self._recover()
            except Exception:  # never die silently: the log must go on trying
                log.exception("write-ahead log thread error")

    def close(self) -> None:
        """Stop the thread and fsync what was written (UNAVAILABLE if the log is failed)."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self.sync()
        with self._sync_lock:
            self._segment.close()
        if self.failure is not None:
            raise write_failed(self.failure)


def read_all(directory: Path) -> Iterator[tuple[Record | None, str | None]]:
    """Every valid record of every segment in order; (None, problem) for damaged segments."""
    for path in sorted(directory.glob("*.log")):
        records, problem = read_segment(path)
        for record in records:
            yield record, None
        if problem:
            yield None, problem
