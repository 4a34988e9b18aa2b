"""Classification heads in the model and its checkpoint (issue 17's model part), in process."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server import checkpoint, tokenizer
from server.checkpoint import CheckpointError
from server.classifier import HeadSpec
from server.model import ModelConfig, RecurrentLM, State

LANGUAGE = HeadSpec(name="language", labels=("python", "c", "shell"))
SENTIMENT = HeadSpec(name="sentiment", labels=("negative", "positive"), hidden=6)


def model_with_heads(cell: str = "lstm", heads=(LANGUAGE, SENTIMENT)) -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(ModelConfig(cell=cell, layers=2, hidden=10, embed=4, heads=heads))


def metadata(data: bytes) -> dict:
    size = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["lstm_serve"])


def test_a_language_model_alone_keeps_its_tensors_fingerprint_and_metadata():
    torch.manual_seed(0)
    model = RecurrentLM(ModelConfig(layers=2, hidden=10, embed=4))
    data = checkpoint.to_bytes(model)
    assert not any(name.startswith("heads.") for name in model.state_dict())
    assert "heads" not in metadata(data)["model"]  # servers from before heads still read it
    tensors = load_safetensors(data)
    assert metadata(data)["fingerprint"] == checkpoint.fingerprint(tensors)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_heads_round_trip_and_classify_the_float64_final_state(tmp_path, cell):
    model = model_with_heads(cell)
    checkpoint.save(tmp_path / "m.safetensors", model)
    loaded = checkpoint.load(tmp_path / "m.safetensors")
    assert loaded.meta.model.heads == (LANGUAGE, SENTIMENT)
    tokens = torch.tensor([tokenizer.BOS, *tokenizer.encode("int main(void)")])
    reference = loaded.model.double()
    state = reference.initial_state(1)
    for token in tokens:  # step by step in float64: the state a served session reaches
        _, state = reference.step(token[None], State(state.h, state.c))
    probabilities = reference.classify(state.h[-1])
    assert set(probabilities) == {"language", "sentiment"}
    assert probabilities["language"].shape == (1, 3) and probabilities["sentiment"].shape == (1, 2)
    for p in probabilities.values():
        assert torch.allclose(p.sum(dim=-1), torch.ones(1, dtype=p.dtype), atol=1e-6)
    _, whole = model.double()(tokens[None])  # the fused forward over the sequence agrees
    assert torch.allclose(model.classify(whole.h[-1])["language"], probabilities["language"], atol=1e-10)


def test_the_fingerprint_covers_the_labels_and_a_changed_label_is_refused(tmp_path):
    model = model_with_heads()
    data = checkpoint.to_bytes(model)
    tensors = load_safetensors(data)
    renamed = (HeadSpec(name="language", labels=("python", "c", "bash")), SENTIMENT)
    assert checkpoint.fingerprint(tensors, renamed) != checkpoint.fingerprint(tensors, model.config.heads)
    meta = metadata(data)
    meta["model"]["heads"][0]["labels"][2] = "bash"  # the same tensors, relabelled by hand
    path = tmp_path / "m.safetensors"
    path.write_bytes(save_safetensors(tensors, metadata={"lstm_serve": json.dumps(meta)}))
    with pytest.raises(CheckpointError, match="fingerprint"):
        checkpoint.load(path)


def test_a_missing_head_tensor_is_refused(tmp_path):
    model = model_with_heads()
    tensors = {
        k: v
        for k, v in load_safetensors(checkpoint.to_bytes(model)).items()
        if k != "heads.sentiment.layers.2.bias"
    }
    meta = metadata(checkpoint.to_bytes(model))
    path = tmp_path / "m.safetensors"
    path.write_bytes(save_safetensors(tensors, metadata={"lstm_serve": json.dumps(meta)}))
    with pytest.raises(CheckpointError, match="missing tensors.*heads.sentiment"):
        checkpoint.load(path)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"name": "x", "labels": ["only"]}, "at least 2"),
        ({"name": "x", "labels": ["a", "a"]}, "distinct"),
        ({"name": "Bad Name", "labels": ["a", "b"]}, "pattern"),
        ({"name": "x", "labels": ["a", "b"], "hidden": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_head_specs_are_refused_with_what_to_fix(fields, words):
    with pytest.raises(ValidationError, match=words):
        HeadSpec(**fields)


def test_two_heads_may_not_share_a_name():
    with pytest.raises(ValidationError, match="head names must be distinct"):
        ModelConfig(heads=(LANGUAGE, HeadSpec(name="language", labels=("a", "b"))))
