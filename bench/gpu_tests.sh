#!/usr/bin/env bash
# The tests bench/gpu_check.sh runs on the GPU machine: the state pool and the step kernels,
# compiled for CUDA there (the `gpu` tests included). Without tests/conftest.py, which needs
# the server's gRPC packages that the GPU image lacks; kernel variants compile in parallel
# when pytest-xdist is there. The image's other pytest plugins stay out: they were built for
# its pytest, not necessarily for the one carried in. Extra arguments go to pytest.
# PYTHON: the interpreter (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
parallel=()
"$python" -c "import xdist" 2>/dev/null && parallel=(-p xdist.plugin -n 8)
exec "$python" -m pytest -q -p no:cacheprovider -o addopts="" --noconftest -W ignore::pytest.PytestConfigWarning \
    "${parallel[@]}" -k "not smoke" tests/test_state_pool.py tests/test_kernels_torch.py tests/test_kernels_triton.py "$@"
