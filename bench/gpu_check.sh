#!/usr/bin/env bash
# The step kernel's GPU checks, in one call on a GPU machine (one H100; Python 3.12 with its
# own torch and triton; no package installs, no network): the state-pool and kernel tests,
# compiled for CUDA this time (the `gpu` tests included), then the benchmark, then how serving
# scales with front-end processes on the machine's cores (bench/frontends_bench.py, synthetic
# backend, K = 1, 2, 4, 8) and the engine core's own ceiling on one of them (bench/engine_bench.py),
# then in the time left the tile-config sweep (bench/kernel_sweep.py, which saves its rows as it goes).
# Pure-Python dependencies the machine lacks travel as wheels in .whl/ (see
# docs/kernel-benchmarks.md). Results go to $OUT (or bench/results). Budget: under 5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/gpu_env.txt"
start=$SECONDS
timeout 150 bash bench/gpu_tests.sh 2>&1 | tee "$out/gpu_tests.txt"
tests=${PIPESTATUS[0]}
echo "tests: exit $tests after $((SECONDS - start)) s" | tee -a "$out/gpu_tests.txt"
timeout $((200 - (SECONDS - start))) python3 bench/kernel_bench.py --out "$out/kernel_bench.json" 2>&1 | tee "$out/kernel_bench.txt"
bench=${PIPESTATUS[0]}
echo "bench: exit $bench after $((SECONDS - start)) s" | tee -a "$out/kernel_bench.txt"
left=$((290 - (SECONDS - start)))
if ((left > 105)); then
    timeout 100 python3 bench/frontends_bench.py --frontends 1 2 4 8 --duration 4 --out "$out/frontends_bench.json" 2>&1 | tee "$out/frontends_bench.txt"
    echo "frontends: exit ${PIPESTATUS[0]}" | tee -a "$out/frontends_bench.txt"
fi
left=$((290 - (SECONDS - start)))
if ((left > 60)); then
    timeout 30 python3 bench/engine_bench.py --sessions 256 --duration 3 --out "$out/engine_bench.json" 2>&1 | tee "$out/engine_bench.txt"
    echo "engine: exit ${PIPESTATUS[0]}" | tee -a "$out/engine_bench.txt"
fi
left=$((290 - (SECONDS - start)))
if ((left > 20)); then
    timeout $left python3 bench/kernel_sweep.py --out "$out/kernel_sweep.json" 2>&1 | tee "$out/kernel_sweep.txt"
    echo "sweep: exit ${PIPESTATUS[0]} (124: stopped at the time limit, rows so far kept)" | tee -a "$out/kernel_sweep.txt"
fi
echo "total $((SECONDS - start)) s"
exit $((tests || bench))
