"""Step backends: one batched recurrent step over a model's state pool.

    backend = make_backend(model, pool, "auto")
    logits = backend.step(tokens, slots)  # tokens, slots: int64 [B]; logits: fp32 [B, V]

`step` advances each row's session (the state in `pool` at its slot) by its token, in place,
and returns the logits for the next token, on the pool's device. Slots must be distinct
within a batch (checked for CPU inputs; device inputs are trusted). A row's logits and new
state are bitwise the same whatever the batch size, the row's position and the other rows,
so a session's output never depends on server load (torch: on CPU; triton: everywhere).
    torch   the CPU default and the reference; batched torch ops.
    triton  one fused kernel per layer plus a head kernel, CUDA graphs per batch bucket.
            Its logits are a view of a static buffer that the next step overwrites.
    synthetic  no model arithmetic: a running hash per session picks a likely token, so a
            benchmark sees what the server costs apart from the model (meaningless text).
Pool operations (allocate, fork, export...) must not run during a step. Triton is imported
only when the triton backend is built.

The package owns the backends and the state pool they index (state_pool.py); it may import
only the shared modules (server/model.py and the like).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

from server.kernels.state_pool import StatePool
from server.kernels.synthetic_step import SyntheticStep
from server.kernels.torch_step import TorchStep
from server.kernels.weights import default_dtype
from server.model import RecurrentLM

BackendName = Literal["auto", "torch", "triton", "synthetic"]


class StepBackend(Protocol):
    name: str
    pool: StatePool
    dtype: torch.dtype

    def step(self, tokens: Tensor, slots: Tensor) -> Tensor: ...


def make_backend(
    model: RecurrentLM,
    pool: StatePool,
    backend: BackendName = "auto",
    dtype: torch.dtype | None = None,
) -> StepBackend:
    """A step backend for `model` over `pool` (weights copied to the pool's device).

    backend "auto" picks triton on CUDA and torch elsewhere; dtype is the weights' dtype
    (default bf16 on CUDA, fp32 elsewhere); states and accumulation are always fp32.
    """
    if pool.config != model.config:
        raise ValueError("the state pool was made for a different model config")
    device = pool.device
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    dtype = dtype or default_dtype(device)
    if backend == "torch":
        return TorchStep(model, pool, dtype)
    if backend == "triton":
        from server.kernels.triton_step import TritonStep  # needs triton

        return TritonStep(model, pool, dtype)
    if backend == "synthetic":
        return SyntheticStep(pool, model.config.vocab_size)
    raise ValueError(f"unknown step backend {backend!r}: use auto, torch, triton or synthetic")
