"""The service's session semantics, against a real server on a loopback port."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server import tokenizer
from tests.metrics_helpers import metric, scrape
from tests.stubs import LiveStream, connect, create, feed_request, generate, generate_request, run_stream


@pytest.fixture(scope="module")
def stub(server):
    return connect(server.target)


def test_list_models_describes_both_cells(stub, server):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"tiny", "tiny-rnn"}
    assert models["tiny"].cell == pb.CELL_LSTM and models["tiny"].layers == 2 and models["tiny"].hidden == 48
    assert models["tiny-rnn"].cell == pb.CELL_RNN and models["tiny-rnn"].hidden == 40
    assert len(models["tiny"].version) == 64 and models["tiny"].backend == "torch"
    assert (models["tiny"].bos_token, models["tiny"].eos_token, models["tiny"].vocab_size) == (256, 257, 258)


def test_a_new_session_has_absorbed_bos_and_keeps_its_seed(stub):
    session = create(stub, seed=123)
    assert session.position == 1 and session.seed == 123 and len(session.id) == 32
    drawn = create(stub, seed=None)
    assert drawn.seed != 0 and drawn.position == 1
    got = stub.GetSession(pb.GetSessionRequest(session_id=session.id)).session
    assert got.id == session.id and got.location == pb.SESSION_LOCATION_DEVICE
    assert got.expires_at.ToSeconds() > got.created_at.ToSeconds()


def test_generation_is_reproducible_and_positions_count_every_token(stub):
    a, b = create(stub, seed=99), create(stub, seed=99)
    tokens_a, fin_a = generate(stub, a.id, "def f(", max_tokens=30)
    tokens_b, fin_b = generate(stub, b.id, "def f(", max_tokens=30)
    assert tokens_a == tokens_b and len(tokens_a) == fin_a.generated_tokens
    assert fin_a.fed_tokens == 6 and fin_a.position == 1 + 6 + len(tokens_a) == fin_b.position
    assert fin_a.reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_END_TOKEN)
    other, _ = generate(stub, create(stub, seed=100).id, "def f(", max_tokens=30)
    assert other != tokens_a


def test_text_pieces_are_whole_characters_and_positions_step_by_one(stub):
    session = create(stub, seed=5)
    request = pb.GenerateRequest(session_id=session.id, prompt=pb.Input(text="机器"), max_tokens=60)
    responses = list(stub.Generate(request))
    tokens = [r.token for r in responses if r.HasField("token")]
    assert [t.position for t in tokens] == list(range(1 + 6 + 1, 1 + 6 + 1 + len(tokens)))
    assert "".join(t.text for t in tokens) == tokenizer.decode([t.id for t in tokens])
    for t in tokens:
        assert len(t.text) <= 2 and t.logprob <= 0


def generated_ids(responses, request_id: str = "g") -> list[int]:
    return [r.token.id for r in responses if r.HasField("token") and r.request_id == request_id]


def test_two_stream_calls_give_the_same_tokens_as_one_long_call(stub):
    one, two = create(stub, seed=42), create(stub, seed=42)
    long = run_stream(stub, one.id, [feed_request("f", "import "), generate_request("g", 40)])
    first = run_stream(stub, two.id, [feed_request("f", "import "), generate_request("g", 25)])
    second = run_stream(stub, two.id, [generate_request("g", 15)])
    assert generated_ids(long) == generated_ids(first) + generated_ids(second)
    assert second[-1].finished.position == long[-1].finished.position == 1 + 7 + 40


def test_fork_continues_exactly_as_the_parent_from_the_fork_point(stub):
    parent = create(stub, seed=11)
    generate(stub, parent.id, "class ", max_tokens=10)
    fork = stub.ForkSession(pb.ForkSessionRequest(session_id=parent.id)).session
    parent_now = stub.GetSession(pb.GetSessionRequest(session_id=parent.id)).session
    assert fork.position == parent_now.position and fork.seed == parent.seed and fork.id != parent.id
    parent_continuation, _ = generate(stub, parent.id, max_tokens=20)
    generate(stub, parent.id, "more", max_tokens=5)  # the parent moves on; the fork is unaffected
    fork_continuation, _ = generate(stub, fork.id, max_tokens=20)
    assert fork_continuation == parent_continuation


def test_reset_returns_to_a_new_sessions_state(stub):
    session = create(stub, seed=3)
    fresh, _ = generate(stub, create(stub, seed=3).id, max_tokens=12)
    generate(stub, session.id, "something else", max_tokens=7)
    reset = stub.ResetSession(pb.ResetSessionRequest(session_id=session.id)).session
    assert reset.position == 1 and reset.seed == 3
    assert generate(stub, session.id, max_tokens=12)[0] == fresh


def test_export_and_import_into_a_fresh_server_continue_identically(stub, server, start_server):
    session = create(stub, seed=8)
    generate(stub, session.id, "for i in ", max_tokens=9)
    exported = stub.ExportSession(pb.ExportSessionRequest(session_id=session.id))
    assert exported.session.position == 1 + 9 + 9
    expected, _ = generate(stub, session.id, max_tokens=25)

    other = start_server("--shutdown-delay", "0")
    other_stub = connect(other.target)
    imported = other_stub.ImportSession(pb.ImportSessionRequest(blob=exported.blob)).session
    assert imported.position == exported.session.position and imported.seed == 8 and imported.id != session.id
    assert generate(other_stub, imported.id, max_tokens=25)[0] == expected


def test_delete_and_list_sessions(stub):
    session = create(stub)
    assert session.id in {s.id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions}
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.id))
    assert session.id not in {s.id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions}
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSession(pb.GetSessionRequest(session_id=session.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_temporary_session_generate_cleans_up(stub):
    before = len(stub.ListSessions(pb.ListSessionsRequest()).sessions)
    request = pb.GenerateRequest(model="tiny", prompt=pb.Input(text="x = "), max_tokens=8, seed=4)
    responses = list(stub.Generate(request))
    assert responses[-1].finished.generated_tokens == 8 and responses[0].session_id
    assert len(stub.ListSessions(pb.ListSessionsRequest()).sessions) == before
    again = [r.token.id for r in stub.Generate(request) if r.HasField("token")]
    assert again == [r.token.id for r in responses if r.HasField("token")]


def test_feed_returns_logprobs_and_top_alternatives(stub):
    session = create(stub)
    responses = run_stream(stub, session.id, [feed_request("f", "ab", return_logprobs=True, top_logprobs=3)])
    tokens = [r.token for r in responses if r.HasField("token")]
    assert [t.id for t in tokens] == [97, 98] and [t.position for t in tokens] == [2, 3]
    assert all(len(t.top_logprobs) == 3 and t.logprob < 0 for t in tokens)
    top = tokens[0].top_logprobs
    assert top[0].logprob >= top[1].logprob >= top[2].logprob
    assert responses[-1].finished.reason == pb.FINISH_REASON_FED and responses[-1].finished.fed_tokens == 2


def test_stop_sequences_and_greedy_decoding(stub):
    session = create(stub)
    greedy, _ = generate(stub, session.id, "a", max_tokens=40, temperature=0.0)
    text = tokenizer.decode(greedy)
    stop = text[5:7]
    assert stop and "\ufffd" not in stop
    again = create(stub, seed=1234)  # greedy ignores the seed
    tokens, finished = generate(stub, again.id, "a", max_tokens=40, temperature=0.0, stop=[stop])
    assert finished.reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert tokenizer.decode(tokens).endswith(stop) and tokens == greedy[: len(tokens)]


def test_cancel_stops_a_running_generation_at_the_next_step(stub):
    session = create(stub)
    live = LiveStream(stub, session.id)
    live.send(generate_request("g", 4000))
    first = next(live.call)
    assert first.request_id == "g" and first.HasField("token")
    live.send(pb.StreamRequest(request_id="c", cancel=pb.CancelRequest(target_request_id="g")))
    tokens, finished = live.until_finished("g")
    assert finished.reason == pb.FINISH_REASON_CANCELLED and finished.generated_tokens < 4000
    assert finished.generated_tokens == 1 + len(tokens)
    live.close()
    assert stub.GetSession(pb.GetSessionRequest(session_id=session.id)).session.position == finished.position


def test_an_elman_rnn_checkpoint_serves_too(stub):
    session = create(stub, model="tiny-rnn", seed=2)
    tokens, finished = generate(stub, session.id, "print(", max_tokens=20)
    assert len(tokens) == finished.generated_tokens > 0 and session.model == "tiny-rnn"
    assert generate(stub, create(stub, model="tiny-rnn", seed=2).id, "print(", max_tokens=20)[0] == tokens


def batches_above(scraped: str, rows: int) -> float:
    """Scheduler iterations of more than `rows` sessions (a bucket bound) in a scrape."""
    total = metric(scraped, "lstm_serve_batch_size_rows_count", model="tiny")
    return total - metric(scraped, "lstm_serve_batch_size_rows_bucket", model="tiny", le=f"{rows:.1f}")


def test_64_concurrent_sessions_get_their_solo_tokens_in_big_batches(stub, server):
    # 300 tokens past <eos>: long enough that the 64 calls overlap however their threads start
    # (with 40 tokens that could stop at <eos>, a fast engine finished sessions before the last
    # ones began, and no batch passed 32 rows)
    def run(session_id: str) -> list[int]:
        return generate(stub, session_id, "x", max_tokens=300, ignore_eos=True)[0]

    seeds = list(range(500, 564))
    solo = {seed: run(create(stub, seed=seed).id) for seed in seeds[:8]}
    before = scrape(server)
    sessions = [create(stub, seed=seed) for seed in seeds]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda s: run(s.id), sessions))
    for seed, tokens in zip(seeds, results):
        if seed in solo:
            assert tokens == solo[seed]
    # every session alone again, after the crowd: identical
    for seed, tokens in list(zip(seeds, results))[8:16]:
        assert run(create(stub, seed=seed).id) == tokens
    assert batches_above(scrape(server), 32) - batches_above(before, 32) > 0, (
        "no batch of more than 32 rows was recorded"
    )


def test_health_serving_after_load_and_not_serving_during_the_shutdown_delay(start_server):
    from grpc_health.v1 import health_pb2

    proc = start_server("--shutdown-delay", "3")
    assert proc.health() == health_pb2.HealthCheckResponse.SERVING
    assert proc.health("lstmserve.v1.LstmServeService") == health_pb2.HealthCheckResponse.SERVING
    stub = connect(proc.target)
    session = create(stub)
    live = LiveStream(stub, session.id)
    live.send(generate_request("g", 3))
    live.until_finished("g")
    proc.proc.terminate()
    import time

    deadline = time.monotonic() + 2
    while proc.health() != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stub.ListModels(pb.ListModelsRequest()).models  # still answered during the delay
    with pytest.raises(grpc.RpcError) as err:
        next(live.call)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and f"position {1 + 3}" in err.value.details()
    assert proc.proc.wait(30) == 0
