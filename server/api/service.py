"""The gRPC servicer: each RPC translates its request, delegates to the engine, and the
decorators authenticate, map errors to status codes and record metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from client.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from server.api import translate
from server.api.auth import Authenticator
from server.api.streams import Opened, run_stream
from server.engine.core import Engine
from server.engine.metrics import Metrics
from server.errors import InvalidArgument, ServeError
from server.sessions.jobs import TokenEvent
from server.sessions.principal import Principal

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["LstmServeService"]
METHODS = [m.name for m in SERVICE.methods]
PROMPT_METHODS = (
    "Generate",
    "Stream",
)  # their requests are small but for the prompt: refused unparsed when too large
MAX_DETAILS = (
    500  # characters of a status message; grpc drops longer headers (the client would see RESOURCE_EXHAUSTED)
)


def principal_of(engine: Engine, auth: Authenticator, context: grpc.aio.ServicerContext) -> Principal:
    """The authenticated caller; UNAVAILABLE while the server is not ready."""
    engine.check_ready()
    metadata = dict(context.invocation_metadata() or ())
    return auth.authenticate(metadata.get("authorization"))


class _Call:
    """Status bookkeeping of one RPC: the code it ends with, for the metrics."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.metrics, self.method, self.code = metrics, method, "OK"
        self.started = time.perf_counter()

    async def fail(self, context: grpc.aio.ServicerContext, error: Exception) -> None:
        """End the RPC with the error's status (raises grpc.aio.AbortError)."""
        if isinstance(error, ServeError):
            self.code = error.code
            message = str(error)  # it may quote the request: keep it short
            await context.abort(
                getattr(grpc.StatusCode, error.code),
                message if len(message) <= MAX_DETAILS else message[:MAX_DETAILS] + "…",
            )
        else:
            log.error("unexpected error in %s", self.method, exc_info=error)
            self.code = "INTERNAL"
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error in {self.method}; the server log has details"
            )

    def done(self, cancelled: bool) -> None:
        code = "CANCELLED" if cancelled else self.code
        self.metrics.requests.labels(self.method, code).inc()
        self.metrics.rpc_duration.labels(self.method).observe(time.perf_counter() - self.started)


def unary(method: Callable) -> Callable:
    @functools.wraps(method)
    async def handler(self: LstmServeServicer, request, context):
        call, cancelled = _Call(self.metrics, method.__name__), False
        try:
            principal = principal_of(self.engine, self.auth, context)
            return await method(self, translate.parsed(request), principal)
        except asyncio.CancelledError:
            cancelled = True
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # every failure gets a status; unexpected ones are logged
            await call.fail(context, e)
        finally:
            call.done(cancelled)

    return handler


def streaming(method: Callable) -> Callable:
    @functools.wraps(method)
    async def handler(self: LstmServeServicer, request, context):
        call, cancelled = _Call(self.metrics, method.__name__), False
        in_flight = self.metrics.streams_in_flight.labels(method.__name__)
        in_flight.inc()
        try:
            principal = principal_of(self.engine, self.auth, context)
            async for response in method(
                self, translate.parsed(request), principal
            ):  # Stream: parsed per message
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            cancelled = True
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # every failure gets a status; unexpected ones are logged
            await call.fail(context, e)
        finally:
            in_flight.dec()
            call.done(cancelled)

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
    def __init__(self, engine: Engine, auth: Authenticator) -> None:
        self.engine = engine
        self.auth = auth
        self.settings = engine.settings
        self.metrics = engine.metrics
        self._latency: dict[tuple[str, bool], object] = {}  # (model, first token?) -> histogram child

    def _observe(self, model: str, event: TokenEvent) -> None:
        """Time to first token and inter-token latency of generated tokens (per token: cached children)."""
        if event.latency is not None:
            key = (model, event.first)
            histogram = self._latency.get(key)
            if histogram is None:
                family = self.metrics.time_to_first_token if event.first else self.metrics.inter_token_latency
                histogram = self._latency[key] = family.labels(model)
            histogram.observe(event.latency)

    @unary
    async def ListModels(self, request, principal):
        return pb.ListModelsResponse(
            models=[translate.model_info(r) for r in self.engine.registry.runtimes()]
        )

    @unary
    async def CreateSession(self, request, principal):
        session = await self.engine.create_session(
            principal,
            request.model,
            request.model_version,
            translate.optional_seed(request),
            translate.ttl_seconds(request),
        )
        return pb.CreateSessionResponse(session=translate.session_message(session))

    @unary
    async def GetSession(self, request, principal):
        session = self.engine.get_session(principal, request.session_id)
        tokens = session.tokens_after(request.tokens_after) if request.HasField("tokens_after") else []
        return pb.GetSessionResponse(session=translate.session_message(session), tokens=tokens)

    @unary
    async def ListSessions(self, request, principal):
        sessions = self.engine.list_sessions(principal)
        return pb.ListSessionsResponse(sessions=[translate.session_message(s) for s in sessions])

    @unary
    async def DeleteSession(self, request, principal):
        await self.engine.delete_session(principal, request.session_id)
        return pb.DeleteSessionResponse()

    @unary
    async def ResetSession(self, request, principal):
        session = await self.engine.reset_session(principal, request.session_id)
        return pb.ResetSessionResponse(session=translate.session_message(session))

    @unary
    async def ForkSession(self, request, principal):
        session = await self.engine.fork_session(
            principal, request.session_id, translate.optional_seed(request), translate.ttl_seconds(request)
        )
        return pb.ForkSessionResponse(session=translate.session_message(session))

    @unary
    async def ExportSession(self, request, principal):
        blob, session = await self.engine.export_session(principal, request.session_id)
        return pb.ExportSessionResponse(blob=blob, session=translate.session_message(session))

    @unary
    async def ImportSession(self, request, principal):
        session = await self.engine.import_session(principal, request.blob, translate.ttl_seconds(request))
        return pb.ImportSessionResponse(session=translate.session_message(session))

    @streaming
    async def Generate(self, request, principal) -> AsyncIterator[pb.GenerateResponse]:
        if not request.session_id and not request.model:
            raise InvalidArgument("give session_id, or model for a temporary session")
        prompt = translate.input_tokens(request.prompt, self.settings)
        spec = translate.generate_spec(request, self.settings, principal)
        events = self.engine.generate(
            principal,
            request.session_id,
            request.model,
            request.model_version,
            prompt,
            spec,
            translate.optional_seed(request),
            request.takeover,
        )
        async for session, event in events:
            if isinstance(event, TokenEvent):
                self._observe(session.model, event)
            yield translate.generate_response(session, event)

    @streaming
    async def Stream(self, requests, principal) -> AsyncIterator[pb.StreamResponse]:
        commands = translate.stream_commands(requests, self.settings, principal)
        model = ""
        async for event in run_stream(self.engine, principal, commands):
            if isinstance(event, Opened):
                model = event.session.model
            elif isinstance(event, TokenEvent):
                self._observe(model, event)
            yield translate.stream_response(event)
