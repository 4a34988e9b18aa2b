"""Checkpoints: one .safetensors file per model version, metadata JSON inside, no pickle.

The file's `__metadata__` holds one key, `lstm_serve`, whose JSON is `CheckpointMeta`:
format version, model config, tokenizer spec, training summary and the fingerprint
(sha256 over the tensors' names, dtypes, shapes and bytes, then any classification heads'
names and labels) that names the exact weights. Loading checks every part and refuses with
`CheckpointError` naming the problem.

A checkpoint with classification heads (server/classifier.py) lists them in its model
config; servers from before heads refuse such files (their config forbids unknown keys),
while a language model alone is written exactly as before and keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server import tokenizer
from server.classifier import HeadSpec
from server.model import ModelConfig, RecurrentLM

FORMAT_VERSION = 1
METADATA_KEY = "lstm_serve"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why."""


class TokenizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = "utf8-bytes"
    vocab_size: int = tokenizer.VOCAB_SIZE
    bos: int = tokenizer.BOS
    eos: int = tokenizer.EOS


class TrainingSummary(BaseModel):
    """What produced the weights; written by the training job."""

    model_config = ConfigDict(extra="forbid")

    corpus: list[str]
    corpus_digest: str
    corpus_bytes: int = Field(ge=0)
    steps: int = Field(ge=0)
    horizon_steps: int = Field(ge=0)
    tokens_seen: int = Field(ge=0)
    train_bits_per_byte: float
    heldout_bits_per_byte: float
    wall_seconds: float = Field(ge=0)
    seed: int


class CheckpointMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int
    model: ModelConfig
    tokenizer: TokenizerSpec = TokenizerSpec()
    training: TrainingSummary | None = None
    fingerprint: str


@dataclass(frozen=True)
class Checkpoint:
    model: RecurrentLM
    meta: CheckpointMeta
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint


def fingerprint(tensors: dict[str, torch.Tensor], heads: tuple[HeadSpec, ...] = ()) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order, then the
    classification heads' names and labels (a language model alone: its tensors only, as ever)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for head in heads:
        digest.update(f"head|{head.model_dump_json()}|".encode())
    return digest.hexdigest()


def to_bytes(model: RecurrentLM, training: TrainingSummary | None = None) -> bytes:
    """The checkpoint file's contents for `model`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = CheckpointMeta(
        format_version=FORMAT_VERSION,
        model=model.config,
        training=training,
        fingerprint=fingerprint(tensors, model.config.heads),
    )
    # without heads, the metadata is what servers before heads read (their ModelConfig forbids the key)
    no_heads = {"model": {"heads"}} if not model.config.heads else None
    return save_safetensors(tensors, metadata={METADATA_KEY: meta.model_dump_json(exclude=no_heads)})


def save(path: str | Path, model: RecurrentLM, training: TrainingSummary | None = None) -> str:
    """Write the checkpoint atomically (temporary file, fsync, rename); returns its fingerprint."""
    data = to_bytes(model, training)
    atomic_write(Path(path), data)
    return read_meta(data, str(path)).fingerprint


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is as readable as any new file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Load and validate a checkpoint file; raises CheckpointError naming the problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from e
    checkpoint = from_bytes(data, str(path), device)
    return Checkpoint(checkpoint.model, checkpoint.meta, path)


def from_bytes(data: bytes, source: str = "<bytes>", device: torch.device | str = "cpu") -> Checkpoint:
    """Validate and load a checkpoint from its file contents."""
    meta = read_meta(data, source)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{source}: truncated or corrupt safetensors data: {e}") from e
    model = RecurrentLM(meta.model)
    check_tensors(tensors, model, source)
    if fingerprint(tensors, meta.model.heads) != meta.fingerprint:
        raise CheckpointError(
            f"{source}: the tensors do not match the recorded fingerprint: the file is corrupt"
        )
    model.load_state_dict(tensors)
    return Checkpoint(model.to(device).eval(), meta)


def read_meta(data: bytes, source: str) -> CheckpointMeta:
    """Parse and validate the metadata in the safetensors header."""
    header = read_header(data, source)
    raw = header.get("__metadata__", {}).get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(f"{source}: no '{METADATA_KEY}' metadata: not an lstm-serve checkpoint")
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: metadata is not valid JSON: {e}") from e
    version = fields.get("format_version") if isinstance(fields, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: unknown checkpoint format version {version!r}; this server reads version {FORMAT_VERSION}"
        )
    try:
        return CheckpointMeta.model_validate(fields)
    except ValidationError as e:
        raise CheckpointError(f"{source}: invalid metadata: {e}") from e


def read_header(data: bytes, source: str) -> dict:
    """The safetensors JSON header (8-byte little-endian length, then JSON), checked against the size."""
    if len(data) < 8:
        raise CheckpointError(f"{source}: truncated file ({len(data)} bytes): not a safetensors checkpoint")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise CheckpointError(
            f"{source}: truncated file: header claims {size} bytes, {len(data) - 8} present"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: corrupt safetensors header: not a JSON object")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + size + end > len(data):
        raise CheckpointError(
            f"{source}: truncated file: tensor data needs {8 + size + end} bytes, {len(data)} present"
        )
    return header


def check_tensors(tensors: dict[str, torch.Tensor], model: RecurrentLM, source: str) -> None:
    """Refuse missing, extra, misshapen or non-finite tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    if missing:
        raise CheckpointError(f"{source}: missing tensors for this model config: {', '.join(missing)}")
    if extra:
        raise CheckpointError(f"{source}: unexpected tensors not in this model config: {', '.join(extra)}")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {list(got)}, the config needs {list(shape)}"
            )
        if not tensors[name].is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {name} has dtype {tensors[name].dtype}, expected a float type"
            )
        if not torch.isfinite(tensors[name]).all():
            raise CheckpointError(f"{source}: tensor {name} has non-finite values (NaN or inf)")
