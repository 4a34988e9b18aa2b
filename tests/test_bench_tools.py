"""The benchmarks' own logic: frontends_bench.py's paired summary (each K against the first K
of the same round, so that a machine whose speed drifts between rounds does not show as
scaling), and engine_bench.py run briefly against a real engine core."""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from frontends_bench import pair_with_first, summary  # noqa: E402


def run(round_: int, k: int, tokens_per_s: float, engine: float = 0.5) -> dict:
    return {
        "round": round_,
        "frontends": k,
        "tokens_per_s": tokens_per_s,
        "cpu_cores": {"engine core": engine},
    }


def test_each_k_is_compared_with_the_first_k_of_its_own_round():
    # round 2 runs in reverse order (2 before 1) on a machine twice as fast
    runs = [
        run(1, 1, 1000),
        run(1, 2, 900),
        run(2, 2, 2200),
        run(2, 1, 2000),
        run(3, 1, 1000),
        run(3, 2, 1200),
    ]
    pair_with_first(runs, first_k=1)
    assert [r["vs_first"] for r in runs] == [1.0, 0.9, 1.1, 1.0, 1.0, 1.2]
    one, two = summary(runs, [1, 2])
    assert (one["frontends"], one["runs"], one["median_vs_first"]) == (1, 3, 1.0)
    assert (two["median_vs_first"], two["vs_first_min"], two["vs_first_max"]) == (1.1, 0.9, 1.2)
    assert two["median_tokens_per_s"] == 1200  # unpaired, the drift would show as K = 2 faster


def test_a_k_listed_twice_is_paired_with_the_first_run_of_the_first_k():
    runs = [run(1, 1, 1000), run(1, 2, 1100), run(1, 1, 800)]
    pair_with_first(runs, first_k=1)
    assert [r["vs_first"] for r in runs] == [1.0, 1.1, 0.8]
    (one, two) = summary(runs, [1, 2, 1])
    assert one["runs"] == 2 and one["median_vs_first"] == 0.9 and two["median_vs_first"] == 1.1


def test_the_engine_benchmark_drives_a_real_engine_core_and_reports_its_cpu(tmp_path):
    """bench/engine_bench.py end to end, briefly: the engine core process, our IPC client,
    tokens counted and the engine core's CPU read from /proc (its figures are not checked:
    this machine is shared)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "engine_bench.json"
    command = [sys.executable, "bench/engine_bench.py", "--sessions", "4", "--duration", "1"]
    done = subprocess.run(command + ["--max-tokens", "8", "--out", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["sessions"] == 4 and run["tokens_per_s"] > 0
    assert 0 < run["engine_core_cores"] <= 1.5 and run["engine_core_us_per_token"] > 0
    assert "engine core µs/tok" in done.stdout
