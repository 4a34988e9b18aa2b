"""The step kernels compile for real GPUs here, without one: Triton to PTX, ptxas to a cubin.

The interpreter tests prove what the kernels compute; these prove that the compiled kernels
exist for an H100 (sm_90a) and an A100 (sm_80) and fit them: no register spills, shared
memory within the block limit, and the dot on the matrix instruction we expect (bf16 on
Hopper's wgmma, fp16 on Ampere's mma.sync, fp32 on exact FMA). They run
bench/kernel_compile.py in a subprocess, because the kernels in this process may have been
built for the interpreter (TRITON_INTERPRET is read when a kernel is decorated).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compile_report(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "bench/kernel_compile.py", "--out", str(out), *args]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def assert_fits(report: dict, kernels: int, mma: str) -> None:
    rows = report["rows"]
    assert len(rows) == kernels
    for r in rows:
        where = f"{r['kernel']} H={r['hidden']} {r['config']}"
        assert r["spill_bytes"] == 0, f"{where} spills {r['spill_bytes']} bytes"
        assert 0 < r["registers"] <= 255, where
        assert 0 < r["shared_bytes"] <= report["shared_limit"], where
        assert r["mma"] == mma, f"{where} compiled its dot to {r['mma']}"
        assert r["grid_dependency"] == r["config"]["pdl"], f"{where}: PDL asked for, PTX disagrees"


@pytest.mark.slow
def test_every_sweep_config_compiles_for_h100_on_the_tensor_cores(tmp_path):
    # H=1000: hidden units and K padded to whole tiles; 3 kernels (2 layers, head) per config
    report = compile_report(tmp_path, "--arch", "90", "--hidden", "1000")
    assert_fits(report, kernels=3 * 8, mma="wgmma")
    assert [r["config"]["pdl"] for r in report["rows"]] == [False] * 21 + [
        True
    ] * 3  # the last one launches early
    assert report["rows"][0]["config"] == {"block_b": 64, "block_h": 16, "block_k": 64, "block_v": 64,
                                            "num_warps": 4, "num_stages": 3, "pdl": False}  # fmt: skip


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_the_default_tile_plans_compile_for_h100(tmp_path, cell):
    report = compile_report(tmp_path, "--cell", cell, "--plan", "--hidden", "512")
    assert_fits(report, kernels=3 * 3, mma="wgmma")
    assert {r["config"]["block_b"] for r in report["rows"]} == {64, 128}


def test_fp16_compiles_for_a100(tmp_path):
    report = compile_report(
        tmp_path, "--arch", "80", "--dtype", "fp16", "--hidden", "512", "--config", "64,16,64"
    )
    assert_fits(report, kernels=3, mma="mma.sync")


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_the_fp32_plans_compile_to_exact_fma(tmp_path, cell):
    report = compile_report(tmp_path, "--cell", cell, "--dtype", "fp32", "--plan", "--hidden", "37", "1024")
    assert_fits(report, kernels=2 * 3, mma="fma")


def test_the_checks_fail_on_a_spilling_kernel(tmp_path):
    # the bf16 tiles on FMA units: tens of KiB of spills per thread (why fp32 has its own plan)
    report = compile_report(
        tmp_path, "--cell", "rnn", "--dtype", "fp32", "--hidden", "37", "--config", "64,64,64"
    )
    with pytest.raises(AssertionError, match="spills"):
        assert_fits(report, kernels=3, mma="fma")
