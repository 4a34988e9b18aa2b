"""The write-ahead log of absorbed tokens: segment files of checksummed records.

    state_dir/wal/000001.log, 000002.log, ...

Each record is `<u32 length><u32 crc32 of body><body>`; the body is `<u8 kind><16-byte
session id>` followed by, for TOKENS, `<u64 start position><u16 count><count × u16 token>`,
for CREATE the session's metadata as JSON, and nothing for DELETE. Records are appended by
the step thread after each iteration (one write per iteration) and fsynced by a background
thread every `fsync_interval` seconds; then the sessions' durable positions move up. A
truncated last record (a crash mid-write) is expected and ignored; a checksum mismatch
stops the reading of that segment and is reported.
"""

from __future__ import annotations

import enum
import json
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

_FRAME = struct.Struct("<II")  # length, crc32
_HEAD = struct.Struct("<B16s")  # kind, session id
_TOKENS = struct.Struct("<QH")  # start position, count
MAX_TOKENS_PER_RECORD = 0xFFFF


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
    meta: dict | None = None  # CREATE


def encode(record: Record) -> bytes:
    body = _HEAD.pack(record.kind, bytes.fromhex(record.session_id))
    if record.kind == RecordKind.TOKENS:
        body += _TOKENS.pack(record.start, len(record.tokens)) + struct.pack(f"<{len(record.tokens)}H", *record.tokens)
    elif record.kind == RecordKind.CREATE:
        body += json.dumps(record.meta, separators=(",", ":")).encode()
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def decode_body(body: bytes) -> Record:
    kind, raw_id = _HEAD.unpack_from(body)
    session_id = raw_id.hex()
    rest = body[_HEAD.size :]
    if kind == RecordKind.TOKENS:
        start, count = _TOKENS.unpack_from(rest)
        tokens = struct.unpack_from(f"<{count}H", rest, _TOKENS.size)
        return Record(RecordKind.TOKENS, session_id, start, tokens)
    if kind == RecordKind.CREATE:
        return Record(RecordKind.CREATE, session_id, meta=json.loads(rest))
    return Record(RecordKind(kind), session_id)


def read_segment(path: Path) -> tuple[list[Record], str | None]:
    """The valid records of a segment, and a problem description if it is corrupt."""
    data = path.read_bytes()
    records, offset = [], 0
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        body = data[offset + _FRAME.size : offset + _FRAME.size + length]
        if len(body) < length:
            break  # a record cut short by a crash: the end of the log
        if zlib.crc32(body) != crc:
            return records, f"{path.name}: checksum mismatch at byte {offset}; the rest of the segment is ignored"
        try:
            records.append(decode_body(body))
        except (struct.error, ValueError) as e:
            return records, f"{path.name}: undecodable record at byte {offset} ({e}); the rest of the segment is ignored"
        offset += _FRAME.size + length
    return records, None


class WriteAheadLog:
    """Appends from the step thread; fsyncs from its own thread; rotates between segments."""

    def __init__(self, directory: Path, fsync_interval: float, on_durable: Callable[[list], None]) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.fsync_interval = fsync_interval
        self._on_durable = on_durable  # called with the marks made durable by an fsync
        self._lock = threading.Lock()
        self._pending: list = []  # marks of appends not yet fsynced (opaque to the log)
        self._number = max((int(p.stem) for p in self.segments()), default=0) + 1
        self._file = open(self._path(self._number), "ab")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fsync_forever, name="wal-fsync", daemon=True)
        self._thread.start()

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:06d}.log"

    @property
    def last_segment(self) -> int:
        return self._number

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("*.log"))

    def append(self, records: list[Record], marks: list) -> None:
        """Write records (buffered); `marks` are handed to on_durable once they are on disk."""
        data = b"".join(encode(r) for r in records)
        with self._lock:
            self._file.write(data)
            self._pending.extend(marks)

    def sync(self) -> None:
        """Flush and fsync now; report the marks that became durable."""
        with self._lock:
            self._file.flush()
            fd, marks, self._pending = self._file.fileno(), self._pending, []
            os.fsync(fd)
        if marks:
            self._on_durable(marks)

    def rotate(self) -> int:
        """Continue in a new segment; returns the number of the last old one."""
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())
            marks, self._pending = self._pending, []
            self._file.close()
            old, self._number = self._number, self._number + 1
            self._file = open(self._path(self._number), "ab")
        if marks:
            self._on_durable(marks)
        return old

    def delete_through(self, number: int) -> None:
        """Remove segments up to `number` (their records are covered by snapshots)."""
        for path in self.segments():
            if int(path.stem) <= number:
                path.unlink()

    def _fsync_forever(self) -> None:
        while not self._stop.wait(self.fsync_interval):
            self.sync()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sync()
        self._file.close()


def read_all(directory: Path) -> Iterator[tuple[Record | None, str | None]]:
    """Every valid record of every segment in order; (None, problem) for corrupt segments."""
    for path in sorted(directory.glob("*.log")):
        records, problem = read_segment(path)
        for record in records:
            yield record, None
        if problem:
            yield None, problem
