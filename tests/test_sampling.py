import math

import numpy as np
import pytest

from server.sampling import SMALL_BATCH, SamplingParams, sample, sample_one, uniform


def batch_sample(logits, seeds, positions, temperature=1.0, top_k=0, top_p=1.0):
    """`sample` with the same options for every row."""
    b = len(logits)
    return sample(logits, seeds, positions, np.full(b, temperature), np.full(b, top_k), np.full(b, top_p))


def test_noise_is_a_function_of_seed_and_position_only():
    a = uniform(np.array([5, 5, 6]), np.array([10, 11, 10]))
    b = uniform(np.array([6, 5]), np.array([10, 10]))
    assert a[0] == b[1] and a[2] == b[0]
    assert len(set(a.tolist())) == 3


def test_small_batches_hash_python_ints_to_the_same_bits():
    rng = np.random.default_rng(7)
    seeds = rng.integers(-(2**63), 2**63 - 1, 4000, dtype=np.int64)
    positions = rng.integers(0, 2**63 - 1, 4000, dtype=np.int64)
    positions[:8] = [0, 1, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1]
    arrays = uniform(seeds, positions)  # more rows than SMALL_BATCH: the numpy path
    rows = np.concatenate(
        [
            uniform(seeds[i : i + SMALL_BATCH], positions[i : i + SMALL_BATCH])
            for i in range(0, 4000, SMALL_BATCH)
        ]
    )
    assert np.array_equal(arrays.view(np.uint64), rows.view(np.uint64))


def test_noise_is_uniform_in_the_open_interval():
    u = uniform(np.full(100_000, 42), np.arange(100_000))
    assert 0 < u.min() and u.max() < 1
    counts, _ = np.histogram(u, bins=10, range=(0, 1))
    assert np.abs(counts - 10_000).max() < 500  # about 5 sigma


def test_64_bit_seeds_signed_or_unsigned_and_large_positions():
    signed = uniform(np.array([-1, 2**63 - 1, -(2**63), 0]), np.array([0, 0, 0, 2**40]))
    unsigned = uniform(
        np.array([2**64 - 1, 2**63 - 1, 2**63, 0], dtype=np.uint64), np.array([0, 0, 0, 2**40])
    )
    assert len(set(signed.tolist())) == 4 and np.array_equal(signed, unsigned)


def random_options(b: int, rng: np.random.Generator):
    temperature = rng.random(b) * 1.5
    temperature[::5] = 0.0
    top_k = rng.integers(0, 60, b)
    top_k[::3] = 0
    top_p = np.maximum(rng.random(b), 0.05)
    top_p[::2] = 1.0
    return temperature, top_k, top_p


@pytest.mark.parametrize("b", [1, 2, 3, 17, 64, 256])
def test_a_row_samples_the_same_token_in_any_batch_bitwise(b):
    rng = np.random.default_rng(b)
    logits = (rng.standard_normal((b, 258)) * 3).astype(np.float32)
    seeds, positions = rng.integers(-(2**62), 2**62, b), rng.integers(0, 10**6, b)
    temperature, top_k, top_p = random_options(b, rng)
    together = sample(logits, seeds, positions, temperature, top_k, top_p)
    perm = rng.permutation(b)
    shuffled = sample(logits[perm], seeds[perm], positions[perm], temperature[perm], top_k[perm], top_p[perm])
    assert np.array_equal(shuffled, together[perm])
    for i in range(min(b, 12)):
        params = SamplingParams(float(temperature[i]), int(top_k[i]), float(top_p[i]))
        assert sample_one(logits[i], int(seeds[i]), int(positions[i]), params) == together[i]


def test_temperature_zero_is_greedy_and_top_k_one_too():
    logits = np.random.default_rng(1).standard_normal((16, 258))
    positions = np.zeros(16, dtype=np.int64)
    assert np.array_equal(batch_sample(logits, np.arange(16), positions, 0.0), logits.argmax(1))
    assert np.array_equal(batch_sample(logits, np.arange(16), positions, 2.0, top_k=1), logits.argmax(1))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_frequencies_follow_the_softmax(temperature):
    row = np.array([2.0, 1.0, 0.5, -1.0])
    tokens = batch_sample(np.tile(row, (20000, 1)), np.full(20000, 42), np.arange(20000), temperature)
    freq = np.bincount(tokens, minlength=4) / 20000
    expected = np.exp(row / temperature) / np.exp(row / temperature).sum()
    assert np.allclose(freq, expected, atol=0.015)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = np.tile([3.0, 2.9, 2.8, 0.0, -0.5, -1.0], (4000, 1))
    seeds, positions = np.full(4000, 9), np.arange(4000)
    assert set(batch_sample(logits, seeds, positions, 5.0, top_k=2).tolist()) == {0, 1}
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()  # [0.32, 0.29, 0.26, ...]
    assert probs[:2].sum() < 0.7 < probs[:3].sum()
    assert set(batch_sample(logits, seeds, positions, 1.0, top_p=0.7).tolist()) == {0, 1, 2}
    assert set(batch_sample(logits, seeds, positions, 1.0, top_p=0.01).tolist()) == {0}
    assert set(batch_sample(logits, seeds, positions, 1.0, top_k=4, top_p=0.99).tolist()) == {0, 1, 2, 3}


def test_tokens_with_zero_probability_are_never_sampled():
    logits = np.full((5000, 258), -np.inf)
    logits[:, [7, 200]] = 0.0
    assert set(batch_sample(logits, np.full(5000, 1), np.arange(5000)).tolist()) == {7, 200}


def test_rows_with_different_options_in_one_batch():
    logits = np.tile([1.0, 0.9, 0.8, 0.7], (3, 1))
    out = sample(logits, [1, 1, 1], [0, 0, 0], [0.0, 1.0, 1.0], [0, 1, 0], [1.0, 1.0, 1e-9])
    assert out.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "params,message",
    [
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(temperature=math.nan), "temperature"),
        (SamplingParams(temperature=math.inf), "temperature"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_p=math.nan), "top_p"),
    ],
)
def test_invalid_options_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        params.validate()
