"""Which sessions hold a device slot; idle ones move to host memory under pressure.

A session's state is either in the device pool (`session.slot`) or in host memory
(`session.host_state`: the pool's export bytes, or None for a fresh zero state). Before a
step, every session in the batch is made resident: a free slot is taken, or the least
recently used idle session (failing that, any session outside the batch) is moved to host
memory to free one. Runs between steps only (as every pool operation does), so it
needs no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from server.kernels.state_pool import StatePool

if TYPE_CHECKING:
    from server.sessions.store import Session


class DeviceResidency:
    def __init__(self, pool: StatePool, on_move: Callable[[str], None] = lambda direction: None) -> None:
        self.pool = pool
        self._lru: OrderedDict[str, Session] = OrderedDict()  # resident sessions, least recent first
        self._on_move = on_move  # told "to_host" or "to_device" on every move (metrics)

    @property
    def resident(self) -> int:
        return len(self._lru)

    def make_resident(self, session: Session, pinned: set[str]) -> bool:
        """Give `session` a slot holding its state; False if every slot is pinned or busy."""
        if session.slot is not None:
            self._lru.move_to_end(session.id)
            return True
        if not self._make_room(pinned):
            return False
        if session.host_state is None:
            session.slot = self.pool.allocate()  # zero state
        else:
            session.slot = self.pool.import_(session.host_state)
            session.host_state = None
            self._on_move("to_device")
        self._lru[session.id] = session
        return True

    def _make_room(self, pinned: set[str]) -> bool:
        """Free a slot if none is: idle sessions go first, then any not in this batch."""
        if self.pool.in_use < self.pool.max_slots:
            return True
        candidates = [s for s in self._lru.values() if s.id not in pinned]
        victim = next((s for s in candidates if s.idle), candidates[0] if candidates else None)
        if victim is None:
            return False
        self.to_host(victim)
        return True

    def to_host(self, session: Session) -> None:
        """Move `session`'s state to host memory, freeing its slot."""
        session.host_state = self.pool.export(session.slot)
        self.release(session)
        self._on_move("to_host")

    def release(self, session: Session) -> None:
        """Free `session`'s slot, if it has one (deletion, expiry, offload)."""
        if session.slot is not None:
            self.pool.free(session.slot)
            session.slot = None
            self._lru.pop(session.id, None)

    def state_bytes(self, session: Session) -> bytes | None:
        """`session`'s state as pool export bytes (None: the zero state)."""
        return self.pool.export(session.slot) if session.slot is not None else session.host_state

    def copy_state(self, parent: Session, child: Session) -> None:
        """Give `child` a copy of `parent`'s state: a device slot if one is free, else host memory."""
        if parent.slot is not None and self.pool.in_use < self.pool.max_slots:
            child.slot = self.pool.fork(parent.slot)
            self._lru[child.id] = child
        else:
            child.host_state = self.state_bytes(parent)

    def reset(self, session: Session) -> None:
        """Zero `session`'s state where it lies."""
        if session.slot is not None:
            self.pool.reset(session.slot)
        else:
            session.host_state = None

    def load(self, session: Session, data: bytes) -> bool:
        """Put exported state bytes into a slot for `session` (ValueError if they do not fit
        this model); False when no slot can be freed."""
        if not self._make_room(set()):
            return False
        session.slot = self.pool.import_(data)
        self._lru[session.id] = session
        return True
