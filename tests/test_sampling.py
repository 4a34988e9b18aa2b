import math

import pytest
import torch

from server.sampling import SamplingParams, sample, sample_one, uniform_noise


def batch_sample(logits, seeds, positions, temperature=1.0, top_k=0, top_p=1.0):
    b = logits.shape[0]
    return sample(
        logits, torch.as_tensor(seeds), torch.as_tensor(positions),
        torch.full((b,), temperature, dtype=torch.float64), torch.full((b,), top_k), torch.full((b,), top_p, dtype=torch.float64),
    )


def test_noise_is_a_function_of_seed_position_and_token():
    a = uniform_noise(torch.tensor([5, 5, 6]), torch.tensor([10, 11, 10]), 258)
    b = uniform_noise(torch.tensor([6, 5]), torch.tensor([10, 10]), 258)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert 0 < a.min() and a.max() < 1
    assert abs(a.mean().item() - 0.5) < 0.03


def test_negative_and_64_bit_seeds_work():
    noise = uniform_noise(torch.tensor([-1, 2**63 - 1, -(2**63)]), torch.tensor([0, 0, 0]), 8)
    assert len({tuple(r.tolist()) for r in noise}) == 3


def test_a_row_samples_the_same_token_in_any_batch():
    torch.manual_seed(0)
    logits = torch.randn(64, 258)
    seeds, positions = torch.arange(64) * 7919, torch.arange(64) + 3
    together = batch_sample(logits, seeds, positions, temperature=0.9, top_k=50, top_p=0.95)
    perm = torch.randperm(64)
    shuffled = batch_sample(logits[perm], seeds[perm], positions[perm], temperature=0.9, top_k=50, top_p=0.95)
    assert torch.equal(shuffled, together[perm])
    for i in (0, 17, 63):
        alone = sample_one(logits[i], int(seeds[i]), int(positions[i]), SamplingParams(0.9, 50, 0.95))
        assert alone == together[i]


def test_temperature_zero_is_greedy_and_top_k_one_too():
    torch.manual_seed(1)
    logits = torch.randn(16, 258)
    assert torch.equal(batch_sample(logits, torch.arange(16), torch.zeros(16, dtype=torch.long), 0.0), logits.argmax(-1))
    assert torch.equal(batch_sample(logits, torch.arange(16), torch.zeros(16, dtype=torch.long), 2.0, top_k=1), logits.argmax(-1))


def test_frequencies_follow_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0]).expand(20000, 4)
    tokens = batch_sample(logits, torch.full((20000,), 42), torch.arange(20000), temperature=1.0)
    freq = torch.bincount(tokens, minlength=4).double() / 20000
    assert torch.allclose(freq, torch.softmax(logits[0].double(), -1), atol=0.015)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([3.0, 2.9, 2.8, 0.0, -0.5, -1.0]).expand(4000, 6)
    seeds, positions = torch.full((4000,), 9), torch.arange(4000)
    assert set(batch_sample(logits, seeds, positions, 5.0, top_k=2).tolist()) == {0, 1}
    probs = torch.softmax(logits[0].double(), -1)  # [0.32, 0.29, 0.26, ...]
    assert probs[:2].sum() < 0.7 < probs[:3].sum()
    assert set(batch_sample(logits, seeds, positions, 1.0, top_p=0.7).tolist()) == {0, 1, 2}
    assert set(batch_sample(logits, seeds, positions, 1.0, top_p=0.01).tolist()) == {0}


def test_rows_with_different_options_in_one_batch():
    logits = torch.tensor([1.0, 0.9, 0.8, 0.7]).expand(3, 4)
    out = sample(
        logits, torch.tensor([1, 1, 1]), torch.tensor([0, 0, 0]),
        torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), torch.tensor([0, 1, 0]), torch.tensor([1.0, 1.0, 1e-9], dtype=torch.float64),
    )
    assert out.tolist()[:3] == [0, 0, 0]


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
