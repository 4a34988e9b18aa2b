"""Bad input gets a precise status and a message that says what to fix; the server keeps
serving and a watched session elsewhere is unaffected."""

from __future__ import annotations

import math
import time

import grpc
import pytest

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from tests.stubs import LiveStream, connect, create, feed_request, generate, generate_request, run_stream

WATCHED_SEED = 77


@pytest.fixture(scope="module")
def stub(server):
    return connect(server.target)


@pytest.fixture(scope="module")
def watched(stub):
    """A session fed once; every test checks it did not move."""
    session = create(stub, seed=WATCHED_SEED)
    generate(stub, session.id, "watch", max_tokens=5)
    return session.id


@pytest.fixture(autouse=True)
def watched_session_is_untouched(stub, watched):
    before = stub.GetSession(pb.GetSessionRequest(session_id=watched)).session.position
    yield
    assert stub.GetSession(pb.GetSessionRequest(session_id=watched)).session.position == before
    assert stub.ListModels(pb.ListModelsRequest()).models  # still serving


def expect(code: grpc.StatusCode, fn, *args, match: str = "", **kwargs) -> str:
    """Call fn (draining streams) and check it fails with `code`; returns the message."""
    with pytest.raises(grpc.RpcError) as err:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    assert err.value.code() == code, err.value.details()
    assert match.lower() in err.value.details().lower()
    return err.value.details()


def gen_request(**fields) -> pb.GenerateRequest:
    fields.setdefault("model", "tiny")
    return pb.GenerateRequest(**fields)


def test_unknown_model(stub):
    expect(
        grpc.StatusCode.NOT_FOUND,
        stub.CreateSession,
        pb.CreateSessionRequest(model="nope"),
        match="unknown model 'nope'",
    )
    expect(
        grpc.StatusCode.NOT_FOUND,
        stub.Generate,
        gen_request(model="nope"),
        match="loaded models: tiny, tiny-rnn",
    )
    expect(
        grpc.StatusCode.NOT_FOUND,
        stub.CreateSession,
        pb.CreateSessionRequest(model="tiny", model_version="ffff"),
        match="no loaded version",
    )


def test_unknown_and_malformed_session_ids(stub):
    missing = "0123456789abcdef" * 2
    for call, request in [
        (stub.GetSession, pb.GetSessionRequest(session_id=missing)),
        (stub.DeleteSession, pb.DeleteSessionRequest(session_id=missing)),
        (stub.ForkSession, pb.ForkSessionRequest(session_id=missing)),
        (stub.ResetSession, pb.ResetSessionRequest(session_id=missing)),
        (stub.ExportSession, pb.ExportSessionRequest(session_id=missing)),
    ]:
        expect(grpc.StatusCode.NOT_FOUND, call, request, match="not found")
    expect(grpc.StatusCode.NOT_FOUND, stub.Generate, gen_request(session_id=missing), match="not found")
    expect(grpc.StatusCode.NOT_FOUND, run_stream, stub, missing, [], match="not found")
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.GetSession,
        pb.GetSessionRequest(session_id="x"),
        match="32 lowercase hex",
    )


def test_expired_session_says_expired(stub):
    session = create(stub, ttl=0.3)
    time.sleep(0.8)
    expect(
        grpc.StatusCode.NOT_FOUND,
        stub.GetSession,
        pb.GetSessionRequest(session_id=session.id),
        match="expired",
    )
    expect(grpc.StatusCode.NOT_FOUND, stub.Generate, gen_request(session_id=session.id), match="expired")


def test_activity_renews_the_ttl(stub):
    session = create(stub, ttl=0.6)
    for _ in range(4):
        time.sleep(0.3)
        generate(stub, session.id, max_tokens=1)
    assert stub.GetSession(pb.GetSessionRequest(session_id=session.id)).session.position == 1 + 4


def test_token_id_out_of_range(stub):
    session = create(stub)
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        run_stream,
        stub,
        session.id,
        [feed_request("f", ids=[65, 258])],
        match="token id 258",
    )
    request = gen_request(prompt=pb.Input(tokens=pb.TokenIds(ids=[2**31])))
    expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Generate, request, match="out of range")
    assert stub.GetSession(pb.GetSessionRequest(session_id=session.id)).session.position == 1


def test_empty_and_oversized_prompts(stub):
    session = create(stub)
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        run_stream,
        stub,
        session.id,
        [feed_request("f", "")],
        match="feed input is empty",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.Generate,
        gen_request(prompt=pb.Input(text="x" * 8193)),
        match="limit is 8192",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        run_stream,
        stub,
        session.id,
        [feed_request("f", "y" * 9000)],
        match="limit is 8192",
    )


@pytest.mark.parametrize(
    "options,match",
    [
        (pb.SamplingOptions(temperature=-1.0), "temperature"),
        (pb.SamplingOptions(temperature=math.nan), "temperature"),
        (pb.SamplingOptions(temperature=math.inf), "temperature"),
        (pb.SamplingOptions(top_p=0.0), "top_p must be in (0, 1]"),
        (pb.SamplingOptions(top_p=1.5), "top_p must be in (0, 1]"),
        (pb.SamplingOptions(top_p=math.nan), "top_p"),
    ],
)
def test_bad_sampling_options(stub, options, match):
    expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Generate, gen_request(sampling=options), match=match)
    session = create(stub)
    request = pb.StreamRequest(
        request_id="g", generate=pb.GenerateTokensRequest(max_tokens=3, sampling=options)
    )
    expect(grpc.StatusCode.INVALID_ARGUMENT, run_stream, stub, session.id, [request], match=match)


def test_max_tokens_above_the_limit(stub):
    expect(
        grpc.StatusCode.INVALID_ARGUMENT, stub.Generate, gen_request(max_tokens=4097), match="at most 4096"
    )


def test_stream_protocol_errors(stub):
    session = create(stub)
    no_open = [feed_request("f", "x")]
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(stub.Stream(iter(no_open))), match="first message")
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        run_stream,
        stub,
        session.id,
        [feed_request("", "x")],
        match="request_id",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        run_stream,
        stub,
        session.id,
        [pb.StreamRequest(request_id="z")],
        match="one of open",
    )


def test_a_second_stream_is_refused_unless_it_takes_over(stub):
    session = create(stub)
    first = LiveStream(stub, session.id)
    expect(grpc.StatusCode.FAILED_PRECONDITION, run_stream, stub, session.id, [], match="takeover")
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        stub.Generate,
        pb.GenerateRequest(session_id=session.id),
        match="another stream",
    )
    second = LiveStream(stub, session.id, takeover=True)
    with pytest.raises(grpc.RpcError) as err:
        next(first.call)
    assert err.value.code() == grpc.StatusCode.ABORTED and "taken over" in err.value.details()
    second.send(generate_request("g", 4))
    tokens, finished = second.until_finished("g")
    assert len(tokens) == 4 and finished.position == 1 + 4
    second.close()


def test_busy_session_cannot_be_forked_or_exported(stub):
    session = create(stub)
    live = LiveStream(stub, session.id)
    live.send(generate_request("g", 4000))
    next(live.call)
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        stub.ForkSession,
        pb.ForkSessionRequest(session_id=session.id),
        match="wait for it",
    )
    live.send(pb.StreamRequest(request_id="c", cancel=pb.CancelRequest(target_request_id="g")))
    live.until_finished("g")
    live.close()
    assert stub.ForkSession(pb.ForkSessionRequest(session_id=session.id)).session.position > 1


def test_corrupt_and_foreign_blobs_are_refused(stub):
    session = create(stub)
    blob = stub.ExportSession(pb.ExportSessionRequest(session_id=session.id)).blob
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.ImportSession,
        pb.ImportSessionRequest(blob=bytes(flipped)),
        match="checksum",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.ImportSession,
        pb.ImportSessionRequest(blob=blob[:-10]),
        match="checksum",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.ImportSession,
        pb.ImportSessionRequest(blob=b"hello"),
        match="not an exported",
    )


def test_bad_ttls(stub):
    for ttl in (0.0, -5.0, 10 * 365 * 24 * 3600.0):
        expect(grpc.StatusCode.INVALID_ARGUMENT, create, stub, ttl=ttl, match="ttl must be in")


def test_watched_session_continues_as_if_nothing_happened(stub, watched):
    reference = create(stub, seed=WATCHED_SEED)
    generate(stub, reference.id, "watch", max_tokens=5)
    copy = stub.ForkSession(pb.ForkSessionRequest(session_id=watched)).session  # the watched one stays put
    assert generate(stub, copy.id, max_tokens=30)[0] == generate(stub, reference.id, max_tokens=30)[0]


# ---- authentication --------------------------------------------------------------------


def test_wrong_or_missing_api_key_is_unauthenticated(auth_server):
    expect(
        grpc.StatusCode.UNAUTHENTICATED,
        connect(auth_server.target).ListModels,
        pb.ListModelsRequest(),
        match="missing API key",
    )
    expect(
        grpc.StatusCode.UNAUTHENTICATED,
        connect(auth_server.target, "wrong").ListModels,
        pb.ListModelsRequest(),
        match="invalid API key",
    )


def test_a_foreign_session_is_not_found(auth_server):
    alice = connect(auth_server.target, auth_server.keys["alice"])
    bob = connect(auth_server.target, auth_server.keys["bob"])
    session = create(alice)
    expect(
        grpc.StatusCode.NOT_FOUND,
        bob.GetSession,
        pb.GetSessionRequest(session_id=session.id),
        match="not found",
    )
    expect(grpc.StatusCode.NOT_FOUND, bob.DeleteSession, pb.DeleteSessionRequest(session_id=session.id))
    expect(grpc.StatusCode.NOT_FOUND, run_stream, bob, session.id, [])
    assert session.id not in {s.id for s in bob.ListSessions(pb.ListSessionsRequest()).sessions}
    assert session.id in {s.id for s in alice.ListSessions(pb.ListSessionsRequest()).sessions}


def test_per_key_limits(auth_server):
    limited = connect(auth_server.target, auth_server.keys["limited"])
    expect(grpc.StatusCode.INVALID_ARGUMENT, limited.Generate, gen_request(max_tokens=17), match="at most 16")
    first, second = create(limited), create(limited)
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, create, limited, match="maximum of 2 sessions")
    limited.DeleteSession(pb.DeleteSessionRequest(session_id=first.id))
    create(limited)
    assert second.id
