"""Plain dicts (for `--json`) and text tables (for people) of the API's messages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from client.messages import Finished, ModelInfo, SessionInfo, Token, finish_reason_name


def _time(ts: Timestamp) -> str | None:
    return ts.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds") if ts.seconds or ts.nanos else None


def session_dict(s: SessionInfo) -> dict[str, Any]:
    return {
        "id": s.id,
        "model": s.model,
        "model_version": s.model_version,
        "seed": s.seed,
        "position": s.position,
        "created_at": _time(s.created_at),
        "expires_at": _time(s.expires_at),
        "ttl_s": s.ttl.ToNanoseconds() / 1e9,
        "location": pb.SessionLocation.Name(s.location).removeprefix("SESSION_LOCATION_").lower(),
        "attached": s.attached,
    }


def model_dict(m: ModelInfo) -> dict[str, Any]:
    return {
        "name": m.name,
        "version": m.version,
        "cell": pb.Cell.Name(m.cell).removeprefix("CELL_").lower(),
        "layers": m.layers,
        "hidden": m.hidden,
        "vocab_size": m.vocab_size,
        "backend": m.backend,
        "device": m.device,
        "dtype": m.dtype,
        "heldout_bits_per_byte": m.heldout_bits_per_byte,
        "bos_token": m.bos_token,
        "eos_token": m.eos_token,
        "heads": {h.name: list(h.labels) for h in m.heads},
    }


def token_dict(t: Token) -> dict[str, Any]:
    d: dict[str, Any] = {"id": t.id, "text": t.text, "logprob": t.logprob, "position": t.position}
    if t.top_logprobs:
        d["top_logprobs"] = [{"token_id": p.token_id, "logprob": p.logprob} for p in t.top_logprobs]
    return d


def finished_dict(f: Finished) -> dict[str, Any]:
    return {
        "reason": finish_reason_name(f.reason),
        "fed_tokens": f.fed_tokens,
        "generated_tokens": f.generated_tokens,
        "position": f.position,
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def sessions_table(sessions: Sequence[SessionInfo]) -> str:
    headers = ("ID", "MODEL", "POSITION", "LOCATION", "ATTACHED", "EXPIRES")
    rows = [
        (
            d["id"],
            d["model"],
            d["position"],
            d["location"],
            "yes" if d["attached"] else "no",
            d["expires_at"] or "-",
        )
        for d in map(session_dict, sessions)
    ]
    return table(headers, rows)


def models_table(models: Sequence[ModelInfo]) -> str:
    headers = (
        "NAME",
        "VERSION",
        "CELL",
        "LAYERS",
        "HIDDEN",
        "VOCAB",
        "BACKEND",
        "DEVICE",
        "BITS/BYTE",
        "HEADS",
    )
    rows = [
        (
            d["name"],
            d["version"][:12],
            d["cell"],
            d["layers"],
            d["hidden"],
            d["vocab_size"],
            d["backend"],
            d["device"],
            f"{d['heldout_bits_per_byte']:.3f}" if d["heldout_bits_per_byte"] else "-",
            ",".join(f"{name}({len(labels)})" for name, labels in d["heads"].items()) or "-",
        )
        for d in map(model_dict, models)
    ]
    return table(headers, rows)


def key_values(d: dict[str, Any]) -> str:
    """One `key: value` line per field."""
    width = max(map(len, d))
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in d.items())
