"""Hypothesis fuzzing of every RPC against a live server.

Random field values (any unicode, bytes decoded as text, extreme ints, NaN/inf floats, token
ids out of range, durations, seeds, stop lists, forged and mangled blobs) and random message
orders on Stream (feeds and generates before `open`, several opens, duplicate request ids,
cancels of unknown requests), also while unary calls hit the same session. Properties: no
INTERNAL or UNKNOWN status, no hang, the server stays up and logs no traceback, and a watched
session elsewhere stays put, then continues exactly like a fresh session fed the same way.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server.api.streams import Open, run_stream
from server.sessions import blob
from server.sessions.blob import SessionBlob
from tests.conftest import TINY_MODELS
from tests.fuzz_strategies import (
    BAD_UTF8,
    Forged,
    Mangled,
    Raw,
    Ref,
    generate_calls,
    import_calls,
    raw_payloads,
    seal,
    stream_scripts,
    unary_calls,
)
from tests.stubs import connect, create, generate, in_background

BAD_CODES = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}  # the last: a hang
CALL_TIMEOUT = 30.0
MAX_RESPONSES = 40  # read at most this many events of a streaming call, then cancel it
LOG_ALARMS = ("Traceback", "unexpected error", "step failed", "sweep failed")
LOG_LAG = 0.02  # seconds for the server's output to reach the fixture's reader thread
WATCHED_SEED = 4242
SERVICE = pb.DESCRIPTOR.services_by_name["LstmServeService"]
STREAM_TYPES = {
    "open": "OpenStream",
    "feed": "FeedRequest",
    "generate": "GenerateTokensRequest",
    "cancel": "CancelRequest",
}
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- running examples -------------------------------------------------------------------------


@dataclass
class Env:
    """The module's server, a connection, the watched session and real exports to forge from."""

    server: object
    stub: object
    watched: str
    watched_position: int
    exports: dict[str, SessionBlob]
    raw: grpc.Channel  # sends request bytes as they are
    log_seen: int = 0


class Example:
    """One example's sessions (a fresh one first) and the status checks of its calls."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.sessions = [create(env.stub, seed=1, ttl=120).id]
        self._lock = threading.Lock()

    def resolve(self, value: object) -> object:
        with self._lock:
            return self.sessions[value.index % len(self.sessions)] if isinstance(value, Ref) else value

    def message(self, cls: type, fields: dict) -> object:
        return cls(**{k: self.resolve(v) for k, v in fields.items()})

    def unary(self, method: str, fields: dict) -> None:
        request = self.message(getattr(pb, f"{method}Request"), fields)
        try:
            response = getattr(self.env.stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            return check(e, method)
        tally(f"{method}: OK")
        if method in ("CreateSession", "ForkSession", "ImportSession"):
            with self._lock:
                self.sessions.append(response.session.id)

    def generate(self, fields: dict) -> None:
        self.drain(
            self.env.stub.Generate(self.message(pb.GenerateRequest, fields), timeout=CALL_TIMEOUT), "Generate"
        )

    def stream(self, script: list[tuple[str, str, dict]], pause: float = 0.0) -> None:
        def requests():
            for request_id, kind, fields in script:
                if kind == "none":
                    yield pb.StreamRequest(request_id=request_id)
                else:
                    message = self.message(getattr(pb, STREAM_TYPES[kind]), fields)
                    yield pb.StreamRequest(request_id=request_id, **{kind: message})
                time.sleep(pause)

        self.drain(self.env.stub.Stream(requests(), timeout=CALL_TIMEOUT), "Stream")

    def raw(self, method: str, payloads: list[bytes]) -> None:
        """Send `payloads` as the request bytes of `method` (all of them on Stream, else the first)."""
        spec = SERVICE.methods_by_name[method]
        path = f"/{SERVICE.full_name}/{method}"
        if spec.client_streaming:
            self.drain(self.env.raw.stream_stream(path)(iter(payloads), timeout=CALL_TIMEOUT), method)
        elif spec.server_streaming:
            self.drain(self.env.raw.unary_stream(path)(payloads[0], timeout=CALL_TIMEOUT), method)
        else:
            try:
                self.env.raw.unary_unary(path)(payloads[0], timeout=CALL_TIMEOUT)
            except grpc.RpcError as e:
                return check(e, method)
            tally(f"{method}: OK")

    def import_blob(self, recipe: Forged | Mangled | Raw, ttl: Duration | None) -> None:
        self.unary("ImportSession", {"blob": recipe.build(self.env.exports), "ttl": ttl})

    @staticmethod
    def drain(call, method: str) -> None:
        """Read a streaming call's events (cancelling it after MAX_RESPONSES); check its status."""
        try:
            for count, _ in enumerate(call, 1):
                if count >= MAX_RESPONSES:
                    call.cancel()
                    return tally(f"{method}: cancelled by the test")
        except grpc.RpcError as e:
            return check(e, method)
        tally(f"{method}: OK")

    def delete_sessions(self) -> None:
        for session_id in self.sessions:
            try:
                self.env.stub.DeleteSession(
                    pb.DeleteSessionRequest(session_id=session_id), timeout=CALL_TIMEOUT
                )
            except grpc.RpcError as e:
                check(e, "DeleteSession")


def tally(what: str) -> None:
    """Count an outcome for --hypothesis-show-statistics (how deep the examples got)."""
    if threading.current_thread() is threading.main_thread():  # hypothesis only notes from the test's thread
        event(what)


def check(error: grpc.RpcError, method: str) -> None:
    tally(f"{method}: {error.code().name}")
    assert error.code() not in BAD_CODES, f"{method}: {error.code().name}: {error.details()}"
    assert "Stream removed" not in error.details(), (
        f"{method}: the transport dropped the status: {error.details()}"
    )


def check_server(env: Env) -> None:
    """The server is up, the watched session unmoved, and the log has no new alarm."""
    assert env.server.proc.poll() is None, "the server died:\n" + env.server.log[-5000:]
    position = env.stub.GetSession(
        pb.GetSessionRequest(session_id=env.watched), timeout=CALL_TIMEOUT
    ).session.position
    assert position == env.watched_position
    time.sleep(LOG_LAG)
    lines = env.server.output[env.log_seen :]
    env.log_seen += len(lines)
    new = "".join(lines)
    assert not any(alarm in new for alarm in LOG_ALARMS), new[-5000:]


def run(env: Env, body) -> None:
    """Run one example's calls, delete its sessions, then check the server."""
    example = Example(env)
    try:
        body(example)
    finally:
        example.delete_sessions()
    check_server(env)


@pytest.fixture(scope="module")
def env(server) -> Env:
    stub = connect(server.target)
    watched = create(stub, seed=WATCHED_SEED)
    generate(stub, watched.id, "watch", max_tokens=5)
    exports = {}
    for model in TINY_MODELS:
        session = create(stub, model=model)
        generate(stub, session.id, "export me", max_tokens=3)
        exports[model] = blob.unpack(stub.ExportSession(pb.ExportSessionRequest(session_id=session.id)).blob)
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.id))
    position = stub.GetSession(pb.GetSessionRequest(session_id=watched.id)).session.position
    return Env(
        server, stub, watched.id, position, exports, grpc.insecure_channel(server.target), len(server.output)
    )


# ---- the fuzz tests -----------------------------------------------------------------------------


@FUZZ
@given(calls=st.lists(unary_calls, min_size=1, max_size=6))
def test_unary_rpcs(env, calls):
    run(env, lambda ex: [ex.unary(method, fields) for method, fields in calls])


@FUZZ
@given(calls=st.lists(generate_calls, min_size=1, max_size=3))
def test_generate(env, calls):
    run(env, lambda ex: [ex.generate(fields) for fields in calls])


@FUZZ
@given(script=stream_scripts(), pause=st.sampled_from([0.0, 0.0, 0.002]))
def test_stream_messages_in_any_order(env, script, pause):
    run(env, lambda ex: ex.stream(script, pause))


@FUZZ
@given(imports=st.lists(import_calls, min_size=1, max_size=4), then=st.lists(generate_calls, max_size=2))
def test_import_session_blobs(env, imports, then):
    def body(ex: Example) -> None:
        for recipe, ttl in imports:
            ex.import_blob(recipe, ttl)
        for fields in then:  # imported sessions are reachable through Refs: drive them
            ex.generate(fields)

    run(env, body)


@FUZZ
@given(
    script=stream_scripts(), calls=st.lists(unary_calls, min_size=1, max_size=5), streams=st.integers(1, 2)
)
def test_unary_calls_while_streaming(env, script, calls, streams):
    def body(ex: Example) -> None:
        threads = [in_background(ex.stream, script, 0.002) for _ in range(streams)]
        for method, fields in calls:
            ex.unary(method, fields)
        for thread, out in threads:
            thread.join(CALL_TIMEOUT + 5)
            assert not thread.is_alive(), "a stream hung"
            if out and isinstance(out[0], Exception):
                raise out[0]

    run(env, body)


@FUZZ
@given(method=st.sampled_from([m.name for m in SERVICE.methods]), payloads=raw_payloads)
def test_request_bytes_that_do_not_parse(env, method, payloads):
    run(env, lambda ex: ex.raw(method, payloads))


# ---- regressions ---------------------------------------------------------------------------


def expect_status(code: grpc.StatusCode, fn, *args) -> str:
    """Call fn(*args) (draining a stream) and check it fails with `code`; returns the message."""
    with pytest.raises(grpc.RpcError) as err:
        result = fn(*args)
        if hasattr(result, "__iter__"):
            list(result)
    assert err.value.code() == code, err.value.details()
    return err.value.details()


def test_blob_headers_that_break_the_json_parser(env):
    """Found by the fuzzer: INTERNAL (RecursionError, OverflowError while reading the header)."""
    for header in (b"[" * 5000 + b"]" * 5000, b'{"state_bytes": 1e999}'):
        request = pb.ImportSessionRequest(blob=seal(header))
        assert "header is invalid" in expect_status(
            grpc.StatusCode.INVALID_ARGUMENT, env.stub.ImportSession, request
        )


@pytest.mark.parametrize("position, seed", [(1, -1), (1, 2**64), (-1, 1), (2**63, 1)])
def test_blob_position_and_seed_out_of_range(env, position, seed):
    """Found by the fuzzer: a negative or 65-bit seed or position was imported, then failed to
    fit a uint64 in the response (INTERNAL); a position near 2^63 would break sampling's int64."""
    forged = Forged("tiny", position=position, seed=seed).build(env.exports)
    message = expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, env.stub.ImportSession, pb.ImportSessionRequest(blob=forged)
    )
    assert "out of range" in message


def test_blob_sections_with_a_negative_length(env):
    """Found in review: lengths that add up with one negative put the logits before the blob (INTERNAL)."""
    for pad in range(4):
        fields = {
            "format_version": 1,
            "model": "m" * (1 + pad),
            "fingerprint": "f",
            "position": 1,
            "seed": 1,
            "state_bytes": -999,
            "logits_bytes": 999,
        }
        n = (
            len(blob.MAGIC) + 4 + len(json.dumps(fields)) + 4
        )  # the logits would start 4 bytes before the blob
        if n % 4 == 0:
            header = json.dumps(fields | {"state_bytes": -n, "logits_bytes": n}).encode()
            break
    message = expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, env.stub.ImportSession, pb.ImportSessionRequest(blob=seal(header))
    )
    assert "do not add up" in message


def test_long_status_messages_are_cut_not_dropped(env):
    """Found by the fuzzer: an error quoting a long request field made a status header grpc
    refuses, so the client got RESOURCE_EXHAUSTED "Stream removed" instead of NOT_FOUND."""
    message = expect_status(
        grpc.StatusCode.NOT_FOUND, env.stub.CreateSession, pb.CreateSessionRequest(model="é" * 5000)
    )
    assert message.startswith("unknown model") and len(message) <= 501


@pytest.mark.parametrize("method", ["CreateSession", "Generate", "Stream"])
def test_request_bytes_with_bad_utf8(env, method):
    """Found by the fuzzer: a string field that is not UTF-8 got UNKNOWN (grpc's deserializer) or
    INTERNAL (Stream's request iterator)."""
    path = f"/{SERVICE.full_name}/{method}"
    calls = {
        "CreateSession": env.raw.unary_unary,
        "Generate": env.raw.unary_stream,
        "Stream": env.raw.stream_stream,
    }
    payload = BAD_UTF8[0] if method != "Stream" else iter([BAD_UTF8[0]])
    assert "could not be parsed" in expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, calls[method](path), payload
    )


async def test_a_stream_cancelled_before_it_opened_detaches():
    """Found in review: a client gone while `open` waited for the session to settle left the
    session attached for good (every later open refused, and it never expired)."""

    class Stream:
        closed = False

        async def opened(self):
            await asyncio.Event().wait()  # the session never settles

        def close(self):
            self.closed = True

    class EngineClient:
        opened: list[str] = []
        stream = Stream()

        def open_stream(self, principal, session_id, takeover):
            self.opened.append(session_id)
            return self.stream

    async def commands():
        yield Open("open", "s1", False)
        await asyncio.Event().wait()

    engine = EngineClient()
    opening = asyncio.ensure_future(anext(run_stream(engine, None, commands())))
    await asyncio.sleep(0.05)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert engine.opened == ["s1"] and engine.stream.closed  # Close tells the engine core to detach


# ---- last: the watched session never noticed --------------------------------------------------


def test_watched_session_continues_like_a_fresh_one(env):
    stub = env.stub
    check_server(env)
    reference = create(stub, seed=WATCHED_SEED)
    generate(stub, reference.id, "watch", max_tokens=5)
    copy = stub.ForkSession(pb.ForkSessionRequest(session_id=env.watched)).session
    assert copy.position == env.watched_position
    assert generate(stub, copy.id, max_tokens=30)[0] == generate(stub, reference.id, max_tokens=30)[0]
