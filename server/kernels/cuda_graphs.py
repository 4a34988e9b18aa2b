"""Replay a whole step (every layer and the head) as one CUDA graph per batch bucket.

A batch of B rows runs in the graph of the bucket 2^ceil(log2 B); its extra rows carry
token 0 and the pool's padding slot. Each graph reads its inputs from a static device
buffer and writes its own static logits. Graphs are captured lazily, and again after the
pool grows (its tensors move).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from server.kernels.state_pool import StatePool

Launch = Callable[[Tensor, Tensor], Tensor]  # (tokens [B], slots [B]) on device -> logits [B, V]


def bucket(batch: int) -> int:
    return 1 << max(0, batch - 1).bit_length()


def _slots_at(size: int) -> int:
    """Where a bucket's slots start in the inputs buffer, after its tokens (16-byte aligned)."""
    return size + size % 2


class CudaGraphs:
    def __init__(self, launch: Launch, pool: StatePool) -> None:
        self.launch, self.pool = launch, pool
        # a bucket's tokens and slots lie in one buffer (one copy fills both), 16-byte aligned
        size = bucket(pool.max_slots)
        self.inputs = torch.zeros(2 * size + 1, dtype=torch.long, device=pool.device)
        self.staging = torch.zeros(2 * size + 1, dtype=torch.long, pin_memory=True)
        self.copied = torch.cuda.Event()  # the staging buffer may be rewritten once this has passed
        self.copied.record()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.generation = pool.generation

    def run(self, tokens: Tensor, slots: Tensor) -> Tensor:
        """Run one step; the logits [B, V] are a view of the bucket's output, valid until the next run."""
        if self.pool.generation != self.generation:  # the pool grew: every graph points at old tensors
            self.graphs.clear()
            self.generation = self.pool.generation
        B = tokens.shape[0]
        size = bucket(B)
        graph, logits = self.graphs.get(size) or self._capture(size)
        self._set_inputs(tokens, slots, size)
        graph.replay()
        return logits[:B]

    def _set_inputs(self, tokens: Tensor, slots: Tensor, size: int) -> None:
        B, pad, at = tokens.shape[0], self.pool.pad_slot, _slots_at(size)
        if tokens.is_cuda:
            self.inputs[:B].copy_(tokens)
            self.inputs[at : at + B].copy_(slots)
            self.inputs[B:size].fill_(0)
            self.inputs[at + B : at + size].fill_(pad)
            return
        self.copied.synchronize()  # the previous step's copy has read the staging buffer
        self.staging[:B], self.staging[at : at + B] = tokens, slots
        self.staging[B:size], self.staging[at + B : at + size] = 0, pad
        self.inputs[: at + size].copy_(self.staging[: at + size], non_blocking=True)
        self.copied.record()

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Every row points at the padding slot while warming up (which compiles the kernels and
        # runs them once), so no session moves; capturing runs nothing.
        tokens, slots = self.inputs[:size], self.inputs[_slots_at(size) : _slots_at(size) + size]
        tokens.fill_(0)
        slots.fill_(self.pool.pad_slot)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.launch(tokens, slots)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.launch(tokens, slots)
        self.graphs[size] = (graph, logits)
        return graph, logits
