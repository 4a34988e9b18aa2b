import json
import os

import pytest
import torch
from safetensors.torch import save as save_safetensors

from server import checkpoint
from server.checkpoint import CheckpointError, CheckpointMeta
from server.model import ModelConfig, RecurrentLM

CONFIG = ModelConfig(cell="lstm", layers=2, hidden=12, embed=5)


@pytest.fixture
def model() -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(CONFIG)


def write_raw(path, tensors, config=CONFIG, **meta_overrides):
    """A checkpoint file built by hand, to reach each refusal."""
    meta = CheckpointMeta(
        format_version=1, model=config, fingerprint=checkpoint.fingerprint(tensors)
    ).model_dump(mode="json")
    meta.update(meta_overrides)
    path.write_bytes(save_safetensors(tensors, metadata={"lstm_serve": json.dumps(meta)}))
    return path


def tensors_of(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def test_round_trip_keeps_weights_config_and_fingerprint(tmp_path, model):
    training = checkpoint.TrainingSummary(
        corpus=["x"],
        corpus_digest="d" * 64,
        corpus_bytes=10,
        steps=5,
        horizon_steps=5,
        tokens_seen=50,
        train_bits_per_byte=3.0,
        heldout_bits_per_byte=3.5,
        wall_seconds=1.0,
        seed=7,
    )
    fp = checkpoint.save(tmp_path / "m.safetensors", model, training)
    loaded = checkpoint.load(tmp_path / "m.safetensors")
    assert loaded.fingerprint == fp == checkpoint.fingerprint(tensors_of(model))
    assert loaded.meta.model == CONFIG and loaded.meta.training == training
    assert loaded.meta.tokenizer.bos == 256 and loaded.meta.tokenizer.eos == 257
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_fingerprint_names_the_exact_weights(model):
    tensors = tensors_of(model)
    before = checkpoint.fingerprint(tensors)
    tensors["head.bias"][3] += 1e-7
    assert checkpoint.fingerprint(tensors) != before


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, model, monkeypatch):
    path = tmp_path / "m.safetensors"
    fp = checkpoint.save(path, model)

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, RecurrentLM(CONFIG))
    monkeypatch.undo()
    assert checkpoint.load(path).fingerprint == fp
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize("keep", [0, 7, 100, -1000])
def test_truncated_file_is_refused(tmp_path, model, keep):
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(path)


def test_flipped_tensor_byte_is_refused(tmp_path, model):
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(path)


def test_garbage_header_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all....")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        checkpoint.load(path)


def test_unknown_format_version_is_refused(tmp_path, model):
    path = write_raw(tmp_path / "m.safetensors", tensors_of(model), format_version=99)
    with pytest.raises(CheckpointError, match="unknown checkpoint format version 99"):
        checkpoint.load(path)


def test_foreign_safetensors_file_is_refused(tmp_path, model):
    path = tmp_path / "m.safetensors"
    path.write_bytes(save_safetensors(tensors_of(model)))
    with pytest.raises(CheckpointError, match="not an lstm-serve checkpoint"):
        checkpoint.load(path)


def test_missing_tensor_is_refused(tmp_path, model):
    tensors = tensors_of(model)
    del tensors["rnn.weight_hh_l1"]
    with pytest.raises(CheckpointError, match="missing tensors.*rnn.weight_hh_l1"):
        checkpoint.load(write_raw(tmp_path / "m.safetensors", tensors))


def test_extra_tensor_is_refused(tmp_path, model):
    tensors = tensors_of(model) | {"rnn.weight_ih_l2": torch.zeros(48, 12)}
    with pytest.raises(CheckpointError, match="unexpected tensors.*rnn.weight_ih_l2"):
        checkpoint.load(write_raw(tmp_path / "m.safetensors", tensors))


def test_shape_disagreeing_with_config_is_refused(tmp_path, model):
    tensors = tensors_of(model)
    tensors["head.weight"] = torch.zeros(258, 13)
    with pytest.raises(
        CheckpointError, match=r"head.weight has shape \[258, 13\], the config needs \[258, 12\]"
    ):
        checkpoint.load(write_raw(tmp_path / "m.safetensors", tensors))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, model, bad):
    tensors = tensors_of(model)
    tensors["rnn.bias_hh_l0"][0] = bad
    with pytest.raises(CheckpointError, match="rnn.bias_hh_l0 has non-finite values"):
        checkpoint.load(write_raw(tmp_path / "m.safetensors", tensors))


def test_invalid_metadata_is_refused(tmp_path, model):
    path = write_raw(tmp_path / "m.safetensors", tensors_of(model), model={"cell": "gru", "hidden": 12})
    with pytest.raises(CheckpointError, match="invalid metadata"):
        checkpoint.load(path)


def test_unreadable_path_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        checkpoint.load(tmp_path / "absent.safetensors")
