"""`Session`: one server-side session, driven over a Stream call (sync API)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import grpc

from client import retry
from client.errors import LstmServeError, SessionClosedError, StatusError
from client.handle import SessionHandle
from client.history import REFEED_CHUNK, ResumeResult, TokenHistory
from client.lstmserve.v1 import lstm_serve_pb2 as pb
from client.messages import Classification, Prompt, SessionInfo, make_input, make_sampling
from client.token_stream import TokenStream

if TYPE_CHECKING:
    from client.sync_client import Client

_CLOSE = object()


class _Attachment:
    """One Stream call: requests go out through a queue; responses are routed by request id."""

    def __init__(
        self, call_stream: Callable[..., grpc.Call], session_id: str, takeover: bool, history: TokenHistory
    ) -> None:
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._buffers: dict[str, deque[pb.StreamResponse]] = {"open": deque()}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._error: LstmServeError | None = None
        self._closed = False
        self._history = history  # sees every request sent and every event received
        self._requests.put(
            pb.StreamRequest(request_id="open", open=pb.OpenStream(session_id=session_id, takeover=takeover))
        )
        self._call = call_stream(self._outgoing())
        try:
            self.opened: SessionInfo = self._next("open").opened
        except LstmServeError:
            self._call.cancel()
            raise

    def _outgoing(self) -> Iterator[pb.StreamRequest]:
        while (request := self._requests.get()) is not _CLOSE:
            yield request  # type: ignore[misc]

    @property
    def ended(self) -> bool:
        return self._closed or self._error is not None

    def send(self, request: pb.StreamRequest, *, answered: bool = True) -> str:
        """Send a request under a fresh id; `answered`: its events are kept for `responses()`."""
        if self._error is not None:
            raise self._error.with_traceback(None)  # why the stream ended, e.g. ABORTED by a takeover
        if self._closed:
            raise SessionClosedError("the session's stream was closed: attach() or resume() re-attaches")
        request.request_id = str(next(self._ids))
        if answered:
            self._buffers[request.request_id] = deque()
        self._history.sent(request)
        self._requests.put(request)
        return request.request_id

    def cancel(self, request_id: str) -> None:
        if not self.ended:
            self.send(pb.StreamRequest(cancel=pb.CancelRequest(target_request_id=request_id)), answered=False)

    def responses(self, request_id: str) -> Iterator[pb.StreamResponse]:
        """The request's events, up to and including `finished`."""
        while True:
            response = self._next(request_id)
            yield response
            if response.WhichOneof("event") == "finished":
                return

    def _next(self, request_id: str) -> pb.StreamResponse:
        with self._lock:
            buffer = self._buffers[request_id]
            while not buffer:
                if self._error is not None:
                    raise self._error.with_traceback(None)
                try:
                    self._route(next(self._call))
                except StopIteration:
                    self._error = SessionClosedError("the server ended the session's stream")
                except grpc.RpcError as e:
                    self._error = StatusError.from_rpc(e)
                except BaseException:  # e.g. KeyboardInterrupt: grpc cannot resume an interrupted read
                    self._error = SessionClosedError("a read was interrupted: resume() re-attaches")
                    self._call.cancel()
                    raise
            response = buffer.popleft()
            if response.WhichOneof("event") in ("finished", "opened"):
                del self._buffers[request_id]
            return response

    def _route(self, response: pb.StreamResponse) -> None:
        self._history.received(response)
        if (buffer := self._buffers.get(response.request_id)) is not None:
            buffer.append(response)

    def abandon(self) -> None:
        """End the call at once, reading nothing more (its events are no longer wanted)."""
        self._closed = True
        self._requests.put(_CLOSE)
        self._call.cancel()

    def close(self, grace: float) -> None:
        """Cancel open requests, half-close, and wait up to `grace` s for the server to end the call."""
        if self._closed:
            return
        if self._error is None:
            for request_id in list(self._buffers):
                self.cancel(request_id)
        self._closed = True
        self._requests.put(_CLOSE)
        timer = threading.Timer(grace, self._call.cancel)
        timer.start()
        try:
            with self._lock:
                for response in self._call:
                    self._route(response)
        except grpc.RpcError:
            pass
        finally:
            timer.cancel()


class Session(SessionHandle):
    """A session on the server. Feeding and generating attach a Stream call to it (once).

    `close()` (or leaving a `with` block) detaches and, unless `keep`, deletes the session.
    Once the stream ends (another stream took over: ABORTED; the connection dropped or the
    server stopped: UNAVAILABLE), calls raise that status until `resume()` re-attaches.
    """

    def __init__(self, client: Client, session: SessionInfo | str, *, keep: bool) -> None:
        super().__init__(session, keep=keep)
        self.client = client
        self._attachment: _Attachment | None = None

    def _open(self, takeover: bool) -> SessionInfo:
        self.detach()
        self._attachment = _Attachment(
            lambda requests: self.client.stream(requests, self.id), self.id, takeover, self._history
        )
        self.info = self._attachment.opened
        return self.info

    def attach(self, *, takeover: bool = False) -> SessionInfo:
        """Open a Stream call on the session; `takeover` ends one that drives it (ABORTED)."""
        info = self._open(takeover)
        self._history.attached(info)
        return info

    def resume(self, client: Client | None = None, *, deadline: float = 30.0) -> ResumeResult:
        """Re-attach (taking over) after a disconnect or a server restart, and reconcile.
        While the server is unreachable (or a proxy reports its replica gone), it tries again
        with jittered backoff for up to `deadline` seconds (client/retry.py).

        A server that came back behind this handle gets the tokens it lacks fed again
        (`refed`); one that came back ahead had absorbed tokens this handle never received
        (`missed`, fetched with GetSession). Requests in flight were interrupted: re-issue
        them. `client`: continue through another client (e.g. the restarted server's
        address). Raises SessionDataLostError if the server came back before the tokens this
        handle holds (it stays attached where the server has it).
        """
        if client is not None:
            self.client = client
        if self._attachment is not None:  # what it has not read yet counts as missed
            self._attachment.abandon()
            self._attachment = None
        waits = retry.delays(deadline)
        while True:
            try:
                info = self._open(takeover=True)
                break
            except StatusError as e:
                wait = next(waits, None)
                if not retry.retriable(e) or wait is None:
                    raise
                time.sleep(wait)
        refeed, fetch_after = self._history.reconcile(self.id, info)
        for i in range(0, len(refeed), REFEED_CHUNK):
            self.feed(refeed[i : i + REFEED_CHUNK])
        missed: list[int] = []
        if fetch_after is not None:
            missed = self.client.session_tokens(self.id, fetch_after)
            self._history.caught_up(fetch_after, missed)
        return ResumeResult(self.position, refeed, missed, info)

    def _attached(self) -> _Attachment:
        if self._attachment is None:
            self.attach()
        assert self._attachment is not None
        return self._attachment

    def feed(
        self, prompt: Prompt, *, return_logprobs: bool = False, top_logprobs: int = 0, classify: bool = False
    ) -> TokenStream:
        """Absorb `prompt`; returns once done, with a token per fed token if `return_logprobs`,
        and with `.classification` (the model's heads on everything absorbed) if `classify`."""
        attachment = self._attached()
        feed = pb.FeedRequest(
            input=make_input(prompt),
            return_logprobs=return_logprobs,
            top_logprobs=top_logprobs,
            classify=classify,
        )
        request_id = attachment.send(pb.StreamRequest(feed=feed))
        fed = TokenStream(attachment.responses(request_id), lambda: attachment.cancel(request_id), self.id)
        fed.wait()
        return fed

    def generate(
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
    ) -> TokenStream:
        """Feed `prompt` (if any), then generate; iterate the result to get tokens as they arrive.
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
        attachment = self._attached()
        if prompt:
            attachment.send(pb.StreamRequest(feed=pb.FeedRequest(input=make_input(prompt))), answered=False)
        request_id = attachment.send(pb.StreamRequest(generate=generate))
        return TokenStream(attachment.responses(request_id), lambda: attachment.cancel(request_id), self.id)

    def classify(self) -> Classification:
        """Each classification head's label probabilities for everything the session has absorbed
        so far (its state and position do not change); FAILED_PRECONDITION without heads."""
        attachment = self._attached()
        request_id = attachment.send(pb.StreamRequest(classify=pb.ClassifyCommand()))
        answer = TokenStream(attachment.responses(request_id), lambda: attachment.cancel(request_id), self.id)
        answer.wait()
        if answer.classification is None:
            raise SessionClosedError("the classify request ended before its answer")
        return answer.classification

    def refresh(self) -> SessionInfo:
        """The server's view of the session now."""
        return self._set_info(self.client.get_session(self.id))

    def reset(self) -> SessionInfo:
        """Back to the state of a new session (position 1), same seed."""
        self.info = self.client.reset_session(self.id)
        self._history.restart(self.info)
        return self.info

    def fork(self, *, seed: int | None = None, ttl: float | None = None, keep: bool = False) -> Session:
        """A new session with a copy of this one's state (and seed, unless given)."""
        return self.client.fork_session(self.id, seed=seed, ttl=ttl, keep=keep)

    def export(self) -> bytes:
        """The session as a self-checking blob, for `Client.import_session`."""
        return self.client.export_session(self.id)

    def detach(self, grace: float = 5.0) -> None:
        """End the Stream call, if any (open requests are cancelled); the session stays."""
        if self._attachment is not None:
            self._attachment.close(grace)
            self._attachment = None

    def delete(self) -> None:
        """Detach and delete the session on the server."""
        self.detach()
        self.client.delete_session(self.id)

    def close(self) -> None:
        """Detach; delete the session too unless `keep`."""
        if self.keep:
            self.detach()
        else:
            self.delete()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
