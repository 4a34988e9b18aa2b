"""Makes every Python process of a server fault-injecting (tests/faulty_disk.py).

The log is written in the engine core process, which the server spawns as a fresh
interpreter; with this directory on PYTHONPATH and $FAULTY_DISK set, that process (and the
front end) loads the fault-injecting log segment file at start-up.
"""

import os

if os.environ.get("FAULTY_DISK"):
    import tests.faulty_disk  # noqa: F401  (replaces journal.SegmentFile)
