"""The synthetic step backend: serving without a model's cost, to measure what the server adds.

`--backend synthetic` replaces the matmuls by a cheap deterministic function of (state,
token): each session's state is one running hash, kept in h[layer 0, slot, 0] of the real
state pool (so fork, export/import, reset, residency and durability work unchanged), and
the logits put most of the probability on one token chosen by that hash. Outputs are the
same for the same inputs in any batch, like the real backends', but mean nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from server.kernels.state_pool import StatePool
from server.kernels.torch_step import check_batch

MODULUS = 1 << 24  # hash values stay exact in fp32
MULTIPLIER, INCREMENT = 1_103_515_245 % MODULUS, 12_345
PEAK = 8.0  # the chosen token's logit above the others': greedy picks it, sampling mostly does


class SyntheticStep:
    """`step(tokens [B], slots [B]) -> logits [B, V]` with no model arithmetic."""

    name = "synthetic"

    def __init__(self, pool: StatePool, vocab: int) -> None:
        self.pool, self.vocab, self.dtype = pool, vocab, torch.float32

    @torch.inference_mode()
    def step(self, tokens: Tensor, slots: Tensor) -> Tensor:
        check_batch(tokens, slots, self.pool, self.vocab)
        tokens, slots = tokens.to(self.pool.device), slots.to(self.pool.device)  # host ids, a CUDA pool
        h = self.pool.h  # [2, layers, rows, hidden]
        parity = self.pool.parity[slots].long()  # [B]
        state = h[parity, 0, slots, 0].to(torch.int64)  # [B] the running hash
        state = (state * MULTIPLIER + tokens + INCREMENT) % MODULUS
        h[parity, 0, slots, 0] = state.to(h.dtype)
        logits = torch.zeros(tokens.numel(), self.vocab, dtype=torch.float32, device=tokens.device)
        logits[torch.arange(tokens.numel()), state % self.vocab] = PEAK
        return logits
