"""The gRPC servicer: each RPC translates its request, delegates to the engine, and the
decorators authenticate, map errors to status codes and record metrics."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from client.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from server.api import translate
from server.api.auth import Authenticator
from server.api.engine_client import EngineClient
from server.api.streams import Opened, run_classify, run_generate, run_stream
from server.config import ServeSettings
from server.errors import ServeError
from server.ipc import messages as m
from server.metrics import Metrics
from server.sessions.jobs import ClassificationEvent, Event, TokenBatchEvent, TokenEvent
from server.sessions.principal import Principal

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["LstmServeService"]
METHODS = [m.name for m in SERVICE.methods]
# their requests are small but for the prompt: refused unparsed when too large
PROMPT_METHODS = ("Generate", "Stream")
# characters of a status message; grpc drops longer headers (the client would see RESOURCE_EXHAUSTED)
MAX_DETAILS = 500
# trailing metadata on every status this server sends: a client can tell it from one a proxy
# made up when a replica vanished (HAProxy answers INTERNAL or CANCELLED then), and retry only those
STATUS_MARK = (("lstm-serve-status", "1"),)
# the request field naming the session a call is about, to match the route metadata
ROUTED = {
    "CreateSession": "session_id",  # the id chosen for it
    "GetSession": "session_id",
    "DeleteSession": "session_id",
    "ResetSession": "session_id",
    "ForkSession": "session_id",  # routed by the source: the fork is made where it is
    "ExportSession": "session_id",
    "ImportSession": "session_id",
    "Generate": "session_id",
}


def principal_of(engine: EngineClient, auth: Authenticator, context: grpc.aio.ServicerContext) -> Principal:
    """The authenticated caller; UNAVAILABLE while the server is not ready."""
    engine.check_ready()
    metadata = dict(context.invocation_metadata() or ())
    return auth.authenticate(metadata.get("authorization"))


def route_of(context: grpc.aio.ServicerContext) -> str | None:
    """The `x-session-id` metadata a router hashed, if the caller sent it."""
    return dict(context.invocation_metadata() or ()).get(translate.ROUTE_KEY)


async def abort(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    """End the RPC with the error's status (raises grpc.aio.AbortError); unexpected ones are logged."""
    if isinstance(error, ServeError):
        message = str(error)  # it may quote the request: keep it short
        await context.abort(
            getattr(grpc.StatusCode, error.code),
            message if len(message) <= MAX_DETAILS else message[:MAX_DETAILS] + "…",
            trailing_metadata=STATUS_MARK,
        )
    log.error("unexpected error in %s", method, exc_info=error)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in {method}; the server log has details",
        trailing_metadata=STATUS_MARK,
    )


def unary(method: Callable) -> Callable:
    """A unary-response handler run inside the servicer's `_rpc` (caller, status, metrics)."""

    @functools.wraps(method)
    async def handler(self: LstmServeServicer, request, context):
        async with self._rpc(method.__name__, context, streaming=False) as principal:
            request = translate.parsed(request)
            if method.__name__ in ROUTED:
                translate.check_route(route_of(context), getattr(request, ROUTED[method.__name__]))
            return await method(self, request, principal)

    return handler


def streaming(method: Callable) -> Callable:
    """A streaming-response handler run inside the servicer's `_rpc` (Stream: parsed per message)."""

    @functools.wraps(method)
    async def handler(self: LstmServeServicer, request, context):
        async with self._rpc(method.__name__, context, streaming=True) as principal:
            request = translate.parsed(request)
            if method.__name__ in ROUTED:  # Generate; Stream checks its `open`
                translate.check_route(route_of(context), getattr(request, ROUTED[method.__name__]))
            async for response in method(self, request, principal, route_of(context)):
                yield response

    return handler


def add_to_server(servicer: LstmServeServicer, server: grpc.aio.Server) -> None:
    """Register the servicer as the generated `add_LstmServeServiceServicer_to_server` does, but
    with lenient request deserializers: a request that does not parse, or a prompt-carrying one
    larger than any valid request, gets INVALID_ARGUMENT."""
    handlers = {}
    for method in SERVICE.methods:
        kind = (
            ("stream" if method.client_streaming else "unary")
            + "_"
            + ("stream" if method.server_streaming else "unary")
        )
        max_prompt = servicer.settings.max_prompt_tokens if method.name in PROMPT_METHODS else None
        handlers[method.name] = getattr(grpc, f"{kind}_rpc_method_handler")(
            getattr(servicer, method.name),
            request_deserializer=translate.lenient(
                getattr(pb, method.input_type.name).FromString, max_prompt
            ),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


class LstmServeServicer(pb_grpc.LstmServeServiceServicer):
    """Translate each request, delegate it to the engine core process, map its errors."""

    def __init__(
        self, engine: EngineClient, auth: Authenticator, settings: ServeSettings, metrics: Metrics
    ) -> None:
        self.engine = engine
        self.auth = auth
        self.settings = settings
        self.metrics = metrics

    @contextlib.asynccontextmanager
    async def _rpc(
        self, method: str, context: grpc.aio.ServicerContext, streaming: bool
    ) -> AsyncIterator[Principal]:
        """Every handler runs in one: the authenticated caller in, the status out (errors mapped
        to their codes) and the request's metrics recorded."""
        started, code = time.perf_counter(), "OK"
        in_flight = self.metrics.streams_in_flight.labels(method) if streaming else None
        if in_flight is not None:
            in_flight.inc()
        try:
            yield principal_of(self.engine, self.auth, context)
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            code = e.code if isinstance(e, ServeError) else "INTERNAL"
            await abort(context, method, e)
        finally:
            if in_flight is not None:
                in_flight.dec()
            self.metrics.requests.labels(method, code).inc()
            self.metrics.rpc_duration.labels(method).observe(time.perf_counter() - started)

    def _observe(self, model: str, event: Opened | Event) -> None:
        """Time to first token and inter-token latency of generated tokens."""
        if isinstance(event, TokenEvent) and event.latency is not None:
            self.metrics.observe_token_latency(model, event.first, event.latency)
        elif isinstance(event, TokenBatchEvent):  # each token's time is when it was absorbed
            for token in event.tokens:
                self.metrics.observe_token_latency(model, token.first, token.latency)
        elif isinstance(event, ClassificationEvent):
            self.metrics.observe_classification(model, event.latency)

    @unary
    async def ListModels(self, request, principal):
        return pb.ListModelsResponse(models=[translate.model_info(model) for model in self.engine.models])

    @unary
    async def CreateSession(self, request, principal):
        seed, ttl = translate.optional_seed(request), translate.ttl_seconds(request)
        reply = await self.engine.call(
            lambda c: m.CreateSession(
                c, principal, request.model, request.model_version, seed, ttl, session_id=request.session_id
            )
        )
        return pb.CreateSessionResponse(session=translate.session_message(reply.session))

    @unary
    async def GetSession(self, request, principal):
        after = request.tokens_after if request.HasField("tokens_after") else None
        reply = await self.engine.call(lambda c: m.GetSession(c, principal, request.session_id, after))
        return pb.GetSessionResponse(session=translate.session_message(reply.session), tokens=reply.tokens)

    @unary
    async def ListSessions(self, request, principal):
        reply = await self.engine.call(lambda c: m.ListSessions(c, principal))
        return pb.ListSessionsResponse(sessions=[translate.session_message(s) for s in reply.sessions])

    @unary
    async def DeleteSession(self, request, principal):
        await self.engine.call(lambda c: m.DeleteSession(c, principal, request.session_id))
        return pb.DeleteSessionResponse()

    @unary
    async def ResetSession(self, request, principal):
        reply = await self.engine.call(lambda c: m.ResetSession(c, principal, request.session_id))
        return pb.ResetSessionResponse(session=translate.session_message(reply.session))

    @unary
    async def ForkSession(self, request, principal):
        seed, ttl = translate.optional_seed(request), translate.ttl_seconds(request)
        reply = await self.engine.call(
            lambda c: m.ForkSession(c, principal, request.session_id, seed, ttl, request.new_session_id)
        )
        return pb.ForkSessionResponse(session=translate.session_message(reply.session))

    @unary
    async def ExportSession(self, request, principal):
        reply = await self.engine.call(lambda c: m.ExportSession(c, principal, request.session_id))
        return pb.ExportSessionResponse(blob=reply.blob, session=translate.session_message(reply.session))

    @unary
    async def ImportSession(self, request, principal):
        ttl = translate.ttl_seconds(request)
        reply = await self.engine.call(
            lambda c: m.ImportSession(c, principal, request.blob, ttl, request.session_id)
        )
        return pb.ImportSessionResponse(session=translate.session_message(reply.session))

    @unary
    async def Classify(self, request, principal):
        model, answer = await run_classify(
            self.engine, principal, translate.classify_call(request, self.settings)
        )
        self._observe(model, answer)
        return pb.ClassifyResponse(classification=translate.classification(answer))

    @streaming
    async def Generate(self, request, principal, route) -> AsyncIterator[pb.GenerateResponse]:
        call = translate.generate_call(request, self.settings, principal)
        async for event in run_generate(self.engine, principal, call):
            if isinstance(event, Opened):
                session = event.session
                continue
            self._observe(session.model, event)
            yield translate.generate_response(session, event)

    @streaming
    async def Stream(self, requests, principal, route) -> AsyncIterator[pb.StreamResponse]:
        commands = translate.stream_commands(requests, self.settings, principal, route)
        model = ""
        async for event in run_stream(self.engine, principal, commands):
            if isinstance(event, Opened):
                model = event.session.model
            self._observe(model, event)
            yield translate.stream_response(event)
