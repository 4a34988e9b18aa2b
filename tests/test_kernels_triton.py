"""The Triton step kernels against the float64 reference.

Without CUDA they run under Triton's interpreter (TRITON_INTERPRET=1, set here before triton
is first imported); with CUDA the same tests run the compiled kernels, and the `gpu` tests add
CUDA graphs and serving sizes. Without triton installed these tests fail: they never skip.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402,F401  (no triton: fail here, loudly)

from server.kernels import make_backend  # noqa: E402
from server.kernels.state_pool import StatePool  # noqa: E402
from server.kernels.triton_step import KernelConfig, TilePlan, TritonStep, as_plan  # noqa: E402
from server.model import ModelConfig, RecurrentLM  # noqa: E402
from tests.kernel_harness import StepHarness  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]
# Test sizes then span several tiles on every axis: B=64 is 2 row tiles, H=37 or 45 is
# 2 column tiles and 2 K chunks, the vocabulary is 3 tiles.
SMALL = KernelConfig(block_b=32, block_h=32, block_k=32, block_v=128)
# Under the interpreter, one program per kernel at test sizes: 100 steps stay quick. On CUDA,
# the default plan (None).
WHOLE = None if CUDA else KernelConfig(block_b=64, block_h=64, block_k=64, block_v=256)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def eager(hs: StepHarness, dtype=torch.float32, config: KernelConfig = SMALL) -> TritonStep:
    """A backend without CUDA graphs whose outputs and scratch start as NaN."""
    backend = TritonStep(hs.model, hs.pool, dtype, config, use_graphs=False)
    backend.poison = True
    return backend


def poison_next_h(pool: StatePool, slots: torch.Tensor) -> None:
    """NaN in the h buffer that the slots' next states go to: every element must be written."""
    slots = slots.to(pool.device)
    pool.h[1 - pool.parity[slots].long(), :, slots] = float("nan")


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("cell,hidden,embed", [("lstm", 37, 11), ("rnn", 45, 8)])
def test_matches_the_float64_reference_and_writes_every_element(cell, hidden, embed, dtype, tol):
    hs = StepHarness(cell, 2, hidden, embed, dtype, DEVICE)
    backend = eager(hs, dtype)
    for size in (1, 64):
        tokens, slots = hs.batch(size)
        poison_next_h(hs.pool, slots)
        hs.check(backend, tokens, slots, tol)


def test_fp16_weights():
    hs = StepHarness("lstm", 2, 37, 11, torch.float16, DEVICE)
    hs.check(eager(hs, torch.float16), *hs.batch(17), 1e-2)


def plan(cell: str) -> TilePlan:
    """Three configs that differ in every tile but K (rows, units, vocabulary, warps, stages);
    all keep 16 or more MMA columns and 64 rows per 4 warps, so on Hopper all run on wgmma."""
    unit = 4 if cell == "lstm" else 16
    return (
        (1, KernelConfig(block_b=64, block_h=unit, block_k=32, block_v=16, num_stages=6)),
        (4, KernelConfig(block_b=64, block_h=8 * unit, block_k=32, block_v=128)),
        (32, KernelConfig(block_b=128, block_h=2 * unit, block_k=32, block_v=32, num_warps=8)),
    )


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_the_default_plans(cell):
    hs = StepHarness(cell, 2, 37, 11, torch.bfloat16, DEVICE, live=520)
    backend = TritonStep(hs.model, hs.pool, torch.bfloat16, use_graphs=False)
    assert [size for size, _ in backend.plan] == [1, 128, 512]
    for size in (3, 128, 512):  # one batch per config
        hs.check(backend, *hs.batch(size), 1e-2)
    hs = StepHarness(cell, 2, 37, 11, device=DEVICE)
    fp32 = TritonStep(hs.model, hs.pool, torch.float32, use_graphs=False)
    assert len(fp32.plan) == 1  # FMA tiles: one small config
    hs.check(fp32, *hs.batch(5), 1e-5)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_programmatic_dependent_launch(cell):
    # on CUDA (Hopper and later) each kernel waits on the previous one in-kernel; the interpreter ignores it
    hs = StepHarness(cell, 2, 37, 11, torch.bfloat16, DEVICE)
    config = KernelConfig(block_h=4 if cell == "lstm" else 16, block_v=16, num_stages=6, pdl=True)
    backend = TritonStep(hs.model, hs.pool, torch.bfloat16, config)
    for size in (1, 40, 7):
        hs.check(backend, *hs.batch(size), 1e-2)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("hidden", [16, 64])
def test_narrow_tiles_over_a_hidden_size_of_one_k_chunk(cell, hidden):
    # 16 MMA columns and a K loop that would run once: the shape Triton 3.6 miscompiled on sm_90
    hs = StepHarness(cell, 2, hidden, 11, torch.bfloat16, DEVICE)
    config = KernelConfig(block_h=4 if cell == "lstm" else 16, block_v=16, num_stages=6)
    backend = TritonStep(hs.model, hs.pool, torch.bfloat16, config, use_graphs=False)
    assert backend.kh == 2 * config.block_k  # padded to two K chunks
    for size in (1, 7):
        hs.check(backend, *hs.batch(size), 1e-2)


def test_a_plan_picks_its_config_by_the_batch_bucket():
    backend = eager(StepHarness("lstm", 1, 8, 4, device=DEVICE), config=plan("lstm"))
    configs = [c for _, c in plan("lstm")]
    expected = {1: 0, 2: 0, 3: 1, 4: 1, 16: 1, 17: 2, 64: 2, 1000: 2}  # 3 runs in bucket 4; 17 in bucket 32
    assert {b: configs.index(backend.config_for(b)) for b in expected} == expected


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_batch_invariance_holds_across_a_plans_configs(cell):
    hs = StepHarness(cell, 2, 37, 11, torch.bfloat16, DEVICE)
    hs.check(eager(hs, torch.bfloat16, config=plan(cell)), *hs.batch(40), 1e-2)
    hs.assert_batch_invariant(eager(hs, torch.bfloat16, config=plan(cell)), sizes=(1, 3, 40))  # every config


@pytest.mark.parametrize(
    "plan,problem",
    [
        ((), "ascending from 1"),
        (((2, KernelConfig()),), "ascending from 1"),
        (((1, KernelConfig()), (1, KernelConfig())), "ascending from 1"),
        (((1, KernelConfig()), (8, KernelConfig(block_k=32))), "share block_k"),
    ],
)
def test_a_bad_plan_is_refused(plan, problem):
    with pytest.raises(ValueError, match=problem):
        as_plan(plan)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_a_hundred_steps_stay_within_tolerance(cell):
    hs = StepHarness(cell, 2, 37, 11, device=DEVICE)
    backend = eager(hs, config=WHOLE)
    _, slots = hs.batch(3)
    for _ in range(100):
        hs.check(backend, torch.randint(0, 258, (3,)), slots, 1e-5)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_only_the_batch_rows_change(cell):
    hs = StepHarness(cell, 2, 37, 11, device=DEVICE)
    tokens, slots = hs.batch(9)
    before, parity = hs.others(slots), hs.pool.parity[slots.to(DEVICE)].clone()
    eager(hs).step(tokens.to(DEVICE), slots.to(DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(before, hs.others(slots), strict=True))
    assert torch.equal(hs.pool.parity[slots.to(DEVICE)], 1 - parity)  # every batch row flipped once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_batch_invariance_is_bitwise(cell, dtype):
    hs = StepHarness(cell, 2, 37, 11, dtype, DEVICE)
    hs.assert_batch_invariant(eager(hs, dtype), sizes=(1, 2, 33, 64))


def test_make_backend_builds_the_triton_backend():
    hs = StepHarness("lstm", 1, 8, 4, device=DEVICE)
    backend = make_backend(hs.model, hs.pool, "triton", torch.float32)
    assert isinstance(backend, TritonStep) and backend.name == "triton" and backend.pool is hs.pool


def test_the_benchmark_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "bench/kernel_bench.py", "--smoke", "--out", str(out)]
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"ours", "torch backend", "LSTMCell eager", "cuDNN LSTM eager"}
    assert all(r["median_us"] > 0 for r in rows)


def test_the_config_sweep_smoke_run(tmp_path):
    out = tmp_path / "sweep.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # --smoke must set it itself
    root = Path(__file__).resolve().parents[1]
    configs = ["64,16,64", "32,4,64,16", "64,16,16"]  # the last sums K in 2 chunks where the others use 1
    cmd = [sys.executable, "bench/kernel_sweep.py", "--smoke", "--config", *configs, "--out", str(out)]
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    rows = [(r["batch"], r["config"]["block_h"], r["config"]["block_k"], r["agrees"]) for r in result["rows"]]
    assert rows == [(b, *tiles) for b in (1, 3) for tiles in ((16, 64, True), (4, 64, True), (16, 16, False))]
    assert all(r["median_us"] > 0 for r in result["rows"])
    assert [(r["batch"], r["config"]["block_k"]) for r in result["best"]] == [(1, 64), (3, 64)]


# ---- CUDA only: graphs, pool growth, serving sizes -----------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_graphs_replay_exactly_the_eager_step():
    hs = StepHarness("lstm", 2, 300, 64, torch.bfloat16, DEVICE, live=200)
    graphed = TritonStep(hs.model, hs.pool, torch.bfloat16)
    plain = TritonStep(hs.model, hs.pool, torch.bfloat16, use_graphs=False)
    for size, device in ((1, "cpu"), (3, "cuda"), (64, "cpu"), (100, "cpu"), (3, "cpu")):
        tokens, slots = hs.batch(size)
        start = hs.pool.read(slots.tolist())
        logits = graphed.step(tokens.to(device), slots.to(device)).clone()
        after = hs.pool.read(slots.tolist())
        hs.pool.write(slots.tolist(), start)
        assert torch.equal(logits, plain.step(tokens.to(DEVICE), slots.to(DEVICE)))
        assert all(torch.equal(a, b) for a, b in zip(after, hs.pool.read(slots.tolist())))
    assert sorted(graphed.graphs.graphs) == [1, 4, 64, 128]


@pytest.mark.gpu
@needs_cuda
def test_graphs_follow_the_pool_when_it_grows():
    torch.manual_seed(0)
    cfg = ModelConfig(cell="lstm", layers=2, hidden=40, embed=8)
    model = RecurrentLM(cfg)
    ref = copy.deepcopy(model).double()
    pool = StatePool(cfg, DEVICE, 2, 16)
    backend = TritonStep(model, pool, torch.float32)
    slots, tokens, state = (
        torch.tensor([pool.allocate(), pool.allocate()]),
        torch.tensor([5, 6]),
        ref.initial_state(2),
    )
    for t in range(3):
        if t == 1:
            _ = [pool.allocate() for _ in range(5)]
            assert pool.generation == 2
        logits = backend.step(tokens, slots).double().cpu()
        expected, state = ref.step(tokens, state)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cell,hidden", [("lstm", 512), ("lstm", 1000), ("rnn", 1024)])
def test_serving_sizes_with_auto_defaults(cell, hidden):
    hs = StepHarness(cell, 2, hidden, 128, torch.bfloat16, DEVICE, live=300)
    backend = make_backend(hs.model, hs.pool)
    assert backend.name == "triton" and backend.dtype == torch.bfloat16
    for size in (1, 256):
        hs.check(backend, *hs.batch(size), 1e-2)


@pytest.mark.gpu
@needs_cuda
def test_batch_invariance_across_graph_buckets():
    hs = StepHarness("lstm", 2, 512, 128, torch.bfloat16, DEVICE, live=1100)
    hs.assert_batch_invariant(make_backend(hs.model, hs.pool), sizes=(1, 7, 64, 65, 300, 1024))
