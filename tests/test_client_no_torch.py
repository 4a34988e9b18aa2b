"""The client package stands alone: grpcio and protobuf, never torch, numpy or the server."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("torch", "numpy", "server", "tqdm")

# Every blocked import raises ImportError; afterwards none of them may be loaded.
SCRIPT = f"""
import contextlib, io, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"blocked: {{name}}")

sys.meta_path.insert(0, Block())
import client
from client import AsyncClient, Client, ClientOptions, Session, StatusError
from client import bench, cli

for argv in (["--help"], ["generate", "--help"], ["chat", "--help"], ["sessions", "export", "--help"], ["bench", "--help"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert "usage: lstm-client" in out.getvalue(), argv

loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
assert not loaded, loaded
print("ok")
"""


def test_client_imports_and_cli_help_without_torch_numpy_or_server():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_importing_the_package_loads_nothing_heavy():
    script = (
        "import sys, client; print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_console_script_points_at_the_cli():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("lstm-client") == "client.cli:main"
