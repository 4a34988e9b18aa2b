"""`AsyncSession`: one server-side session, driven over a Stream call (asyncio API)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc

from client import retry
from client.errors import LstmServeError, SessionClosedError, StatusError
from client.handle import SessionHandle
from client.history import REFEED_CHUNK, ResumeResult, TokenHistory
from client.lstmserve.v1 import lstm_serve_pb2 as pb
from client.messages import Classification, Prompt, SessionInfo, make_input, make_sampling
from client.token_stream import AsyncTokenStream

if TYPE_CHECKING:
    from client.async_client import AsyncClient


class _AsyncAttachment:
    """One Stream call: a reader task routes responses to per-request queues by request id."""

    def __init__(self, call: grpc.aio.StreamStreamCall, history: TokenHistory) -> None:
        self._call = call
        self._history = history  # sees every request sent and every event received
        self._queues: dict[str, asyncio.Queue[pb.StreamResponse | None]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._error: LstmServeError | None = None
        self._closed = False
        self._reader: asyncio.Task[None] | None = None

    async def open(self, session_id: str, takeover: bool) -> SessionInfo:
        """Attach; the session as the server reports it."""
        self._queues["open"] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        try:
            await self._write(
                pb.StreamRequest(
                    request_id="open", open=pb.OpenStream(session_id=session_id, takeover=takeover)
                )
            )
            return (await self._next("open")).opened
        except BaseException:
            await self.close(grace=0)
            raise

    @property
    def ended(self) -> bool:
        return self._closed or self._error is not None

    async def _read(self) -> None:
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                assert isinstance(response, pb.StreamResponse)
                self._history.received(response)
                if (queue := self._queues.get(response.request_id)) is not None:
                    queue.put_nowait(response)
            self._error = SessionClosedError("the server ended the session's stream")
        except grpc.RpcError as e:
            self._error = StatusError.from_rpc(e)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            self._error = SessionClosedError("the session's stream was cancelled")  # by close()
        finally:
            for queue in self._queues.values():
                queue.put_nowait(None)

    async def _write(self, request: pb.StreamRequest) -> None:
        try:
            async with self._write_lock:
                await self._call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError) as e:
            await asyncio.sleep(0)  # let the reader record why the call ended
            if self._error is not None:
                raise self._error.with_traceback(None) from e
            raise SessionClosedError(f"the session's stream has ended: {e}") from e

    async def send(self, request: pb.StreamRequest, *, answered: bool = True) -> str:
        """Send a request under a fresh id; `answered`: its events are kept for `responses()`."""
        if self._error is not None:
            raise self._error.with_traceback(None)  # why the stream ended, e.g. ABORTED by a takeover
        if self._closed:
            raise SessionClosedError("the session's stream was closed: attach() or resume() re-attaches")
        request.request_id = str(next(self._ids))
        if answered:
            self._queues[request.request_id] = asyncio.Queue()
        self._history.sent(request)
        await self._write(request)
        return request.request_id

    async def cancel(self, request_id: str) -> None:
        if not self.ended:
            await self.send(
                pb.StreamRequest(cancel=pb.CancelRequest(target_request_id=request_id)), answered=False
            )

    async def _next(self, request_id: str) -> pb.StreamResponse:
        response = await self._queues[request_id].get()
        if response is None:
            self._queues[request_id].put_nowait(None)  # for a later call
            assert self._error is not None
            raise self._error.with_traceback(None)
        if response.WhichOneof("event") in ("finished", "opened"):
            del self._queues[request_id]
        return response

    async def responses(self, request_id: str) -> AsyncIterator[pb.StreamResponse]:
        """The request's events, up to and including `finished`."""
        while True:
            response = await self._next(request_id)
            yield response
            if response.WhichOneof("event") == "finished":
                return

    async def abandon(self) -> None:
        """End the call at once (its events are no longer wanted)."""
        self._closed = True
        self._call.cancel()
        if self._reader is not None:
            await self._reader

    async def close(self, grace: float) -> None:
        """Cancel open requests, half-close, and wait up to `grace` s for the server to end the call."""
        if self._closed:
            return
        with contextlib.suppress(LstmServeError):
            for request_id in [r for r in self._queues if r != "open"]:
                await self.cancel(request_id)
            await self._call.done_writing()
        self._closed = True
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), grace)
            except TimeoutError:
                self._call.cancel()
                await self._reader


class AsyncSession(SessionHandle):
    """A session on the server. Feeding and generating attach a Stream call to it (once).

    `close()` (or leaving an `async with` block) detaches and, unless `keep`, deletes it.
    Once the stream ends (another stream took over: ABORTED; the connection dropped or the
    server stopped: UNAVAILABLE), calls raise that status until `resume()` re-attaches.
    """

    def __init__(self, client: AsyncClient, session: SessionInfo | str, *, keep: bool) -> None:
        super().__init__(session, keep=keep)
        self.client = client
        self._attachment: _AsyncAttachment | None = None

    async def _open(self, takeover: bool) -> SessionInfo:
        await self.detach()
        attachment = _AsyncAttachment(self.client.stream(self.id), self._history)
        self.info = await attachment.open(self.id, takeover)
        self._attachment = attachment
        return self.info

    async def attach(self, *, takeover: bool = False) -> SessionInfo:
        """Open a Stream call on the session; `takeover` ends one that drives it (ABORTED)."""
        info = await self._open(takeover)
        self._history.attached(info)
        return info

    async def resume(self, client: AsyncClient | None = None, *, deadline: float = 30.0) -> ResumeResult:
        """Re-attach (taking over) after a disconnect or a server restart, and reconcile
        (see `Session.resume`): re-feed what the server lacks, report what it absorbed unseen;
        retried with jittered backoff for up to `deadline` seconds while the server is away."""
        if client is not None:
            self.client = client
        if self._attachment is not None:  # what it has not read yet counts as missed
            await self._attachment.abandon()
            self._attachment = None
        waits = retry.delays(deadline)
        while True:
            try:
                info = await self._open(takeover=True)
                break
            except StatusError as e:
                wait = next(waits, None)
                if not retry.retriable(e) or wait is None:
                    raise
                await asyncio.sleep(wait)
        refeed, fetch_after = self._history.reconcile(self.id, info)
        for i in range(0, len(refeed), REFEED_CHUNK):
            await self.feed(refeed[i : i + REFEED_CHUNK])
        missed: list[int] = []
        if fetch_after is not None:
            missed = await self.client.session_tokens(self.id, fetch_after)
            self._history.caught_up(fetch_after, missed)
        return ResumeResult(self.position, refeed, missed, info)

    async def _attached(self) -> _AsyncAttachment:
        if self._attachment is None:
            await self.attach()
        assert self._attachment is not None
        return self._attachment

    async def feed(
        self, prompt: Prompt, *, return_logprobs: bool = False, top_logprobs: int = 0, classify: bool = False
    ) -> AsyncTokenStream:
        """Absorb `prompt`; returns once done, with a token per fed token if `return_logprobs`,
        and with `.classification` (the model's heads on everything absorbed) if `classify`."""
        attachment = await self._attached()
        feed = pb.FeedRequest(
            input=make_input(prompt),
            return_logprobs=return_logprobs,
            top_logprobs=top_logprobs,
            classify=classify,
        )
        request_id = await attachment.send(pb.StreamRequest(feed=feed))
        fed = AsyncTokenStream(
            attachment.responses(request_id), lambda: attachment.cancel(request_id), self.id
        )
        await fed.wait()
        return fed

    async def generate(
        self,
        prompt: Prompt = "",
        *,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_k: int = 0,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        stream_interval: int = 1,
    ) -> AsyncTokenStream:
        """Feed `prompt` (if any), then generate; `async for` over the result gets tokens as they arrive.
        `ignore_eos`: generate past <eos> (absorbed like any token) up to `max_tokens` or a stop.
        `stream_interval`: tokens per message from the server (fewer messages; a token arrives with
        its message, once the message's last one is generated); they are yielded one by one all the same."""
        generate = pb.GenerateTokensRequest(  # first: a value out of range sends nothing
            max_tokens=max_tokens,
            sampling=make_sampling(temperature, top_k, top_p),
            stop=list(stop),
            ignore_eos=ignore_eos,
            stream_interval=stream_interval,
        )
        attachment = await self._attached()
        if prompt:
            await attachment.send(
                pb.StreamRequest(feed=pb.FeedRequest(input=make_input(prompt))), answered=False
            )
        request_id = await attachment.send(pb.StreamRequest(generate=generate))
        return AsyncTokenStream(
            attachment.responses(request_id), lambda: attachment.cancel(request_id), self.id
        )

    async def classify(self) -> Classification:
        """Each classification head's label probabilities for everything the session has absorbed
        so far (its state and position do not change); FAILED_PRECONDITION without heads."""
        attachment = await self._attached()
        request_id = await attachment.send(pb.StreamRequest(classify=pb.ClassifyCommand()))
        answer = AsyncTokenStream(
            attachment.responses(request_id), lambda: attachment.cancel(request_id), self.id
        )
        await answer.wait()
        if answer.classification is None:
            raise SessionClosedError("the classify request ended before its answer")
        return answer.classification

    async def refresh(self) -> SessionInfo:
        """The server's view of the session now."""
        return self._set_info(await self.client.get_session(self.id))

    async def reset(self) -> SessionInfo:
        """Back to the state of a new session (position 1), same seed."""
        self.info = await self.client.reset_session(self.id)
        self._history.restart(self.info)
        return self.info

    async def fork(
        self, *, seed: int | None = None, ttl: float | None = None, keep: bool = False
    ) -> AsyncSession:
        """A new session with a copy of this one's state (and seed, unless given)."""
        return await self.client.fork_session(self.id, seed=seed, ttl=ttl, keep=keep)

    async def export(self) -> bytes:
        """The session as a self-checking blob, for `AsyncClient.import_session`."""
        return await self.client.export_session(self.id)

    async def detach(self, grace: float = 5.0) -> None:
        """End the Stream call, if any (open requests are cancelled); the session stays."""
        if self._attachment is not None:
            await self._attachment.close(grace)
            self._attachment = None

    async def delete(self) -> None:
        """Detach and delete the session on the server."""
        await self.detach()
        await self.client.delete_session(self.id)

    async def close(self) -> None:
        """Detach; delete the session too unless `keep`."""
        if self.keep:
            await self.detach()
        else:
            await self.delete()

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
