"""`AsyncClient`: the asyncio client, one coroutine per RPC."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.async_session import AsyncSession
from client.errors import StatusError
from client.lstmserve.v1 import lstm_serve_pb2 as pb
from client.lstmserve.v1.lstm_serve_pb2_grpc import LstmServeServiceStub
from client.messages import (
    Classification,
    ModelInfo,
    Prompt,
    SessionInfo,
    generate_request,
    make_duration,
    make_input,
    new_session_id,
)
from client.options import DEFAULT_TARGET, ClientOptions, open_channel
from client.token_stream import AsyncTokenStream

R = TypeVar("R")


class AsyncClient:
    """An asyncio connection to an lstm-serve server. Use with `async with`, or `await close()`.

    Create it inside the event loop that uses it. Every failed call raises `StatusError`.
    """

    def __init__(self, target: str = DEFAULT_TARGET, options: ClientOptions | None = None) -> None:
        self.target = target
        self.options = options or ClientOptions()
        self.channel: grpc.aio.Channel = open_channel(target, self.options, grpc.aio)
        self.stub = LstmServeServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def _call(self, method: Callable[..., Awaitable[R]], request: Any, session_id: str = "") -> R:
        try:
            return await method(
                request, metadata=self.options.metadata(session_id), timeout=self.options.timeout
            )
        except grpc.RpcError as e:
            raise StatusError.from_rpc(e) from e

    async def list_models(self) -> list[ModelInfo]:
        """The models served, one entry per loaded version."""
        return list((await self._call(self.stub.ListModels, pb.ListModelsRequest())).models)

    async def create_session(
        self,
        model: str,
        *,
        model_version: str = "",
        seed: int | None = None,
        ttl: float | None = None,
        keep: bool = False,
        session_id: str | None = None,
    ) -> AsyncSession:
        """A new session (position 1). `ttl` in seconds; `keep`: `AsyncSession.close()` leaves it.
        Its id is chosen here (or given as `session_id`), so a router sends its creation where
        its later calls go."""
        chosen = session_id or new_session_id()
        request = pb.CreateSessionRequest(
            model=model, model_version=model_version, seed=seed, ttl=make_duration(ttl), session_id=chosen
        )
        return AsyncSession(
            self, (await self._call(self.stub.CreateSession, request, chosen)).session, keep=keep
        )

    def session(self, session_id: str, *, keep: bool = True) -> AsyncSession:
        """A handle on an existing session (no call is made until it is used)."""
        return AsyncSession(self, session_id, keep=keep)

    async def get_session(self, session_id: str) -> SessionInfo:
        return (
            await self._call(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id), session_id)
        ).session

    async def session_tokens(self, session_id: str, after: int) -> list[int]:
        """The tokens the session absorbed after position `after` (the server keeps its last
        8192; OUT_OF_RANGE beyond)."""
        request = pb.GetSessionRequest(session_id=session_id, tokens_after=after)
        return list((await self._call(self.stub.GetSession, request, session_id)).tokens)

    async def list_sessions(self) -> list[SessionInfo]:
        """The caller's sessions."""
        return list((await self._call(self.stub.ListSessions, pb.ListSessionsRequest())).sessions)

    async def delete_session(self, session_id: str) -> None:
        await self._call(self.stub.DeleteSession, pb.DeleteSessionRequest(session_id=session_id), session_id)

    async def reset_session(self, session_id: str) -> SessionInfo:
        """Back to the state of a new session (position 1), same seed."""
        return (
            await self._call(
                self.stub.ResetSession, pb.ResetSessionRequest(session_id=session_id), session_id
            )
        ).session

    async def fork_session(
        self, session_id: str, *, seed: int | None = None, ttl: float | None = None, keep: bool = False
    ) -> AsyncSession:
        """A new session with a copy of the state (and the seed, unless given)."""
        request = pb.ForkSessionRequest(
            session_id=session_id, seed=seed, ttl=make_duration(ttl), new_session_id=new_session_id()
        )
        return AsyncSession(
            self, (await self._call(self.stub.ForkSession, request, session_id)).session, keep=keep
        )

    async def export_session(self, session_id: str) -> bytes:
        """The session as a self-checking blob."""
        return (
            await self._call(
                self.stub.ExportSession, pb.ExportSessionRequest(session_id=session_id), session_id
            )
        ).blob

    async def import_session(
        self, blob: bytes, *, ttl: float | None = None, keep: bool = False
    ) -> AsyncSession:
        """A new session from an exported blob."""
        request = pb.ImportSessionRequest(blob=blob, ttl=make_duration(ttl), session_id=new_session_id())
        return AsyncSession(
            self, (await self._call(self.stub.ImportSession, request, request.session_id)).session, keep=keep
        )

    async def classify(self, text: Prompt, *, model: str, model_version: str = "") -> Classification:
        """Each of `model`'s classification heads on `text` (a temporary session absorbs it and
        ends); FAILED_PRECONDITION for a model without heads."""
        request = pb.ClassifyRequest(model=model, model_version=model_version, input=make_input(text))
        return (await self._call(self.stub.Classify, request)).classification

    def generate(
        self,
        prompt: Prompt = "",
        *,
        model: str = "",
        model_version: str = "",
        session_id: str = "",
        max_tokens: int = 0,
        temperature: float | None = None,
        top_k: int = 0,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        takeover: bool = False,
        ignore_eos: bool = False,
        stream_interval: int = 1,
    ) -> AsyncTokenStream:
        """Feed `prompt`, then generate; `async for` over the result gets tokens as they arrive.

        Without `session_id`, a temporary session on `model` is used (and deleted after).
        `ignore_eos`: generate past <eos> (absorbed like any token) up to `max_tokens` or a stop.
        `stream_interval`: tokens per message from the server (fewer messages; a token arrives with
        its message, once the message's last one is generated); they are yielded one by one all the same.
        """
        request = generate_request(
            prompt,
            model=model,
            model_version=model_version,
            session_id=session_id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=stop,
            seed=seed,
            takeover=takeover,
            ignore_eos=ignore_eos,
            stream_interval=stream_interval,
        )
        call = self.stub.Generate(
            request, metadata=self.options.metadata(session_id), timeout=self.options.stream_timeout
        )

        async def cancel() -> None:
            call.cancel()

        return AsyncTokenStream(aiter(call), cancel, session_id)

    def stream(self, session_id: str = "") -> grpc.aio.StreamStreamCall:
        """The raw Stream call on `session_id` (bidirectional, written with `write()`), as
        `AsyncSession` drives it."""
        return self.stub.Stream(
            metadata=self.options.metadata(session_id), timeout=self.options.stream_timeout
        )

    async def health(self, service: str = "") -> str:
        """The serving status of `service` ("" is the whole server): "SERVING", "NOT_SERVING", ..."""
        response = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
