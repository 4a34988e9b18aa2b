# Developer entry points. `make setup test` is what the README and CI run.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# The exact command that generated the committed stubs; tests/test_proto_stubs.py runs it too.
PROTOC = $(BIN)/python -m grpc_tools.protoc -Iclient=proto --python_out=. --pyi_out=. --grpc_python_out=.

.PHONY: setup test-deps test lint format test-fast test-docker proto train-default gpu-wheels demo clean

setup: $(BIN)/lstm-serve

$(BIN)/lstm-serve: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The main job: serve the default model and stream a generation through the client.
demo: setup
	BIN=$(BIN) bash scripts/demo.sh

# System tools the tests run for real (Prometheus, promtool, unshare): installed when missing.
test-deps:
	bash scripts/test-deps.sh

test: setup test-deps lint
	$(BIN)/python -m pytest -q

# One formatter and linter for all (configured in pyproject.toml); `make format` applies both.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Builds the image and runs trainer -> server -> Prometheus with docker-compose (needs root).
test-docker: setup
	BIN=$(BIN) bash deploy/test-docker.sh

proto: setup
	$(PROTOC) proto/lstmserve/v1/*.proto

# The command that produced models/default.safetensors (see README: Training).
train-default: setup
	$(BIN)/lstm-serve train --out models/default.safetensors --max-minutes 40

# The wheels bench/gpu_check.sh carries to the GPU machine (Python 3.12, no installs there), at the
# dev venv's versions: the tests' (pytest, pydantic), the server's and client's for the front-end
# scaling benchmark (grpcio and its siblings, protobuf, msgspec, ...), plus pytest-xdist to
# compile the tests' kernels in parallel; dependencies are resolved for that machine (torch and
# numpy are the machine's own).
gpu-wheels: setup
	$(BIN)/pip download -q -d .whl --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		$$($(BIN)/pip freeze | grep -iE '^(pydantic|pydantic[-_]core|pydantic[-_]settings|pytest|msgspec|grpcio|grpcio[-_]health[-_]checking|grpcio[-_]reflection|protobuf|prometheus[-_]client|safetensors|pyyaml|tqdm)==') pytest-xdist==3.8.0

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
