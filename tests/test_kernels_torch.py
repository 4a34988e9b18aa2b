"""The torch step backend against the float64 reference, and its batch invariance on CPU."""

import pytest
import torch

from server.kernels import make_backend
from server.kernels.state_pool import StatePool
from server.kernels.torch_step import TorchStep, padded_rows
from server.model import ModelConfig, RecurrentLM
from tests.kernel_harness import StepHarness

SHAPES = [("lstm", 2, 37, 11), ("rnn", 2, 45, 8), ("lstm", 1, 24, 5)]  # hidden sizes off powers of two
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("cell,layers,hidden,embed", SHAPES)
def test_matches_the_float64_reference(cell, layers, hidden, embed, dtype, tol):
    hs = StepHarness(cell, layers, hidden, embed, dtype)
    backend = make_backend(hs.model, hs.pool, "torch", dtype)
    for size in (1, 2, 7, 16, 33, 64):
        hs.check(backend, *hs.batch(size), tol)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_a_hundred_steps_stay_within_tolerance(cell):
    hs = StepHarness(cell, 2, 37, 11)
    backend = make_backend(hs.model, hs.pool, "torch")
    _, slots = hs.batch(5)
    for _ in range(100):
        hs.check(backend, torch.randint(0, 258, (5,)), slots, 1e-5)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_slots_outside_the_batch_are_untouched(cell):
    hs = StepHarness(cell, 2, 21, 6)
    backend = make_backend(hs.model, hs.pool, "torch")
    tokens, slots = hs.batch(9)
    before = hs.others(slots)
    backend.step(tokens, slots)
    assert all(torch.equal(a, b) for a, b in zip(before, hs.others(slots), strict=True))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "cell,layers,hidden,embed", [("lstm", 2, 37, 11), ("rnn", 1, 45, 8), ("lstm", 1, 512, 32)]
)
def test_batch_invariance_is_bitwise(cell, layers, hidden, embed, threads):
    """A row's logits and new state are the same bits for every batch size, position and neighbours."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hs = StepHarness(cell, layers, hidden, embed)
        backend = make_backend(hs.model, hs.pool, "torch")
        hs.assert_batch_invariant(backend, sizes=range(1, 65))
    finally:
        torch.set_num_threads(saved)


def test_padding_sizes():
    assert [padded_rows(b) for b in (0, 1, 4, 5, 8, 9, 16, 17, 64)] == [4, 4, 4, 8, 8, 16, 16, 32, 64]


def test_auto_is_torch_on_cpu_with_fp32_weights():
    cfg = ModelConfig(hidden=8, embed=4)
    pool = StatePool(cfg, "cpu", 2, 2)
    backend = make_backend(RecurrentLM(cfg), pool)
    assert isinstance(backend, TorchStep) and backend.name == "torch" and backend.pool is pool
    assert backend.dtype == torch.float32 and backend.w[0].dtype == torch.float32


def test_rejects_bad_inputs():
    cfg = ModelConfig(hidden=8, embed=4)
    pool = StatePool(cfg, "cpu", 4, 4)
    slot = pool.allocate()
    backend = make_backend(RecurrentLM(cfg), pool)
    ok = torch.tensor([1])
    with pytest.raises(ValueError, match="must both be"):
        backend.step(torch.tensor([1, 2]), torch.tensor([slot]))
    with pytest.raises(TypeError, match="int64"):
        backend.step(ok.int(), torch.tensor([slot]))
    with pytest.raises(ValueError, match="token ids"):
        backend.step(torch.tensor([258]), torch.tensor([slot]))
    with pytest.raises(ValueError, match="slots must lie"):
        backend.step(ok, torch.tensor([5]))
    with pytest.raises(ValueError, match="slots must lie"):
        backend.step(ok, torch.tensor([pool.pad_slot]))
    with pytest.raises(ValueError, match="twice"):
        backend.step(torch.tensor([1, 2]), torch.tensor([slot, slot]))
    with pytest.raises(ValueError, match="different model"):
        make_backend(RecurrentLM(cfg.model_copy(update={"hidden": 9})), pool)
    with pytest.raises(ValueError, match="unknown step backend"):
        make_backend(RecurrentLM(cfg), pool, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["torch", "synthetic"])
def test_a_cuda_pool_takes_host_token_ids(name):
    # the runner hands every backend host tensors; a backend on a CUDA pool moves them itself
    cfg = ModelConfig(cell="lstm", layers=2, hidden=16, embed=8)
    torch.manual_seed(0)
    model = RecurrentLM(cfg)
    logits = []
    for device in ("cpu", "cuda"):
        pool = StatePool(cfg, device, 4, 4)
        slot = pool.allocate()
        backend = make_backend(model, pool, name, torch.float32)
        for token in (1, 65, 66):
            out = backend.step(torch.tensor([token]), torch.tensor([slot]))
        logits.append(out.cpu())
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-3, atol=1e-3)
