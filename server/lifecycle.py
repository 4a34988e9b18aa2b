"""Process plumbing shared by the server's processes: dying with the parent, the gRPC port.

The front end (grpc, no torch) and the engine core both import it; it imports only the
standard library.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (a kill -9 of the server leaves no child)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def claim_port(host: str, port: int, shared: bool) -> tuple[int, socket.socket | None]:
    """Check that `port` (0: any) is free on `host` and return it; with `shared`, also a socket
    that holds it with SO_REUSEPORT, bound and never listening (no connection lands on it), so
    that every front end can listen on it and no other program can take it meanwhile.

    The check binds without SO_REUSEPORT, so a port held by anyone (another lstm-serve sharing
    it among its own front ends included) is refused: ValueError with what to do.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ValueError(
                f"--port {port} on {host} is in use ({e.strerror}): stop the program using it or choose another port"
            ) from None
        port = probe.getsockname()[1]
    if not shared:
        return port, None
    held = socket.socket(family, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind((host, port))
    return port, held
