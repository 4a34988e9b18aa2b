"""The lstm-serve client: grpcio and protobuf only (never torch).

    with Client("localhost:50051") as client, client.create_session("default") as session:
        for token in session.generate("def main(", max_tokens=50):
            print(token.text, end="", flush=True)

Names are imported on first use, so `import client` alone loads nothing (not even grpc).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncClient": "client.async_client",
    "AsyncSession": "client.async_session",
    "AsyncTokenStream": "client.token_stream",
    "Classification": "client.messages",
    "Client": "client.sync_client",
    "ClientOptions": "client.options",
    "DEFAULT_TARGET": "client.options",
    "Finished": "client.messages",
    "FinishReason": "client.messages",
    "LstmServeError": "client.errors",
    "ModelInfo": "client.messages",
    "ResumeResult": "client.history",
    "Session": "client.session",
    "SessionClosedError": "client.errors",
    "SessionDataLostError": "client.errors",
    "SessionInfo": "client.messages",
    "StatusError": "client.errors",
    "Token": "client.messages",
    "TokenStream": "client.token_stream",
    "label_probabilities": "client.messages",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the names, for type checkers (re-exported)
    from client.async_client import AsyncClient as AsyncClient
    from client.async_session import AsyncSession as AsyncSession
    from client.errors import LstmServeError as LstmServeError
    from client.errors import SessionClosedError as SessionClosedError
    from client.errors import SessionDataLostError as SessionDataLostError
    from client.errors import StatusError as StatusError
    from client.history import ResumeResult as ResumeResult
    from client.messages import Classification as Classification
    from client.messages import Finished as Finished
    from client.messages import FinishReason as FinishReason
    from client.messages import ModelInfo as ModelInfo
    from client.messages import SessionInfo as SessionInfo
    from client.messages import Token as Token
    from client.messages import label_probabilities as label_probabilities
    from client.options import DEFAULT_TARGET as DEFAULT_TARGET
    from client.options import ClientOptions as ClientOptions
    from client.session import Session as Session
    from client.sync_client import Client as Client
    from client.token_stream import AsyncTokenStream as AsyncTokenStream
    from client.token_stream import TokenStream as TokenStream


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
