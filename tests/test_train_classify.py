"""`lstm-serve train --task classify`: labelled data checked line by line, a head that learns,
an --init language model whose encoder stays frozen unless --fine-tune."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from server import checkpoint
from server.model import ModelConfig, RecurrentLM
from server.training.classify import ClassifyConfig, train_classifier
from server.training.labelled import DataError, load_dataset
from tests.conftest import ROOT

ALPHABETS = {"digits": "0123456789", "letters": "abcdefghijklmnopqrstuvwxyz", "symbols": "+-*/=<>!?&|%"}


def write_examples(path, per_label: int = 120, seed: int = 0, **rename) -> None:
    """Snippets whose label is the alphabet they are drawn from (and an imbalance: symbols are rarer)."""
    rng = random.Random(seed)
    lines = []
    for label, alphabet in ALPHABETS.items():
        for _ in range(per_label // (3 if label == "symbols" else 1)):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 40)))
            lines.append(json.dumps({"text": text, "label": rename.get(label, label)}))
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n")


def small(tmp_path, **fields) -> ClassifyConfig:
    defaults = dict(
        data=tmp_path / "data.jsonl", out=tmp_path / "clf.safetensors", hidden=24, embed=8, epochs=4
    )
    return ClassifyConfig(**(defaults | fields))


def test_a_head_learns_to_tell_the_labels_apart(tmp_path):
    write_examples(tmp_path / "data.jsonl", per_label=240)
    result = train_classifier(small(tmp_path))
    assert result.accuracy > 0.9 and result.macro_f1 > 0.85  # chance: 1/3
    loaded = checkpoint.load(tmp_path / "clf.safetensors")
    (head,) = loaded.meta.model.heads
    assert head.name == "label" and head.labels == ("digits", "letters", "symbols")
    assert sum(map(sum, result.confusion)) == len(load_dataset(tmp_path / "data.jsonl").heldout)
    assert (tmp_path / "clf.train" / "classify.png").exists()
    logged = [json.loads(line) for line in (tmp_path / "clf.train" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [1, 2, 3, 4]


def test_an_init_language_models_encoder_stays_frozen_unless_fine_tuned(tmp_path):
    write_examples(tmp_path / "data.jsonl", per_label=60)
    torch.manual_seed(0)
    lm = RecurrentLM(ModelConfig(hidden=24, embed=8))
    checkpoint.save(tmp_path / "lm.safetensors", lm)
    for fine_tune in (False, True):
        out = tmp_path / f"clf-{fine_tune}.safetensors"
        train_classifier(
            small(tmp_path, init=tmp_path / "lm.safetensors", out=out, epochs=1, fine_tune=fine_tune)
        )
        trained = checkpoint.load(out).model.state_dict()
        same = [torch.equal(trained[k], v) for k, v in lm.state_dict().items()]
        assert all(same) != fine_tune  # the LM head and encoder: untouched, or trained


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"text": "a", "label": "x"}\nnot json\n', "data.jsonl:2: not a JSON object"),
        ('{"text": "", "label": "x"}\n', "data.jsonl:1: empty text"),
        ('{"text": "a"}\n', 'data.jsonl:1: each line must be an object {"text"'),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "every example has the label 'x'"),
    ],
)
def test_bad_data_is_refused_naming_the_line(tmp_path, content, words):
    (tmp_path / "data.jsonl").write_text(content)
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace("{", r"\{")):
        load_dataset(tmp_path / "data.jsonl")


def test_a_label_too_rare_for_both_splits_is_named(tmp_path):
    write_examples(tmp_path / "data.jsonl", per_label=60)
    with (tmp_path / "data.jsonl").open("a") as f:
        f.write(json.dumps({"text": "zzz", "label": "rare"}) + "\n")
    with pytest.raises(DataError, match="label 'rare' has no (training|held-out) example"):
        load_dataset(tmp_path / "data.jsonl")


def test_the_cli_trains_a_classifier_and_refuses_the_default_models_file(tmp_path):
    write_examples(tmp_path / "data.jsonl", per_label=45)
    cli = [
        sys.executable,
        "-m",
        "server.cli",
        "train",
        "--task",
        "classify",
        "--data",
        str(tmp_path / "data.jsonl"),
    ]
    refused = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "--task classify needs --out" in refused.stderr
    out = tmp_path / "clf.safetensors"
    done = subprocess.run(
        [*cli, "--out", str(out), "--hidden", "16", "--embed", "8", "--epochs", "1", "--head", "alphabet"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "held-out accuracy" in done.stderr
    assert checkpoint.load(out).meta.model.heads[0].name == "alphabet"
