"""The README's first command: `make demo` runs scripts/demo.sh, which serves the default
model, streams a generation through lstm-client and stops the server."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_demo_serves_the_default_model_and_streams_a_generation():
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "MAX_TOKENS": "60", "PROMPT": "import "}
    done = subprocess.run(
        ["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "server on 127.0.0.1:" in done.stderr and "prompt: import " in done.stderr
    text = done.stdout.strip()
    assert len(text) >= 20, f"too little text generated: {text!r}"  # 60 byte tokens, whole characters
