"""`lstm-serve` with a fault-injecting log segment file: started with `faulty_disk_env(trigger)`
(tests/test_durability_faults.py).

While the file named by $FAULTY_DISK exists, its content (`OPERATION ERRNO`, e.g. `fsync EIO`
or `write EROFS`) makes every such call on a log segment fail with that error, as a dying disk
or a file system remounted read-only would; `OPERATION sleep SECONDS` makes it that slow. tmpfs cannot do this (its fsync never fails, and a
read-only remount of an open log fails with EBUSY), so the real server runs with this file
object in place of `server.journal.SegmentFile`; everything else is the real thing. The
environment puts tests/fault_site/ on PYTHONPATH, whose sitecustomize imports this module in
every process of the server, the engine core (which writes the log) included.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from server.durability import journal

TRIGGER = Path(os.environ["FAULTY_DISK"])


def _inject(operation: str) -> None:
    try:
        wanted, name, *seconds = TRIGGER.read_text().split()
    except (FileNotFoundError, ValueError):
        return
    if wanted != operation:
        return
    if name == "sleep":
        time.sleep(float(seconds[0]))
        return
    code = getattr(errno, name)
    raise OSError(code, os.strerror(code))


class FaultySegmentFile(journal.SegmentFile):
    def write(self, data: bytes) -> None:
        _inject("write")
        super().write(data)

    def fsync(self) -> None:
        _inject("fsync")
        super().fsync()


journal.SegmentFile = FaultySegmentFile
