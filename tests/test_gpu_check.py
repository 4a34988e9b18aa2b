"""bench/gpu_check.sh must work the first time on a GPU machine, whose image lacks some of our
dependencies and installs nothing: its tests and benchmarks must import there. Checked here
with an interpreter that lacks what that image lacks (tests/gpu_image/sitecustomize.py)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_image_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env | {"PYTHONPATH": str(ROOT / "tests" / "gpu_image"), "PYTHON": sys.executable}


def test_the_simulated_image_lacks_the_grpc_health_package():
    done = subprocess.run(
        [sys.executable, "-c", "import grpc_health"], env=gpu_image_env(), capture_output=True, text=True
    )
    assert done.returncode != 0 and "as on the GPU image" in done.stderr


def test_the_gpu_tests_collect_without_the_missing_packages():
    done = subprocess.run(["bash", "bench/gpu_tests.sh", "--collect-only"], cwd=ROOT, env=gpu_image_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "test_batch_invariance_across_graph_buckets" in done.stdout  # the gpu tests are among them
    assert "smoke" not in done.stdout


def test_the_benchmarks_import_without_the_missing_packages():
    code = "import bench.kernel_bench, bench.kernel_sweep, bench.kernel_compile, bench.frontends_bench"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=gpu_image_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
