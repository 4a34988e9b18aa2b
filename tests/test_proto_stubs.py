"""The committed stubs are exactly what `make proto` generates from proto/."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["lstm_serve_pb2.py", "lstm_serve_pb2.pyi", "lstm_serve_pb2_grpc.py"]


def protoc_command() -> list[str]:
    """The Makefile's PROTOC line, with this interpreter as $(BIN)/python."""
    line = re.search(r"^PROTOC = (.+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    return [sys.executable if word == "$(BIN)/python" else word for word in line.split()]


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "proto").rglob("*.proto"))
    subprocess.run([*protoc_command(), *protos], cwd=tmp_path, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "client/lstmserve/v1" / name).read_text()
        committed = (ROOT / "client/lstmserve/v1" / name).read_text()
        assert fresh == committed, f"client/lstmserve/v1/{name} is stale: run `make proto`"
