"""Every session's recurrent state for one model, in device tensors indexed by slot.

    h: [2, layers, rows, hidden] fp32   two buffers; parity[slot] says which holds the state
    c: [layers, rows, hidden] fp32      LSTM only
    parity: [rows] int32

Why two h buffers: a fused kernel computes a row's new h in column tiles, and every tile
reads the whole old h row, so the new h goes to the other buffer and the step then flips
the slot's parity. A backend that gathers rows first may write back in place instead.
Row 0 is the padding slot: batches padded to a fixed size point their extra rows at it, so
kernels may write it freely and no session ever owns it. Rows 1..capacity are session slots;
a slot id stays valid for the session's life, even when the pool grows.
The pool grows by doubling up to `max_slots`; growth replaces the tensors, and `generation`
counts replacements so that step backends know to re-read them (and re-capture CUDA graphs).
Every method runs between steps, never during one (the engine core runs both on one thread):
there is no lock.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from server.model import ModelConfig, State

PAD_SLOT = 0
# export() blob: magic, cell, layers, hidden; then h and (LSTM) c as little-endian fp32 [layers, hidden]
_HEADER = struct.Struct("<4s4sII")
_MAGIC = b"LSPS"


class PoolFullError(RuntimeError):
    """Every slot is in use and the pool is at its maximum size."""


class StatePool:
    def __init__(
        self, config: ModelConfig, device: torch.device | str, initial_slots: int, max_slots: int
    ) -> None:
        if not 1 <= initial_slots <= max_slots:
            raise ValueError(f"need 1 <= initial_slots ({initial_slots}) <= max_slots ({max_slots})")
        self.config = config
        self.device = torch.device(device)
        self.max_slots = max_slots
        self.generation = 0  # bumped whenever the tensors are replaced by bigger ones
        self.h, self.c, self.parity = self._zeros(initial_slots)
        self._free = list(range(1, initial_slots + 1))  # a min-heap: the lowest slot goes first
        self._used: set[int] = set()

    # ---- sizes -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Session slots currently backed by memory (the padding row not counted)."""
        return self.parity.shape[0] - 1

    @property
    def in_use(self) -> int:
        return len(self._used)

    @property
    def pad_slot(self) -> int:
        return PAD_SLOT

    @property
    def state_bytes_per_slot(self) -> int:
        cfg = self.config
        return cfg.layers * cfg.hidden * 4 * (2 if cfg.cell == "lstm" else 1)

    # ---- slot lifecycle ----------------------------------------------------------------

    def allocate(self) -> int:
        """A free slot holding the zero state; grows the pool if every slot is taken."""
        if not self._free:
            self._grow()
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        self.reset(slot)
        return slot

    def free(self, slot: int) -> None:
        self._check(slot)
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

    def top_h(self, slots: Tensor) -> Tensor:
        """The top layer's current h of `slots` (int64 [B], on the pool's device): [B, H] fp32,
        read from whichever buffer holds each slot's state."""
        return self.h[self.parity[slots].long(), self.config.layers - 1, slots]

    def fork(self, slot: int) -> int:
        """A new slot holding a copy of `slot`'s state."""
        self._check(slot)
        new = self.allocate()
        self.write(new, self.read(slot))
        return new

    def reset(self, slot: int) -> None:
        """Zero the state of `slot` (a fresh session)."""
        self._check(slot)
        self.h[:, :, slot] = 0
        self.parity[slot] = 0
        if self.c is not None:
            self.c[:, slot] = 0

    def is_allocated(self, slot: int) -> bool:
        return slot in self._used

    # ---- state as bytes and tensors ----------------------------------------------------

    def export(self, slot: int) -> bytes:
        """`slot`'s state as a self-describing blob (header + fp32 h, then c)."""
        self._check(slot)
        cfg, state = self.config, self.read(slot)
        parts = [state.h] + ([state.c] if state.c is not None else [])
        payload = torch.stack(parts).cpu().numpy().astype("<f4").tobytes()
        return _HEADER.pack(_MAGIC, cfg.cell.encode(), cfg.layers, cfg.hidden) + payload

    def import_(self, data: bytes) -> int:
        """A new slot holding the state in `data` (from `export`); ValueError if it does not fit."""
        cfg = self.config
        if len(data) < _HEADER.size:
            raise ValueError(f"state blob too short: {len(data)} bytes, the header alone is {_HEADER.size}")
        magic, cell, layers, hidden = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("not a state blob: bad magic bytes")
        got = (cell.rstrip(b"\0").decode(errors="replace"), layers, hidden)
        if got != (cfg.cell, cfg.layers, cfg.hidden):
            raise ValueError(
                f"state blob is for cell={got[0]} layers={got[1]} hidden={got[2]}, "
                f"this model has cell={cfg.cell} layers={cfg.layers} hidden={cfg.hidden}"
            )
        payload = memoryview(data)[_HEADER.size :]
        if len(payload) != self.state_bytes_per_slot:
            raise ValueError(
                f"state blob payload is {len(payload)} bytes, expected {self.state_bytes_per_slot}"
            )
        parts = torch.from_numpy(np.frombuffer(payload, dtype="<f4").astype(np.float32))
        parts = parts.view(-1, cfg.layers, 1, cfg.hidden)  # [h (, c), layers, 1, hidden]
        if not torch.isfinite(parts).all():
            raise ValueError("state blob holds non-finite values")
        slot = self.allocate()
        self.write(slot, State(parts[0], parts[1] if self.c is not None else None))
        return slot

    def read(self, slots: int | Sequence[int]) -> State:
        """A copy of the state of `slots`: h, c are [layers, n, hidden] on the pool's device."""
        idx = self._index(slots)
        h = self.h[self.parity[idx].long(), :, idx].transpose(0, 1)  # [n, layers, H] -> [layers, n, H]
        return State(h.contiguous(), self.c[:, idx].clone() if self.c is not None else None)

    def write(self, slots: int | Sequence[int], state: State) -> None:
        """Overwrite the state of `slots` with `state` ([layers, n, hidden])."""
        idx = self._index(slots)
        self.h[self.parity[idx].long(), :, idx] = state.h.to(self.h).transpose(0, 1)
        if self.c is not None:
            if state.c is None:
                raise ValueError("an LSTM state needs c")
            self.c[:, idx] = state.c.to(self.c)

    # ---- internals ---------------------------------------------------------------------

    def _zeros(self, slots: int) -> tuple[Tensor, Tensor | None, Tensor]:
        cfg, dev = self.config, self.device
        shape = (cfg.layers, slots + 1, cfg.hidden)  # +1: the padding row
        h = torch.zeros((2, *shape), dtype=torch.float32, device=dev)
        c = torch.zeros(shape, dtype=torch.float32, device=dev) if cfg.cell == "lstm" else None
        return h, c, torch.zeros(slots + 1, dtype=torch.int32, device=dev)

    def _grow(self) -> None:
        old = self.capacity
        if old >= self.max_slots:
            raise PoolFullError(f"all {self.max_slots} state slots are in use")
        new = min(2 * old, self.max_slots)
        h, c, parity = self._zeros(new)
        h[:, :, : old + 1] = self.h
        parity[: old + 1] = self.parity
        if c is not None and self.c is not None:
            c[:, : old + 1] = self.c
        self.h, self.c, self.parity = h, c, parity
        self.generation += 1
        for slot in range(old + 1, new + 1):
            heapq.heappush(self._free, slot)

    def _check(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"state slot {slot} is not allocated")

    def _index(self, slots: int | Sequence[int]) -> Tensor:
        idx = [slots] if isinstance(slots, int) else [int(s) for s in slots]
        for slot in idx:
            self._check(slot)
        return torch.tensor(idx, dtype=torch.long, device=self.device)
