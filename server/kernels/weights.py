"""The weights a step backend serves, derived once at load time.

A backend in `dtype` computes the model with every parameter rounded to `dtype` (as
`model.to(dtype)` would); the fixed sums are then formed in float64 and kept in fp32:
    table[v]  = embedding[v] · W_ih0ᵀ + b_ih0 + b_hh0      [vocab, G*H]  (layer 0's input projection)
    bias[l]   = b_ih_l + b_hh_l                             [G*H]         (deeper layers)
Matmul weights stay in `dtype`; states and accumulation are fp32 in every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from server.model import RecurrentLM

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ServedWeights:
    """float64 tensors whose values are exact in the serving dtype (table and biases excepted)."""

    table: Tensor  # [V, G*H]
    w_hh: list[Tensor]  # per layer [G*H, H]
    w_ih: list[Tensor | None]  # per layer [G*H, in]; None for layer 0 (folded into the table)
    bias: list[Tensor | None]  # per layer [G*H]; None for layer 0 (in the table)
    head_w: Tensor  # [V, H]
    head_b: Tensor  # [V]


@torch.no_grad()
def served_weights(model: RecurrentLM, dtype: torch.dtype) -> ServedWeights:
    if dtype not in DTYPES:
        raise ValueError(f"weight dtype must be one of {DTYPES}, got {dtype}")

    def r(t: Tensor) -> Tensor:  # round to the serving dtype, then widen exactly
        return t.detach().to(dtype).double()

    w_hh: list[Tensor] = []
    w_ih: list[Tensor | None] = []
    bias: list[Tensor | None] = []
    for layer in range(model.config.layers):
        wi, wh, bi, bh = (r(t) for t in model.layer_weights(layer))
        w_hh.append(wh)
        if layer == 0:
            table = r(model.embedding.weight) @ wi.T + bi + bh
            w_ih.append(None)
            bias.append(None)
        else:
            w_ih.append(wi)
            bias.append(bi + bh)
    return ServedWeights(table, w_hh, w_ih, bias, r(model.head.weight), r(model.head.bias))


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights on CUDA (the step is bound by reading them), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
