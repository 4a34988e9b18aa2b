"""Protocol-level helpers for service tests: the generated stubs, nothing in between.

The client library has its own tests; these drive the wire protocol directly so that
every field (including ones a library would refuse early) reaches the server.
"""

from __future__ import annotations

import queue
import threading

import grpc

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from client.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc


def connect(target: str, api_key: str | None = None) -> pb_grpc.LstmServeServiceStub:
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.LstmServeServiceStub(channel)
    if api_key is None:
        return stub
    return _WithMetadata(stub, (("authorization", f"Bearer {api_key}"),))


class _WithMetadata:
    """A stub whose calls all carry the given metadata."""

    def __init__(self, stub, metadata) -> None:
        self._stub, self._metadata = stub, metadata

    def __getattr__(self, name):
        method = getattr(self._stub, name)
        return lambda request, **kw: method(request, metadata=self._metadata, **kw)


def create(stub, model: str = "tiny", seed: int | None = 7, ttl: float | None = None) -> pb.Session:
    request = pb.CreateSessionRequest(model=model)
    if seed is not None:
        request.seed = seed
    if ttl is not None:
        request.ttl.FromNanoseconds(int(ttl * 1e9))
    return stub.CreateSession(request, timeout=30).session


def generate(
    stub, session_id: str = "", prompt: str = "", max_tokens: int = 16, temperature: float = 1.0, **fields
) -> tuple[list[int], pb.Finished]:
    """Run a Generate call to the end: (token ids, the finished event)."""
    request = pb.GenerateRequest(
        session_id=session_id,
        prompt=pb.Input(text=prompt),
        max_tokens=max_tokens,
        sampling=pb.SamplingOptions(temperature=temperature),
        **fields,
    )
    tokens, finished = [], None
    for response in stub.Generate(request, timeout=60):
        if response.HasField("token"):
            tokens.append(response.token.id)
        elif response.HasField("tokens"):  # stream_interval > 1
            tokens += [t.id for t in response.tokens.tokens]
        else:
            finished = response.finished
    return tokens, finished


def feed_request(request_id: str, text: str = "", ids: list[int] | None = None, **fields) -> pb.StreamRequest:
    feed_input = pb.Input(tokens=pb.TokenIds(ids=ids)) if ids is not None else pb.Input(text=text)
    return pb.StreamRequest(request_id=request_id, feed=pb.FeedRequest(input=feed_input, **fields))


def generate_request(
    request_id: str, max_tokens: int, temperature: float = 1.0, **sampling
) -> pb.StreamRequest:
    options = pb.SamplingOptions(temperature=temperature, **sampling)
    return pb.StreamRequest(
        request_id=request_id, generate=pb.GenerateTokensRequest(max_tokens=max_tokens, sampling=options)
    )


def open_request(session_id: str, takeover: bool = False) -> pb.StreamRequest:
    return pb.StreamRequest(request_id="open", open=pb.OpenStream(session_id=session_id, takeover=takeover))


class LiveStream:
    """A Stream call whose requests are sent one by one while responses are read."""

    def __init__(self, stub, session_id: str, takeover: bool = False, timeout: float = 60) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._requests.put(open_request(session_id, takeover))
        self.call = stub.Stream(iter(self._requests.get, None), timeout=timeout)
        self.opened = next(self.call).opened

    def send(self, request: pb.StreamRequest) -> None:
        self._requests.put(request)

    def close(self) -> None:
        self._requests.put(None)

    def until_finished(self, request_id: str) -> tuple[list[pb.Token], pb.Finished]:
        """Read events up to `request_id`'s finished event."""
        tokens = []
        for response in self.call:
            if response.request_id != request_id:
                continue
            if response.HasField("finished"):
                return tokens, response.finished
            tokens.append(response.token)
        raise AssertionError(f"stream ended before {request_id} finished")


def run_stream(
    stub, session_id: str, requests: list[pb.StreamRequest], timeout: float = 60
) -> list[pb.StreamResponse]:
    """Open, send every request, half-close, and collect all responses."""
    return list(stub.Stream(iter([open_request(session_id), *requests]), timeout=timeout))


def in_background(fn, *args) -> tuple[threading.Thread, list]:
    """Run fn(*args) in a thread; its result or exception lands in the returned list."""
    out: list = []

    def target() -> None:
        try:
            out.append(fn(*args))
        except Exception as e:  # handed to the test
            out.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out
