"""Exported sessions: a self-checking blob that another server (same model version) imports.

    b"LSSB" | u32 header length | header JSON | state bytes | logits (fp32 LE) | sha256 of all before

The header names the model and its fingerprint and holds the position, the seed and the
section lengths. Any change to the bytes fails the checksum.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import numpy as np

from server.errors import InvalidArgument

MAGIC = b"LSSB"
FORMAT_VERSION = 1
_LENGTH = struct.Struct("<I")
_DIGEST = 32
MAX_POSITION = 2**62  # far beyond any real session; keeps position arithmetic (sampling noise) within int64


@dataclass(frozen=True)
class SessionBlob:
    model: str
    fingerprint: str
    position: int
    seed: int
    state: bytes  # the state pool's export bytes
    logits: np.ndarray  # [V] fp32
    extra: dict = field(default_factory=dict)  # more header fields (a snapshot's owner, TTL, ...)


def pack(blob: SessionBlob) -> bytes:
    logits = blob.logits.astype("<f4").tobytes()
    header = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "model": blob.model,
            "fingerprint": blob.fingerprint,
            "position": blob.position,
            "seed": blob.seed,
            "state_bytes": len(blob.state),
            "logits_bytes": len(logits),
            "extra": blob.extra,
        }
    ).encode()
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
        fields = (
            str(header["model"]),
            str(header["fingerprint"]),
            int(header["position"]),
            int(header["seed"]),
        )
        version, extra = header["format_version"], dict(header.get("extra", {}))
    except (
        ValueError,
        KeyError,
        TypeError,
        OverflowError,
        RecursionError,
    ) as e:  # e.g. 1e999, or arrays nested too deep
        raise InvalidArgument(f"blob header is invalid: {e}") from e
    if version != FORMAT_VERSION:
        raise InvalidArgument(
            f"blob format version {version} is not supported (this server reads {FORMAT_VERSION})"
        )
    if not (0 <= fields[2] <= MAX_POSITION and 0 <= fields[3] < 2**64):
        raise InvalidArgument(
            f"blob position {fields[2]} or seed {fields[3]} is out of range (position 0 to 2^62, seed a uint64)"
        )
    state_at = start + size
    if state_len < 0 or logits_len < 0 or state_at + state_len + logits_len != len(body) or logits_len % 4:
        raise InvalidArgument("blob sections do not add up to its length")
    state = body[state_at : state_at + state_len]
    logits = np.frombuffer(body, dtype="<f4", count=logits_len // 4, offset=state_at + state_len).astype(
        np.float32
    )
    return SessionBlob(*fields, state=state, logits=logits, extra=extra)
