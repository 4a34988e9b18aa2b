"""A test harness for step backends: a pool of live sessions and a float64 reference."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from server.kernels.state_pool import StatePool
from server.model import ModelConfig, RecurrentLM, State


class StepHarness:
    """A model, a pool whose live slots hold random states (scattered, with freed gaps, half of
    them in the second h buffer), and the float64 reference of the function a backend in
    `dtype` serves: the model with its weights rounded to `dtype`, run in float64."""

    def __init__(
        self,
        cell: str,
        layers: int,
        hidden: int,
        embed: int,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        live: int = 80,
    ) -> None:
        torch.manual_seed(0)
        self.cfg = ModelConfig(cell=cell, layers=layers, hidden=hidden, embed=embed)
        self.model = RecurrentLM(self.cfg).eval()
        self.ref = copy.deepcopy(self.model).to(dtype).double()
        self.gen = torch.Generator().manual_seed(1)
        self.pool = StatePool(self.cfg, device, initial_slots=8, max_slots=2 * live)  # grows while filling
        taken = [self.pool.allocate() for _ in range(2 * live)]
        for slot in taken[1::2]:
            self.pool.free(slot)
        self.slots = taken[::2]
        self.pool.parity[self.slots[::2]] = 1
        h = torch.randn(layers, live, hidden, generator=self.gen, dtype=torch.float64) * 0.5
        c = (
            torch.randn(layers, live, hidden, generator=self.gen, dtype=torch.float64)
            if cell == "lstm"
            else None
        )
        self.pool.write(self.slots, State(h.float(), None if c is None else c.float()))
        rows = self.pool.capacity + 1
        self.ref_h = torch.zeros(layers, rows, hidden, dtype=torch.float64)
        self.ref_h[:, self.slots] = h.float().double()
        self.ref_c = None if c is None else torch.zeros_like(self.ref_h)
        if c is not None:
            self.ref_c[:, self.slots] = c.float().double()

    def batch(self, size: int, exclude: int | None = None) -> tuple[Tensor, Tensor]:
        """Random tokens for `size` distinct live slots (never `exclude`) in random order."""
        live = torch.tensor([s for s in self.slots if s != exclude])
        slots = live[torch.randperm(len(live), generator=self.gen)[:size]]
        return torch.randint(0, self.cfg.vocab_size, (size,), generator=self.gen), slots

    def reference(self, tokens: Tensor, slots: Tensor) -> Tensor:
        """Advance the reference states of `slots`; returns the reference logits."""
        c = None if self.ref_c is None else self.ref_c[:, slots]
        logits, new = self.ref.step(tokens, State(self.ref_h[:, slots], c))
        self.ref_h[:, slots] = new.h
        if c is not None:
            self.ref_c[:, slots] = new.c
        return logits

    def check(self, backend, tokens: Tensor, slots: Tensor, tol: float) -> None:
        """One backend step against the reference: logits and the slots' new states."""
        dev = self.pool.device
        logits = backend.step(tokens.to(dev), slots.to(dev)).double().cpu()
        ref = self.reference(tokens, slots)
        torch.testing.assert_close(logits, ref, rtol=tol, atol=tol)
        state = self.pool.read(slots.tolist())
        torch.testing.assert_close(state.h.double().cpu(), self.ref_h[:, slots], rtol=tol, atol=tol)
        if state.c is not None:
            torch.testing.assert_close(state.c.double().cpu(), self.ref_c[:, slots], rtol=tol, atol=tol)

    def others(self, slots: Tensor) -> list[Tensor]:
        """Copies of every pool row but `slots` and the padding slot: h (both buffers), parity, c."""
        p, skip = self.pool, set(slots.tolist()) | {self.pool.pad_slot}
        keep = torch.tensor([r for r in range(p.capacity + 1) if r not in skip], device=p.device)
        rows = [p.h.index_select(2, keep), p.parity.index_select(0, keep)]
        return rows + ([p.c.index_select(1, keep)] if p.c is not None else [])

    def assert_batch_invariant(self, backend, sizes) -> None:
        """A probe session stepped from the same state and token, in batches of every size in
        `sizes`, first, middle and last, among random neighbours: the same bits every time."""
        probe, dev = self.slots[0], self.pool.device
        start, first = self.pool.read(probe), None
        for size in sizes:
            for pos in sorted({0, size // 2, size - 1}):
                tokens, slots = self.batch(size - 1, exclude=probe)
                slots = torch.cat([slots[:pos], torch.tensor([probe]), slots[pos:]])
                tokens = torch.cat([tokens[:pos], torch.tensor([65]), tokens[pos:]])
                self.pool.write(probe, start)
                logits = backend.step(tokens.to(dev), slots.to(dev))[pos].clone()
                result = (logits, *(t for t in self.pool.read(probe) if t is not None))
                first = first or result
                for a, b in zip(result, first):
                    assert torch.equal(a, b), f"the row differs in a batch of {size} at position {pos}"
