"""The client library (`Client`, `AsyncClient`, sessions) against a real server."""

from __future__ import annotations

import time

import grpc
import pytest

from client import AsyncClient, Client, ClientOptions, StatusError, TokenStream
from client.lstmserve.v1 import lstm_serve_pb2 as pb

TINY = "tiny"
ENDED = (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_END_TOKEN)


def ids(stream: TokenStream) -> list[int]:
    return [t.id for t in stream]


@pytest.fixture
def client(server):
    with Client(server.target) as c:
        yield c


def test_health_and_models(client):
    assert client.health() == "SERVING"
    assert client.health("lstmserve.v1.LstmServeService") == "SERVING"
    models = {m.name: m for m in client.list_models()}
    assert {TINY, "tiny-rnn"} <= models.keys()
    assert models[TINY].cell == pb.CELL_LSTM and models["tiny-rnn"].cell == pb.CELL_RNN
    assert (models[TINY].bos_token, models[TINY].eos_token) == (256, 257)


def test_session_lifecycle_and_context_manager(client):
    with client.create_session(TINY, seed=11) as session:
        assert (session.info.position, session.info.seed, session.position) == (1, 11, 1)
        assert client.get_session(session.id).model == TINY
        assert session.id in {s.id for s in client.list_sessions()}
    with pytest.raises(StatusError) as e:
        client.get_session(session.id)  # closing a session it created deletes it
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.words == "not found"

    kept = client.create_session(TINY, keep=True)
    kept.feed("ab")
    kept.close()  # only detaches
    assert client.get_session(kept.id).position == 3
    client.session(kept.id).delete()
    assert kept.id not in {s.id for s in client.list_sessions()}


def test_generate_streams_tokens_with_their_positions(client):
    stream = client.generate("hello", model=TINY, max_tokens=8, seed=1)
    tokens = list(stream)
    assert stream.finished is not None and stream.finished.reason in ENDED
    assert 1 <= len(tokens) <= 8 and stream.finished.generated_tokens == len(tokens)
    # <bos> and 5 prompt bytes are absorbed (position 6); each token is absorbed before its event
    assert [t.position for t in tokens] == list(range(7, 7 + len(tokens)))
    assert stream.finished.position == stream.position == 6 + len(tokens)
    assert stream.session_id and stream.text == "".join(t.text for t in tokens)


def test_same_seed_and_tokens_give_the_same_text(client):
    first, second = (ids(client.generate("def ", model=TINY, max_tokens=16, seed=42)) for _ in range(2))
    assert first == second


def test_feed_then_generate_on_a_session(client):
    with client.create_session(TINY, seed=3) as s:
        fed = s.feed("abc")
        assert fed.finished.reason == pb.FINISH_REASON_FED and fed.finished.fed_tokens == 3
        assert fed.finished.position == s.position == 4 and fed.tokens == []
        stream = s.generate(max_tokens=5)
        first = next(stream)
        assert first.position == 5 and stream.finished is None
        rest = list(stream)
        assert stream.finished.position == 5 + len(rest) == s.position
        info = s.refresh()
        assert info.position == s.position and info.attached


def test_feed_with_logprobs(client):
    with client.create_session(TINY) as s:
        fed = s.feed([104, 105], return_logprobs=True, top_logprobs=3)
        assert [t.id for t in fed.tokens] == [104, 105] and [t.position for t in fed.tokens] == [2, 3]
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in fed.tokens)


def test_a_prompt_given_to_generate_is_fed_first(client):
    with client.create_session(TINY, seed=5) as a, client.create_session(TINY, seed=5) as b:
        a.feed("xy")
        assert ids(a.generate(max_tokens=10, temperature=0.8)) == ids(
            b.generate("xy", max_tokens=10, temperature=0.8)
        )
        assert a.position == b.position


def test_cancel_ends_a_generation_early(client):
    with client.create_session(TINY) as s:
        stream = s.generate(ignore_eos=True)  # up to the server's limit, whatever the random model samples
        for i, _ in enumerate(stream):
            if i == 2:
                stream.cancel()
        assert stream.finished.reason == pb.FINISH_REASON_CANCELLED
        assert stream.finished.position == stream.tokens[-1].position == s.position
        assert s.generate(max_tokens=2).wait().reason in ENDED  # the session goes on

    temporary = client.generate(model=TINY)
    next(temporary)
    temporary.cancel()
    list(temporary)  # ends quietly


def test_takeover_aborts_the_old_stream_and_resume_reattaches(client):
    with client.create_session(TINY, seed=9) as s:
        s.feed("abc")
        other = client.session(s.id)
        with pytest.raises(StatusError) as e:
            other.attach()
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert other.attach(takeover=True).position == 4
        taken = ids(other.generate(max_tokens=3))
        with pytest.raises(StatusError) as e:
            s.generate(max_tokens=2).wait()
        assert e.value.code == grpc.StatusCode.ABORTED
        with pytest.raises(StatusError):
            s.feed("x")  # until resume()

        result = s.resume()  # it reports what the other stream generated meanwhile
        assert result.position == other.position == s.position and (result.missed, result.refed) == (
            taken,
            [],
        )
        with pytest.raises(StatusError) as e:
            other.feed("x")
        assert e.value.code == grpc.StatusCode.ABORTED
        assert s.generate(max_tokens=1).wait().position == other.position + 1


def test_resume_after_a_disconnect_reports_the_servers_position(server):
    with Client(server.target) as first:
        session = first.create_session(TINY, seed=1, keep=True)
        session.generate("hello", max_tokens=4).wait()
        position = session.position
    # the first connection is gone; its stream with it
    with Client(server.target) as second:
        again = second.session(session.id)
        result = again.resume()
        assert result.position == position == again.position and result.session.id == session.id
        again.delete()


def test_fork_export_and_import_continue_as_the_parent_would(client):
    with client.create_session(TINY, seed=21) as parent:
        parent.feed("fork me")
        with parent.fork() as child, client.import_session(parent.export()) as copy:
            assert child.id != parent.id and (child.info.seed, child.info.position) == (21, parent.position)
            assert copy.info.position == parent.position
            runs = [ids(s.generate(max_tokens=12)) for s in (parent, child, copy)]
        assert runs[0] == runs[1] == runs[2]
        with parent.fork(seed=22) as reseeded:
            assert reseeded.info.seed == 22


def test_reset_returns_to_a_new_sessions_state(client):
    with client.create_session(TINY, seed=8) as s, client.create_session(TINY, seed=8) as fresh:
        s.generate("abc", max_tokens=5).wait()
        s.detach()
        assert s.reset().position == 1 == s.position
        assert ids(s.generate(max_tokens=8)) == ids(fresh.generate(max_tokens=8))


def test_failed_calls_raise_status_errors(client):
    with pytest.raises(StatusError) as e:
        client.get_session("0" * 32)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(StatusError) as e:
        client.create_session("no-such-model")
    assert e.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(StatusError) as e:
        list(client.generate([300], model=TINY, max_tokens=1))  # not a token id of a 258-token vocab
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(StatusError) as e:
        client.import_session(b"not an exported session")
    assert e.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS)


def test_options_apply_to_calls(server):
    with Client(server.target, ClientOptions(max_message_bytes=16)) as c, pytest.raises(StatusError) as e:
        c.list_models()
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with Client(server.target, ClientOptions(stream_timeout=0.5)) as c:
        session = c.create_session(TINY)
        session.attach()
        time.sleep(1.0)
        with pytest.raises(StatusError) as e:
            session.feed("x")
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        session.delete()


def test_api_keys(auth_server):
    target = auth_server.target
    key = next(iter(auth_server.keys.values()))
    for options in (None, ClientOptions(api_key="wrong-key")):
        with Client(target, options) as c, pytest.raises(StatusError) as e:
            c.list_models()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(target, ClientOptions(api_key=key)) as c:
        assert c.list_models()
        with c.create_session(TINY) as s:
            s.feed("hi")  # the Stream call carries the key
            assert s.generate(max_tokens=2).wait().reason in ENDED
        assert c.generate(model=TINY, max_tokens=2).wait().reason in ENDED


def test_a_keys_sessions_are_invisible_to_other_keys(auth_server):
    if len(auth_server.keys) < 2:
        pytest.skip("needs two API keys")
    alice, bob = (ClientOptions(api_key=key) for key in list(auth_server.keys.values())[:2])
    with (
        Client(auth_server.target, alice) as a,
        Client(auth_server.target, bob) as b,
        a.create_session(TINY) as s,
    ):
        assert s.id not in {x.id for x in b.list_sessions()}
        with pytest.raises(StatusError) as e:
            b.get_session(s.id)
        assert e.value.code == grpc.StatusCode.NOT_FOUND


async def test_async_client(server):
    async with AsyncClient(server.target) as client:
        assert await client.health() == "SERVING"
        assert {TINY, "tiny-rnn"} <= {m.name for m in await client.list_models()}

        temporary = client.generate("hi", model=TINY, max_tokens=3, seed=2)
        assert len([t async for t in temporary]) == temporary.finished.generated_tokens

        async with await client.create_session(TINY, seed=5) as s:
            fed = await s.feed("xy")
            assert fed.finished.position == s.position == 3
            stream = await s.generate(max_tokens=6, temperature=0.8)
            tokens = [t.id async for t in stream]
            assert stream.finished.position == 3 + len(tokens) == s.position
            with Client(server.target) as sync:  # same seed and tokens, same text, either client
                assert tokens == ids(sync.generate("xy", model=TINY, seed=5, max_tokens=6, temperature=0.8))

            stream = await s.generate(ignore_eos=True)
            async for _ in stream:
                await stream.cancel()
            assert stream.finished.reason == pb.FINISH_REASON_CANCELLED

            async with await s.fork() as child, await client.import_session(await s.export()) as copy:
                assert child.info.position == copy.info.position == s.position
                runs = [[t.id async for t in await x.generate(max_tokens=8)] for x in (s, child, copy)]
            assert runs[0] == runs[1] == runs[2]

            other = client.session(s.id)
            with pytest.raises(StatusError) as e:
                await other.attach()
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            await other.attach(takeover=True)
            await (await other.generate(max_tokens=2)).wait()
            with pytest.raises(StatusError) as e:
                await (await s.generate(max_tokens=1)).wait()
            assert e.value.code == grpc.StatusCode.ABORTED
            assert (await s.resume()).position == other.position
            await other.detach()
        with pytest.raises(StatusError):
            await client.get_session(s.id)


def test_detach_cancels_open_requests(client):
    with client.create_session(TINY) as s:
        stream = s.generate(ignore_eos=True)  # up to the server's limit, whatever the random model samples
        next(stream)
        s.detach()
        assert stream.wait().reason == pb.FINISH_REASON_CANCELLED
        assert not s.attached and not s.refresh().attached
        assert s.feed("a").finished.position == s.position  # feeding attaches again


async def test_async_detach_cancels_open_requests(server):
    async with AsyncClient(server.target) as client, await client.create_session(TINY) as s:
        stream = await s.generate(ignore_eos=True)
        await anext(stream)
        await s.detach()
        assert (await stream.wait()).reason == pb.FINISH_REASON_CANCELLED
        assert not s.attached and not (await s.refresh()).attached
        assert (await s.feed("a")).finished.position == s.position


def test_ignore_eos_generates_past_the_end_token(client):
    """A generation that ends at <eos> goes on past it with ignore_eos: the same tokens up to
    and including <eos> (same seed, same tokens), then more, to exactly max_tokens."""
    eos = {m.name: m for m in client.list_models()}[TINY].eos_token
    for seed in range(50):
        ended = client.generate("a", model=TINY, max_tokens=40, seed=seed)
        tokens = ids(ended)
        if ended.finished.reason == pb.FINISH_REASON_END_TOKEN:
            break
    else:
        pytest.fail("no seed in 0-49 ends at <eos> within 40 tokens: this test needs one")
    assert tokens[-1] == eos and len(tokens) < 40
    past = client.generate("a", model=TINY, max_tokens=40, seed=seed, ignore_eos=True)
    longer = ids(past)
    assert longer[: len(tokens)] == tokens
    assert (
        past.finished.reason == pb.FINISH_REASON_LENGTH
        and past.finished.generated_tokens == len(longer) == 40
    )
    with client.create_session(TINY, seed=seed) as s:  # a session's Stream call carries it too
        assert ids(s.generate("a", max_tokens=40, ignore_eos=True)) == longer
    for seed in range(8):  # whatever the seed: exactly max_tokens
        assert (
            client.generate(model=TINY, max_tokens=30, seed=seed, ignore_eos=True).wait().generated_tokens
            == 30
        )


async def test_async_ignore_eos(server):
    async with AsyncClient(server.target) as client:
        for seed in range(8):  # some of these end at <eos> without ignore_eos
            assert (
                await client.generate(model=TINY, max_tokens=30, seed=seed, ignore_eos=True).wait()
            ).generated_tokens == 30
            async with await client.create_session(TINY, seed=seed) as s:
                finished = await (await s.generate(max_tokens=30, ignore_eos=True)).wait()
                assert (finished.reason, finished.generated_tokens) == (pb.FINISH_REASON_LENGTH, 30)
