"""The shipped `language` example classifier: its data manifest, its recorded figures, and the
documented streaming command on a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from server import checkpoint, tokenizer
from tests.conftest import ROOT, ServerProcess

sys.path.insert(0, str(ROOT / "scripts"))
import language_data  # noqa: E402

MODEL = ROOT / "models" / "language.safetensors"
DATA = ROOT / "data" / "language"
LICENSES = {"PSF-2.0", "BSD-3-Clause"}


def test_the_manifest_names_every_file_with_a_permissive_license_and_the_recorded_counts():
    rows = [line.split("\t") for line in (DATA / "manifest.tsv").read_text().splitlines()[1:]]
    assert {r[4] for r in rows} == LICENSES
    assert all(len(r[1]) == 64 for r in rows) and len({r[0] for r in rows}) == len(rows)
    recorded = json.loads((DATA / "results.json").read_text())["snippets"]
    for split in ("train", "eval"):
        for label, count in recorded[split].items():
            assert sum(int(r[5]) for r in rows if r[3] == split and r[2] == label) == count


def test_the_model_reaches_its_recorded_held_out_accuracy():
    loaded = checkpoint.load(MODEL)
    (head,) = loaded.meta.model.heads
    assert head.name == "language" and head.labels == ("c", "cpp", "python")
    try:
        held_out = language_data.rebuild(DATA / "manifest.tsv", "eval")
    except ValueError as e:
        pytest.skip(f"the held-out files are not this machine's: {e}")
    model = loaded.model.eval()
    correct = 0
    with torch.no_grad():
        for row in held_out:
            _, state = model(torch.tensor([[tokenizer.BOS, *tokenizer.encode(row["text"])]]))
            guess = model.classify(state.h[-1])["language"].argmax(-1).item()
            correct += head.labels[guess] == row["label"]
    recorded = json.loads((DATA / "results.json").read_text())["results"]
    (trained,) = [r for name, r in recorded.items() if name.startswith("LSTM")]
    assert correct / len(held_out) == pytest.approx(trained["accuracy"], abs=1e-3)


def test_streaming_classification_of_a_python_file(tmp_path_factory):
    models = tmp_path_factory.mktemp("language-models")
    shutil.copy(MODEL, models / MODEL.name)
    server = ServerProcess(["--models-dir", str(models), "--shutdown-delay", "0"], models_dir=models).start()
    try:
        source = ROOT / "server" / "tokenizer.py"  # not in the data: the project's own source
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "client.cli",
                "--target",
                server.target,
                "classify",
                "--stream",
                str(source),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == -(-len(source.read_text()) // 64)  # a line per 64-character piece
        assert lines[-1].split()[2].startswith("language=python")
    finally:
        server.stop()
