"""Next-token sampling: temperature, top-k, top-p, with counter-based noise.

Each row draws one uniform number u from an integer hash of (session seed, position) and
takes the token where the cumulative distribution (after temperature, top-k and top-p)
first exceeds u. No generator state is shared across sessions or steps, so a session's
tokens depend only on its seed and what it has absorbed, never on which batch it ran in.

numpy, not torch: a batch is a few kilobytes, where torch's per-op overhead would cost
more than the arithmetic. Batch invariance down to the bit: rows are padded to a width of
PAD_TO so that vectorized loops treat every row alike (no scalar tail inside a row), every
reduction runs along a row on its own, and only the rows asking for top-k/top-p are sorted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MASK32 = np.uint64(0xFFFFFFFF)
PAD_TO = 64


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


def mix32(x: np.ndarray) -> np.ndarray:
    """murmur3's 32-bit finalizer on uint64 arrays holding values below 2^32."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x85EBCA6B)) & MASK32
    x = x ^ (x >> np.uint64(13))
    x = (x * np.uint64(0xC2B2AE35)) & MASK32
    return x ^ (x >> np.uint64(16))


def _mix32_int(x: int) -> int:
    """mix32 on one Python int below 2^32 (the same bits)."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


SMALL_BATCH = 16  # up to this many rows, uniform() hashes Python ints: ~2 µs a row, where the
# arrays' numpy calls cost ~40 µs at any batch size


def uniform(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One U(0, 1) float64 per row with 53 random bits, a function of (seed, position) only.

    Seeds are 64-bit (signed or unsigned: the same bits give the same noise). Small batches
    take the same arithmetic on Python ints, which gives the same bits.
    """
    seeds = np.asarray(seeds)
    seeds = seeds.view(np.uint64) if seeds.dtype == np.int64 else seeds.astype(np.uint64)
    positions = np.asarray(positions).astype(np.uint64)
    if seeds.size <= SMALL_BATCH:
        return np.array([_uniform_int(s, p) for s, p in zip(seeds.tolist(), positions.tolist())], np.float64)
    # the independent hashes of each stage in one array: 4 mix32 calls, not 7
    seed_high, position_low, position_high = mix32(
        np.stack([seeds >> np.uint64(32), positions & MASK32, positions >> np.uint64(32)])
    )
    key = mix32((seeds & MASK32) ^ seed_high)
    key = mix32(key ^ position_low ^ position_high)
    high, low = mix32(np.stack([key ^ np.uint64(0x9E3779B9), key ^ np.uint64(0x7F4A7C15)]))
    bits = ((high >> np.uint64(5)) << np.uint64(26)) + (low >> np.uint64(6))  # 27 + 26 bits
    return bits.astype(np.float64) * 2.0**-53 + 2.0**-54  # strictly inside (0, 1)


def _uniform_int(seed: int, position: int) -> float:
    """uniform() of one row, on Python ints below 2^64 (exact, as uint64 is): the same bits."""
    key = _mix32_int((seed & 0xFFFFFFFF) ^ _mix32_int(seed >> 32))
    key = _mix32_int(key ^ _mix32_int(position & 0xFFFFFFFF) ^ _mix32_int(position >> 32))
    high = _mix32_int(key ^ 0x9E3779B9) >> 5
    low = _mix32_int(key ^ 0x7F4A7C15) >> 6
    return float((high << 26) + low) * 2.0**-53 + 2.0**-54  # the int is below 2^53: exact


def _floors(scaled: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> np.ndarray | None:
    """Per row, the smallest value that stays a candidate under top-k and top-p (-inf: all
    stay); None when no row asks for either."""
    rows = np.nonzero(((top_k > 0) & (top_k < scaled.shape[1])) | (top_p < 1))[0]
    if not rows.size:
        return None
    floors = np.full(scaled.shape[0], -np.inf)
    ordered = -np.sort(-scaled[rows], axis=1)  # descending
    k = np.where(top_k[rows] > 0, np.minimum(top_k[rows], scaled.shape[1]), scaled.shape[1])
    probs = _softmax(ordered)
    mass_before = np.cumsum(probs, axis=1) - probs
    nucleus = (mass_before < top_p[rows, None]).sum(axis=1)  # >= 1: the best token always stays
    keep = np.minimum(k, nucleus)
    floors[rows] = ordered[np.arange(rows.size), keep - 1]
    return floors


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sample(logits, seeds, positions, temperature, top_k, top_p) -> np.ndarray:
    """Choose one token per row: logits [B, V]; per-row seeds, positions and options [B] -> int64 ids [B].

    Rows with temperature 0 take the argmax (the lowest id on ties).
    """
    logits = np.asarray(logits, dtype=np.float64)
    temperature = np.asarray(temperature, dtype=np.float64)
    greedy = logits.argmax(axis=1)
    if not (temperature > 0).any():
        return greedy
    batch, vocab = logits.shape
    scaled = np.full((batch, -(-vocab // PAD_TO) * PAD_TO), -np.inf)  # padding: probability 0
    scaled[:, :vocab] = logits / np.maximum(temperature, 1e-6)[:, None]
    floors = _floors(scaled, np.asarray(top_k, dtype=np.int64), np.asarray(top_p, dtype=np.float64))
    if floors is not None:
        scaled[scaled < floors[:, None]] = -np.inf
    cdf = np.cumsum(_softmax(scaled), axis=1)
    total = cdf[:, -1]
    target = np.minimum(uniform(seeds, positions) * total, np.nextafter(total, 0))
    sampled = (cdf <= target[:, None]).sum(axis=1)  # the first index whose cdf passes target: p > 0 there
    return np.where(temperature > 0, sampled, greedy)


def sample_one(logits, seed: int, position: int, params: SamplingParams) -> int:
    """`sample` for a single row: logits [V] -> token id."""
    row = np.asarray(logits, dtype=np.float64)[None]
    return int(sample(row, [seed], [position], [params.temperature], [params.top_k], [params.top_p])[0])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of [N, V] logits, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def top_logprobs(logits: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The k likeliest next tokens of one row [V], best first, with their log-probabilities."""
    logprobs = log_softmax(logits[None])[0]
    best = np.argsort(-logprobs, kind="stable")[:k]
    return tuple(zip(best.tolist(), logprobs[best].tolist()))
