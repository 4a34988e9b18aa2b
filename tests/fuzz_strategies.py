"""Hypothesis strategies for tests/test_fuzz.py: request fields, whole requests, Stream scripts,
request bytes and ImportSession blobs.

Field values are mostly valid (so that examples get past validation and reach the engine) and
otherwise wild: any unicode, bytes decoded as text, extreme ints, NaN/inf floats, token ids out
of range, negative or huge durations. Session ids are mostly `Ref`s to sessions the example
created, resolved when it runs; blobs are recipes built from real exports when it runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field, replace

import numpy as np
from google.protobuf.duration_pb2 import Duration
from hypothesis import strategies as st

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server.sessions import blob
from server.sessions.blob import SessionBlob
from tests.conftest import TINY_MODELS


@dataclass(frozen=True)
class Ref:
    """The id of a session the example created (index modulo their number), resolved at run time."""

    index: int


# ---- strategies: field values (mostly valid, so that examples get past validation) ---------------


def mostly(valid: st.SearchStrategy, wild: st.SearchStrategy, odds: int = 4) -> st.SearchStrategy:
    """`wild` one time in `odds`, else `valid` (shrinking goes towards `valid`)."""
    return st.integers(0, odds - 1).flatmap(lambda i: wild if i == odds - 1 else valid)


LONG_TEXTS = ["x" * 9000, "é" * 5000, "\x00" * 300]  # above the prompt limit (in bytes) or the stop length
texts = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", errors="replace")),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", "tiny", "tiny-rnn", "\x00", *LONG_TEXTS]),
)
uint32s = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
uint64s = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]))
wild_floats = st.one_of(
    st.floats(width=32), st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 3e38, 1e-45])
)
durations = mostly(
    st.builds(Duration, seconds=st.integers(0, 5), nanos=st.integers(1, 999_999_999)),
    st.builds(
        Duration,
        seconds=st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 7 * 24 * 3600, 2**63 - 1])),
        nanos=st.integers(-(2**31), 2**31 - 1),
    ),
)
refs = st.builds(Ref, st.integers(0, 3))
session_ids = mostly(refs, st.one_of(st.text("0123456789abcdef", min_size=32, max_size=32), texts))
models = mostly(st.sampled_from(list(TINY_MODELS)), texts)
versions = mostly(st.just(""), st.one_of(st.text("0123456789abcdef", max_size=12), texts))
token_ids = mostly(st.lists(st.integers(0, 257), min_size=1, max_size=80), st.lists(uint32s, max_size=80))
inputs = mostly(
    st.one_of(
        st.builds(lambda text: pb.Input(text=text), st.text(min_size=1, max_size=40)),
        st.builds(lambda ids: pb.Input(tokens=pb.TokenIds(ids=ids)), token_ids),
    ),
    st.one_of(st.builds(lambda text: pb.Input(text=text), texts), st.just(pb.Input())),
)
sampling = st.builds(
    lambda t, k, p: pb.SamplingOptions(temperature=t, top_k=k, top_p=p),
    mostly(st.none() | st.floats(0, 2, width=32), wild_floats, odds=8),
    mostly(st.integers(0, 300), uint32s),
    mostly(st.none() | st.floats(0, 1, exclude_min=True, width=32), wild_floats, odds=8),
)
max_tokens = mostly(
    st.integers(0, 6), st.sampled_from([4096, 4097, 2**32 - 1])
)  # 0: the server's limit (4096)
stops = mostly(st.lists(st.text(min_size=1, max_size=4), max_size=3), st.lists(texts, max_size=18))
request_ids = st.one_of(st.sampled_from(["", "a", "b"]), st.text(max_size=8))

# ---- strategies: requests (fields with Refs; built into messages when the example runs) -----------

unary_calls = st.one_of(
    st.just(("ListModels", {})),
    st.just(("ListSessions", {})),
    st.fixed_dictionaries(
        {
            "model": models,
            "model_version": versions,
            "seed": st.none() | uint64s,
            "ttl": st.none() | durations,
        }
    ).map(lambda f: ("CreateSession", f)),
    st.fixed_dictionaries(
        {"session_id": session_ids, "tokens_after": st.none() | st.integers(0, 8) | uint64s}
    ).map(lambda f: ("GetSession", f)),
    *[
        st.fixed_dictionaries({"session_id": session_ids}).map(lambda f, m=m: (m, f))
        for m in ("DeleteSession", "ResetSession", "ExportSession")
    ],
    st.fixed_dictionaries(
        {"session_id": session_ids, "seed": st.none() | uint64s, "ttl": st.none() | durations}
    ).map(lambda f: ("ForkSession", f)),
)
generate_calls = st.fixed_dictionaries(
    {
        "session_id": mostly(refs, st.one_of(st.just(""), session_ids)),
        "model": models,
        "model_version": versions,
        "prompt": inputs,
        "sampling": sampling,
        "max_tokens": max_tokens,
        "stop": stops,
        "seed": mostly(st.none(), uint64s),
        "takeover": st.booleans(),
    }
)
stream_fields = {
    "open": st.fixed_dictionaries({"session_id": session_ids, "takeover": st.booleans()}),
    "feed": st.fixed_dictionaries(
        {
            "input": inputs,
            "return_logprobs": st.booleans(),
            "top_logprobs": mostly(st.integers(0, 20), uint32s),
        }
    ),
    "generate": st.fixed_dictionaries({"max_tokens": max_tokens, "sampling": sampling, "stop": stops}),
    "none": st.just({}),
}


@st.composite
def stream_scripts(draw) -> list[tuple[str, str, dict]]:
    """(request id, kind, fields) messages: mostly an `open` first, fresh ids and cancels of
    earlier requests; sometimes no open, several opens, reused or empty ids, unknown targets."""
    first = draw(
        mostly(
            st.tuples(refs, st.booleans()).map(
                lambda r: ("open", "open", {"session_id": r[0], "takeover": r[1]})
            ),
            st.sampled_from(list(stream_fields)).flatmap(
                lambda k: stream_fields[k].map(lambda f: ("x", k, f))
            ),
        )
    )
    script = [first]
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(
            mostly(
                st.sampled_from(["feed", "generate", "cancel"]), st.sampled_from(["open", "none"]), odds=10
            )
        )
        if kind == "cancel":
            fields = {
                "target_request_id": draw(mostly(st.sampled_from([rid for rid, _, _ in script]), request_ids))
            }
        else:
            fields = draw(stream_fields[kind])
        script.append((draw(mostly(st.just(f"r{len(script)}"), request_ids, odds=10)), kind, fields))
    return script


BAD_UTF8 = [
    b"\x0a\x02\xff\xfe",
    b"\x12\x01\x80",
    b"\x0a\x03\xed\xa0\x80",
]  # a string field 1 or 2 that is not UTF-8
raw_payloads = st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(BAD_UTF8)), min_size=1, max_size=4)

# ---- strategies: ImportSession blobs ----------------------------------------------------------


def seal(header: bytes, rest: bytes = b"") -> bytes:
    """A blob with the right magic, header length and checksum around any header and sections."""
    body = blob.MAGIC + struct.pack("<I", len(header)) + header + rest
    return body + hashlib.sha256(body).digest()


@dataclass(frozen=True)
class Forged:
    """A real export of `model` with some fields replaced, sealed with a valid checksum."""

    model: str
    position: int | None = None
    seed: int | None = None
    state: bytes | str | None = None  # bytes, or the model whose real state goes in
    logits: tuple[float, ...] | None = None
    extra: dict = field(default_factory=dict)

    def build(self, exports: dict[str, SessionBlob]) -> bytes:
        real = exports[self.model]
        state = exports[self.state].state if isinstance(self.state, str) else self.state
        logits = None if self.logits is None else np.array(self.logits, dtype=np.float32)
        changes = {
            "position": self.position,
            "seed": self.seed,
            "state": state,
            "logits": logits,
            "extra": self.extra,
        }
        return blob.pack(replace(real, **{k: v for k, v in changes.items() if v is not None}))


@dataclass(frozen=True)
class Mangled:
    """A real export of `model`, one byte flipped and/or cut short."""

    model: str
    index: int
    xor: int
    cut: int

    def build(self, exports: dict[str, SessionBlob]) -> bytes:
        data = bytearray(blob.pack(exports[self.model]))
        data[self.index % len(data)] ^= self.xor
        return bytes(data[: len(data) - self.cut])


@dataclass(frozen=True)
class Raw:
    data: bytes

    def build(self, exports: dict[str, SessionBlob]) -> bytes:
        return self.data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
header_fields = st.fixed_dictionaries(
    {
        k: st.one_of(st.integers(-5, 2**70), json_values)
        for k in ("state_bytes", "logits_bytes", "position", "seed")
    }
    | {
        "model": json_values,
        "fingerprint": json_values,
        "format_version": st.one_of(st.just(1), json_values),
        "extra": json_values,
    }
)
headers = st.one_of(
    header_fields.map(lambda h: json.dumps(h).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"state_bytes": 1e999}', b'{"state_bytes": NaN}']),
)
blob_models = st.sampled_from(list(TINY_MODELS))
garbage_blobs = st.one_of(
    st.builds(Raw, st.binary(max_size=200)),
    st.builds(Raw, st.binary(max_size=200).map(lambda b: blob.MAGIC + b)),
    st.builds(lambda h, rest: Raw(seal(h, rest)), headers, st.binary(max_size=64)),
    st.builds(Mangled, blob_models, st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 40)),
)
blob_recipes = mostly(
    st.builds(
        Forged,
        blob_models,
        position=mostly(
            st.none() | st.integers(0, 10**6),
            st.integers(-(2**65), 2**65) | st.sampled_from([2**62, 2**63 - 1, 2**64 - 1]),
        ),
        seed=mostly(st.none() | uint64s, st.integers(-(2**65), 2**65) | st.sampled_from([-1, 2**64])),
        state=mostly(st.none(), st.binary(max_size=64) | blob_models),
        logits=mostly(
            st.none(),
            st.lists(wild_floats, max_size=4).map(tuple)
            | st.sampled_from([(math.nan,) * 258, (-math.inf,) * 258]),
        ),
        extra=st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    ),
    garbage_blobs,
    odds=2,
)
import_calls = st.tuples(blob_recipes, st.none() | durations)
