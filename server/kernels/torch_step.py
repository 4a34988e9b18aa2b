"""The torch step backend: the CPU serving path and the reference for the Triton kernel.

One step is a handful of batched ops per layer over the pool, with no loop over sessions:
gather h (and c) rows by slot, one matmul for all gates, the cell, scatter the rows back.

Batch invariance on CPU. MKL picks its GEMM kernel by the row count: 1-3 rows take a GEMV
kernel, and with 2 threads 5-11 rows are split so that some rows do too; ATen's vectorized
sigmoid/tanh take a scalar path on the tail of a tensor or of a thread's chunk. So a batch
is padded to `padded_rows(B)` rows (4, 8, then multiples of 16) that point at the pool's
padding slot: every GEMM row then goes through the same kernel, and the elementwise ops see
whole rows. Verified bitwise for 1, 2 and 4 intra-op threads (tests: 1 and 2) with B = 1..64
at every position; more threads may split an elementwise op mid-row (numel > 32768) and
break it. The cost: a B = 1 step computes 4 rows (see docs/kernel-benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from server.kernels.state_pool import StatePool
from server.kernels.weights import served_weights
from server.model import RecurrentLM


def padded_rows(batch: int) -> int:
    """The row count a batch is padded to: 4, 8, then multiples of 16 (see the module docstring)."""
    return 4 if batch <= 4 else 8 if batch <= 8 else -(-batch // 16) * 16


def check_batch(tokens: Tensor, slots: Tensor, pool: StatePool, vocab: int) -> None:
    """Shapes, dtypes and ranges of one step's inputs; slots must be distinct."""
    if tokens.dim() != 1 or tokens.shape != slots.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and slots {tuple(slots.shape)} must both be [B]")
    if tokens.dtype != torch.long or slots.dtype != torch.long:
        raise TypeError("tokens and slots must be int64 tensors")
    if tokens.numel() == 0 or tokens.device.type != "cpu":
        return  # device inputs are trusted: checking them would synchronize
    # in numpy, on the same memory: ~8 µs, where torch's per-op overhead made these five
    # reductions and a unique cost ~20 µs a step
    token_ids, slot_ids = tokens.numpy(), slots.numpy()
    if token_ids.min() < 0 or token_ids.max() >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab})")
    if slot_ids.min() < 1 or slot_ids.max() > pool.capacity:
        raise ValueError(f"slots must lie in [1, {pool.capacity}]")
    ordered = np.sort(slot_ids)
    if (ordered[1:] == ordered[:-1]).any():
        raise ValueError("a slot appears twice in one batch")


class TorchStep:
    """`step(tokens [B], slots [B]) -> logits [B, V]` (fp32, on the pool's device)."""

    name = "torch"

    def __init__(self, model: RecurrentLM, pool: StatePool, dtype: torch.dtype) -> None:
        cfg, dev = model.config, pool.device
        self.pool, self.dtype, self.vocab = pool, dtype, cfg.vocab_size
        lstm, H = cfg.cell == "lstm", cfg.hidden
        sw = served_weights(model, dtype)
        # LSTM gates reordered (i, f, g, o) -> (i, f, o, g): one sigmoid covers the first 3H columns
        perm = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
        perm = perm if lstm else torch.arange(H)
        self.table = sw.table[:, perm].float().to(dev)  # [V, G*H]
        self.w: list[Tensor] = []  # per layer, [in + H, G*H] (layer 0: [H, G*H]) in dtype; acts on [x, h]
        self.bias: list[Tensor] = []  # per layer after the first, [G*H] fp32
        for w_ih, w_hh, b in zip(sw.w_ih, sw.w_hh, sw.bias):
            w = w_hh if w_ih is None else torch.cat([w_ih, w_hh], dim=1)
            self.w.append(w[perm].T.contiguous().to(dev, dtype))
            if b is not None:
                self.bias.append(b[perm].float().to(dev))
        self.head_w = sw.head_w.T.contiguous().to(dev, dtype)  # [H, V]
        self.head_b = sw.head_b.float().to(dev)

    @torch.no_grad()
    def step(self, tokens: Tensor, slots: Tensor) -> Tensor:
        check_batch(tokens, slots, self.pool, self.vocab)
        pool, B = self.pool, tokens.shape[0]
        rows = padded_rows(B)
        tok = torch.zeros(rows, dtype=torch.long, device=pool.device)
        sl = torch.full((rows,), pool.pad_slot, dtype=torch.long, device=pool.device)
        tok[:B], sl[:B] = tokens, slots
        # flat row of (parity, layer 0, slot) in h viewed as [2 * layers * R, H]; h is written
        # back into the buffer it came from, as the gather has already read every old row
        L, R = self.pool.h.shape[1], self.pool.h.shape[2]
        h_rows = pool.parity.index_select(0, sl).long() * (L * R) + sl
        h_all = pool.h.view(-1, pool.h.shape[-1])
        x = self.table.index_select(0, tok)  # layer 0's input projection [rows, G*H]
        for layer, w in enumerate(self.w):
            hi = h_rows + layer * R
            h = h_all.index_select(0, hi)  # [rows, H]
            if layer == 0:
                gates = self._linear(h, w, x)
            else:
                gates = self._linear(torch.cat([x, h], dim=1), w, self.bias[layer - 1])
            if pool.c is not None:  # LSTM
                H = h.shape[1]
                c = pool.c[layer].index_select(0, sl)
                sig = gates[:, : 3 * H].sigmoid()  # i, f, o
                c = sig[:, H : 2 * H] * c + sig[:, :H] * gates[:, 3 * H :].tanh()
                h = sig[:, 2 * H :] * c.tanh()
                pool.c[layer].index_copy_(0, sl, c)
            else:
                h = gates.tanh()
            h_all.index_copy_(0, hi, h)
            x = h
        return self._linear(x, self.head_w, self.head_b)[:B]

    def _linear(self, x: Tensor, w: Tensor, base: Tensor) -> Tensor:
        """base + x @ w with fp32 accumulation; x is rounded to the weights' dtype first."""
        if w.dtype == torch.float32:
            return torch.addmm(base, x, w)
        return torch.mm(x.to(w.dtype), w).float().add_(base)
