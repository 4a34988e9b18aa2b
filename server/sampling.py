"""Next-token sampling: temperature, top-k, top-p, with counter-based noise.

Sampling is Gumbel-max over the allowed tokens: token = argmax(logits / T + g), where the
noise g for (row, token v) is a pure function of (session seed, position, v), built from an
integer hash. No generator state is shared across sessions or steps, so a session's tokens
depend only on its seed and what it has absorbed, never on which batch it ran in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling options; `validate` says what is wrong."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):  # also refuses NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def mix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding values in [0, 2^32).

    Products may pass 2^63 and wrap; only their low 32 bits are kept, which wrapping preserves.
    """
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: Tensor, positions: Tensor, vocab: int) -> Tensor:
    """U(0, 1) noise, float64 [B, vocab], a function of (seed, position, token) per element."""
    seeds, positions = seeds.to(torch.int64), positions.to(torch.int64)
    key = mix32((seeds & MASK32) ^ mix32((seeds >> 32) & MASK32))  # [B]
    key = mix32(key ^ mix32(positions & MASK32))  # [B]
    tokens = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    bits = mix32(key[:, None] ^ mix32(tokens + 0x9E3779B9))  # [B, V], 32 random bits each
    return (bits.to(torch.float64) + 0.5) / 2.0**32  # strictly inside (0, 1)


def sample(logits: Tensor, seeds: Tensor, positions: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Choose one token per row: logits [B, V]; per-row seeds, positions and options [B] -> ids [B].

    Rows with temperature 0 take the argmax (the lowest id on ties).
    """
    logits = logits.to(torch.float64)
    vocab = logits.shape[-1]
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.to(torch.float64).clamp_min(1e-6)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)  # [B, V]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).to(logits.device)[:, None]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better-ranked tokens
    keep = (rank < k) & (mass_before < top_p.to(torch.float64)[:, None])  # rank 0 always kept
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, vocab)))
    noise = gumbel.gather(-1, order)  # noise follows the token, not its rank
    choice = torch.where(keep, sorted_logits + noise, -torch.inf).argmax(dim=-1)
    sampled = order.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


def sample_one(logits: Tensor, seed: int, position: int, params: SamplingParams) -> int:
    """`sample` for a single row: logits [V] -> token id."""
    token = sample(
        logits[None],
        torch.tensor([seed]),
        torch.tensor([position]),
        torch.tensor([params.temperature], dtype=torch.float64),
        torch.tensor([params.top_k]),
        torch.tensor([params.top_p], dtype=torch.float64),
    )
    return int(token)
