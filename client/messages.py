"""Request builders and the API's message types under the names the client uses."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from google.protobuf.duration_pb2 import Duration

from client.lstmserve.v1 import lstm_serve_pb2 as pb

ModelInfo = pb.ModelInfo
SessionInfo = pb.Session
Token = pb.Token
Finished = pb.Finished
FinishReason = pb.FinishReason
Classification = pb.Classification


def label_probabilities(classification: Classification) -> dict[str, dict[str, float]]:
    """{head: {label: probability}} of a classification, in each head's label order."""
    return {h.name: {p.label: p.probability for p in h.labels} for h in classification.heads}


Prompt = str | Sequence[int]
"""Text (sent as UTF-8 bytes, one token each) or token ids."""


def new_session_id() -> str:
    """A session id chosen by the client: 128 random bits, as the server draws them."""
    return secrets.token_hex(16)


def make_input(prompt: Prompt) -> pb.Input:
    if isinstance(prompt, str):
        return pb.Input(text=prompt)
    return pb.Input(tokens=pb.TokenIds(ids=list(prompt)))


def input_tokens(message: pb.Input) -> list[int]:
    """The token ids an Input stands for (text: its UTF-8 bytes, as the server encodes it)."""
    if message.WhichOneof("kind") == "text":
        return list(message.text.encode("utf-8"))
    return list(message.tokens.ids)


def make_sampling(temperature: float | None, top_k: int, top_p: float | None) -> pb.SamplingOptions:
    """Sampling options; None leaves the server's default (temperature 1, top-p 1)."""
    return pb.SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p)


def make_duration(seconds: float | None) -> Duration | None:
    if seconds is None:
        return None
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def finish_reason_name(reason: int) -> str:
    """`FINISH_REASON_STOP_SEQUENCE` -> "stop_sequence"."""
    return pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def generate_request(
    prompt: Prompt,
    *,
    model: str,
    model_version: str,
    session_id: str,
    max_tokens: int,
    temperature: float | None,
    top_k: int,
    top_p: float | None,
    stop: Sequence[str],
    seed: int | None,
    takeover: bool,
    ignore_eos: bool,
    stream_interval: int,
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        session_id=session_id,
        model=model,
        model_version=model_version,
        prompt=make_input(prompt) if prompt else None,
        sampling=make_sampling(temperature, top_k, top_p),
        max_tokens=max_tokens,
        stop=list(stop),
        seed=seed,
        takeover=takeover,
        ignore_eos=ignore_eos,
        stream_interval=stream_interval,
    )
