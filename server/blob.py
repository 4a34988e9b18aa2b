"""Exported sessions: a self-checking blob that another server (same model version) imports.

    b"LSSB" | u32 header length | header JSON | state bytes | logits (fp32 LE) | sha256 of all before

The header names the model and its fingerprint and holds the position, the seed and the
section lengths. Any change to the bytes fails the checksum.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import numpy as np
import torch

from server.errors import InvalidArgument

MAGIC = b"LSSB"
FORMAT_VERSION = 1
_LENGTH = struct.Struct("<I")
_DIGEST = 32


@dataclass(frozen=True)
class SessionBlob:
    model: str
    fingerprint: str
    position: int
    seed: int
    state: bytes  # the state pool's export bytes
    logits: torch.Tensor  # [V] fp32, CPU


def pack(blob: SessionBlob) -> bytes:
    logits = blob.logits.detach().float().cpu().numpy().astype("<f4").tobytes()
    header = json.dumps({
        "format_version": FORMAT_VERSION, "model": blob.model, "fingerprint": blob.fingerprint,
        "position": blob.position, "seed": blob.seed, "state_bytes": len(blob.state), "logits_bytes": len(logits),
    }).encode()
    body = MAGIC + _LENGTH.pack(len(header)) + header + blob.state + logits
    return body + hashlib.sha256(body).digest()


def unpack(data: bytes) -> SessionBlob:
    """Parse and verify a blob; INVALID_ARGUMENT naming the problem."""
    if len(data) < len(MAGIC) + _LENGTH.size + _DIGEST or not data.startswith(MAGIC):
        raise InvalidArgument("blob is not an exported lstm-serve session (bad magic bytes or too short)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise InvalidArgument("blob checksum mismatch: the blob is corrupt or truncated")
    (size,) = _LENGTH.unpack_from(body, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    try:
        header = json.loads(body[start : start + size])
        state_len, logits_len = int(header["state_bytes"]), int(header["logits_bytes"])
        fields = (str(header["model"]), str(header["fingerprint"]), int(header["position"]), int(header["seed"]))
        version = header["format_version"]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"blob header is invalid: {e}") from e
    if version != FORMAT_VERSION:
        raise InvalidArgument(f"blob format version {version} is not supported (this server reads {FORMAT_VERSION})")
    state_at = start + size
    if state_at + state_len + logits_len != len(body) or logits_len % 4:
        raise InvalidArgument("blob sections do not add up to its length")
    state = body[state_at : state_at + state_len]
    logits = torch.from_numpy(np.frombuffer(body, dtype="<f4", count=logits_len // 4, offset=state_at + state_len).astype(np.float32))
    return SessionBlob(*fields, state=state, logits=logits)
