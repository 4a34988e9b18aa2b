"""The synthetic backend: its recurrence against plain Python integers, batch invariance, pool
operations, and a real server that serves it (`--backend synthetic`)."""

from __future__ import annotations

import pytest
import torch

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server import tokenizer
from server.kernels import make_backend
from server.kernels.state_pool import StatePool
from server.kernels.synthetic_step import INCREMENT, MODULUS, MULTIPLIER, PEAK
from server.model import ModelConfig, RecurrentLM
from tests.stubs import connect, create, generate

CONFIG = ModelConfig(cell="lstm", layers=2, hidden=8, embed=4)


def reference(tokens: list[int], state: int = 0) -> list[int]:
    """The running hash after each token, in Python integers."""
    states = []
    for token in tokens:
        state = (state * MULTIPLIER + token + INCREMENT) % MODULUS
        states.append(state)
    return states


def backend_and_pool(slots: int = 8):
    torch.manual_seed(0)
    pool = StatePool(CONFIG, "cpu", slots, slots)
    return make_backend(RecurrentLM(CONFIG), pool, "synthetic"), pool


def step(backend, tokens: list[int], slots: list[int]) -> torch.Tensor:
    return backend.step(torch.tensor(tokens), torch.tensor(slots))


def test_the_recurrence_and_the_peak_follow_the_reference():
    backend, pool = backend_and_pool()
    slot, tokens = pool.allocate(), [tokenizer.BOS, 100, 32, 255, 7, 7, 7]
    for token, state in zip(tokens, reference(tokens)):
        logits = step(backend, [token], [slot])[0]
        assert logits.argmax().item() == state % CONFIG.vocab_size
        assert logits.max().item() == PEAK and logits.sum().item() == PEAK


def test_a_row_is_the_same_in_any_batch():
    backend, pool = backend_and_pool()
    alone, batched = pool.allocate(), [pool.allocate() for _ in range(5)]
    for token in [tokenizer.BOS, 65, 66]:
        expected = step(backend, [token], [alone])[0]
        got = step(backend, [token, 1, 2, 3, 4], batched)[0]
        assert torch.equal(expected, got)
    assert torch.equal(pool.read(alone).h, pool.read(batched[0]).h)


def test_fork_export_and_import_continue_the_same_hash():
    backend, pool = backend_and_pool()
    parent = pool.allocate()
    step(backend, [tokenizer.BOS], [parent])
    step(backend, [42], [parent])
    child, imported = pool.fork(parent), pool.import_(pool.export(parent))
    rows = step(backend, [9, 9, 9], [parent, child, imported])
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])
    pool.reset(child)
    assert (
        step(backend, [tokenizer.BOS], [child])[0].argmax().item()
        == reference([tokenizer.BOS])[0] % CONFIG.vocab_size
    )


@pytest.fixture
def synthetic_server(start_server):
    return start_server("--backend", "synthetic")


def test_a_server_with_the_synthetic_backend_generates_the_reference_tokens(synthetic_server):
    stub = connect(synthetic_server.target)
    vocab = {m.name: m.vocab_size for m in stub.ListModels(pb.ListModelsRequest()).models}["tiny"]
    session = create(stub, seed=3)
    prompt = tokenizer.encode("def ")
    tokens, finished = generate(
        stub, session.id, prompt="def ", max_tokens=12, temperature=0.0, ignore_eos=True
    )
    states = reference([tokenizer.BOS, *prompt])
    expected = []
    for _ in range(12):
        expected.append(states[-1] % vocab)
        states += reference([expected[-1]], states[-1])
    assert tokens == expected
    assert finished.position == 1 + len(prompt) + 12
