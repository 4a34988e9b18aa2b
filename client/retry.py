"""When `resume()` tries again, and how long it waits: a replica that died, or a server that is
restarting, comes back under the same address a moment later.

    UNAVAILABLE                 always retried: the server is gone or not serving yet
    INTERNAL, CANCELLED         retried only without lstm-serve's status mark (a proxy such as
                                HAProxy reports a vanished replica so, with an HTTP/2
                                RST_STREAM in the details) and when this client did not cancel
    anything else               an answer: raised
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import grpc

from client.errors import StatusError

FIRST_DELAY = 0.1  # seconds
MAX_DELAY = 2.0


def retriable(error: StatusError, cancelled_locally: bool = False) -> bool:
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return True
    if error.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED):
        return not error.from_server and not cancelled_locally
    return False


def delays(deadline: float, rng: random.Random | None = None) -> Iterator[float]:
    """Sleeps before each retry: exponential from FIRST_DELAY up to MAX_DELAY, each drawn at
    random below its bound ("full jitter", so that many clients do not retry in step), for
    as long as `deadline` (seconds from now) allows."""
    rng = rng or random.Random()
    end, bound = time.monotonic() + deadline, FIRST_DELAY
    while (left := end - time.monotonic()) > 0:
        yield min(left, rng.uniform(0, bound))
        bound = min(MAX_DELAY, bound * 2)
