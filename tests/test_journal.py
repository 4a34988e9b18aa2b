"""The log's rules, in process: frames are all or nothing, damage inside a segment is reported,
records of an older life are stale, a failed log refuses appends and recovers on a new segment."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.config import ServeSettings
from server.durability import journal
from server.durability.journal import (
    MAX_TOKENS_PER_RECORD,
    SEGMENT_MAGIC,
    Record,
    RecordKind,
    WriteAheadLog,
    encode_frame,
    read_segment,
)
from server.durability.restore import Restored, extend
from server.errors import Unavailable

SID = "ab" * 16


def tokens(start: int, values: list[int], life: int = 1) -> Record:
    return Record(RecordKind.TOKENS, SID, start, tuple(values), life)


def write_segment(path: Path, frames: list[list[Record]]) -> list[int]:
    """A segment of `frames`; returns the byte offset of each frame."""
    data, offsets = bytearray(SEGMENT_MAGIC), []
    for frame in frames:
        offsets.append(len(data))
        data += encode_frame(frame)
    path.write_bytes(bytes(data))
    return offsets


def test_a_frame_cut_short_at_the_end_loses_its_whole_iteration(tmp_path):
    path = tmp_path / "000001.log"
    write_segment(
        path, [[tokens(0, [256])], [tokens(1, [1]), Record(RecordKind.TOKENS, "cd" * 16, 5, (2,), 1)]]
    )
    path.write_bytes(path.read_bytes()[:-3])
    records, problem = read_segment(path)
    assert problem is None and records == [tokens(0, [256])]


def test_a_damaged_length_inside_a_segment_is_reported(tmp_path):
    path = tmp_path / "000001.log"
    offsets = write_segment(path, [[tokens(0, [256])], [tokens(1, [1])], [tokens(2, [2])]])
    data = bytearray(path.read_bytes())
    data[offsets[1] : offsets[1] + 4] = (1 << 20).to_bytes(4, "little")  # runs past the end
    path.write_bytes(bytes(data))
    records, problem = read_segment(path)
    assert records == [tokens(0, [256])]
    assert problem is not None and f"damaged length field at byte {offsets[1]}" in problem


def test_records_are_bounded():
    with pytest.raises(ValueError, match="at most 65535 tokens"):
        encode_frame([tokens(1, [1] * (MAX_TOKENS_PER_RECORD + 1))])
    with pytest.raises(ValidationError, match="prefill_chunk"):
        ServeSettings(prefill_chunk=MAX_TOKENS_PER_RECORD + 1)


def test_a_newer_life_restarts_the_replay_and_older_lives_are_stale():
    session = Restored({"id": SID}, position=11, life=1)  # a snapshot at 11, before a reset
    extend(session, tokens(0, [256], life=2))  # the reset
    extend(session, tokens(1, [7, 8], life=2))
    extend(session, tokens(11, [9], life=1))  # a stale record of the old life (a frame written again)
    extend(session, tokens(1, [7, 8], life=2))  # a covered copy
    assert (session.position, session.replay, session.problem) == (0, [256, 7, 8], None)
    extend(session, tokens(5, [1], life=2))
    assert "jumps from position 3 to 5" in session.problem


class FlakySegment(journal.SegmentFile):
    """Fails writes or fsyncs with EIO while `fault` names the operation."""

    fault: str | None = None

    def write(self, data: bytes) -> None:
        if FlakySegment.fault == "write" and data != SEGMENT_MAGIC:
            raise OSError(errno.EIO, "Input/output error")
        super().write(data)

    def fsync(self) -> None:
        if FlakySegment.fault == "fsync":
            raise OSError(errno.EIO, "Input/output error")
        super().fsync()


@pytest.mark.parametrize("fault", ["write", "fsync"])
def test_a_failed_log_refuses_appends_then_recovers_on_a_new_segment(tmp_path, monkeypatch, fault):
    monkeypatch.setattr(journal, "SegmentFile", FlakySegment)
    durable, faults, recovered = [], [], threading.Event()
    wal = WriteAheadLog(
        tmp_path, 3600, durable.extend, lambda op, e: faults.append(op), recovered.set, retry_interval=0.05
    )
    wal.append([tokens(0, [256])], ["a"])
    FlakySegment.fault = fault
    try:
        if fault == "write":
            with pytest.raises(Unavailable, match="state dir write failed: Input/output error"):
                wal.append([tokens(1, [1])], ["b"])
        else:
            wal.sync()
        assert faults == [fault] and wal.failure is not None and durable == []
        with pytest.raises(Unavailable):
            wal.append([tokens(1, [1])], ["c"])  # refused while failed: nothing recorded
        assert not recovered.wait(0.3)  # retries fail while the fault lasts
    finally:
        FlakySegment.fault = None
    assert recovered.wait(5)
    assert durable == ["a"] and wal.failure is None
    wal.append([tokens(1, [2])], ["d"])
    wal.close()
    assert durable == ["a", "d"]
    newest = wal.segments()[-1]
    assert int(newest.stem) > 2  # never the failed segment: failed retries used numbers too
    assert read_segment(newest)[0] == [tokens(0, [256]), tokens(1, [2])]  # the unsynced frame, written again
