"""Loaded first (via PYTHONPATH) by tests/test_gpu_check.py: makes this interpreter lack what
the GPU machines' image lacks of our dependencies (the device README's package list of
2026-11-17: it has torch, triton, numpy, grpcio, protobuf, safetensors, prometheus-client,
pytest, pytest-xdist, but none of these). pydantic is missing there too; bench/gpu_check.sh
carries it as a wheel (make gpu-wheels)."""

import sys

MISSING = {"grpc_health", "grpc_reflection", "pydantic_settings", "trustme", "grpc_tools"}


class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r} (as on the GPU image)", name=name)
        return None


sys.meta_path.insert(0, _Missing())
