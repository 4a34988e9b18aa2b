"""The shipped default model: the README's figures are its own metadata's, `make train-default`
is the command that made it, and it fits in git."""

from __future__ import annotations

import re

from server import checkpoint
from tests.conftest import ROOT

MODEL = ROOT / "models" / "default.safetensors"
MAX_BYTES = 10_000_000  # it is committed


def training_paragraph() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("`models/default.safetensors` is what `make train-default` produces")
    return " ".join(readme[start : readme.index("\n\n", start)].split())


def test_the_readme_states_the_committed_models_own_figures():
    meta = checkpoint.load(MODEL).meta
    text = training_paragraph()
    bits, minutes = re.search(r"\*\*([\d.]+) held-out bits per byte\*\* in ([\d.]+) minutes", text).groups()
    steps, tokens = re.search(r"after ([\d,]+) steps and ([\d.]+) M tokens", text).groups()
    layers, hidden = re.search(r"a (\d+)-layer LSTM, hidden (\d+)", text).groups()
    summary = meta.training
    assert float(bits) == round(summary.heldout_bits_per_byte, 3)
    assert float(minutes) == round(summary.wall_seconds / 60, 1)
    assert int(steps.replace(",", "")) == summary.steps
    assert float(tokens) == round(summary.tokens_seen / 1e6, 1)
    assert (int(layers), int(hidden), meta.model.cell) == (meta.model.layers, meta.model.hidden, "lstm")
    assert summary.corpus and not any(part.startswith("/") for part in summary.corpus)


def test_make_train_default_is_the_command_that_made_it():
    meta = checkpoint.load(MODEL).meta
    recipe = re.search(r"^train-default:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    flags = dict(re.findall(r"--([\w-]+) (\S+)", recipe))
    assert flags["out"] == "models/default.safetensors"
    assert (
        int(flags.get("layers", 1)) == meta.model.layers
        and int(flags.get("hidden", 512)) == meta.model.hidden
    )
    assert abs(meta.training.wall_seconds / 60 - float(flags["max-minutes"])) < 2  # the budget it ran to


def test_the_default_model_fits_in_git():
    assert MODEL.stat().st_size < MAX_BYTES
