"""Batching, capacity and flow control against real servers with tight limits."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from tests.metrics_helpers import metric, scrape
from tests.stubs import LiveStream, connect, create, generate, generate_request

PROMPT = "def main():\n    "


@pytest.fixture(scope="module")
def reference(server):
    """What a roomy server generates per seed, in calls of the given lengths (a generate call
    ends at <eos>; the next one goes on after it)."""
    stub = connect(server.target)

    def tokens(seed: int, calls: tuple[int, ...] = (30,)) -> list[int]:
        session = create(stub, seed=seed)
        return [
            t
            for i, n in enumerate(calls)
            for t in generate(stub, session.id, "" if i else PROMPT, max_tokens=n)[0]
        ]

    return tokens


def test_idle_sessions_move_to_host_and_back_without_changing_tokens(start_server, reference):
    proc = start_server("--device-slots", "2", "--max-sessions", "4", "--shutdown-delay", "0")
    stub = connect(proc.target)
    seeds = (1, 2, 3, 4)
    sessions = [create(stub, seed=seed) for seed in seeds]
    locations = [stub.GetSession(pb.GetSessionRequest(session_id=s.id)).session.location for s in sessions]
    assert locations.count(pb.SESSION_LOCATION_HOST) == 2
    with pytest.raises(grpc.RpcError) as err:
        create(stub, seed=5)
    assert (
        err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "maximum of 4 sessions" in err.value.details()
    )
    # taking turns forces every session off the device and back between its two halves
    first = [generate(stub, s.id, PROMPT, max_tokens=15)[0] for s in sessions]
    second = [generate(stub, s.id, max_tokens=15)[0] for s in sessions]
    for seed, a, b in zip(seeds, first, second):
        assert a + b == reference(seed, (15, 15))
    text = scrape(proc)
    assert metric(text, "lstm_serve_sessions_moved_to_host_total", model="tiny") >= 4
    assert metric(text, "lstm_serve_sessions_moved_to_device_total", model="tiny") >= 4
    assert metric(text, "lstm_serve_sessions_rejected_total", reason="capacity") == 1


def test_more_generating_sessions_than_device_slots_all_finish_correctly(start_server, reference):
    proc = start_server("--device-slots", "3", "--max-sessions", "8", "--shutdown-delay", "0")
    stub = connect(proc.target)
    seeds = list(range(20, 28))
    sessions = [create(stub, seed=seed) for seed in seeds]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: generate(stub, s.id, PROMPT, max_tokens=30)[0], sessions))
    for seed, tokens in zip(seeds, results):
        assert tokens == reference(seed)


def test_a_long_prompt_fed_in_chunks_equals_one_token_per_step(start_server, server):
    prompt = ("import os\nprint(os.getcwd())\n" * 40)[:1000]
    chunked = connect(server.target)  # --prefill-chunk 64 (default)
    single = connect(start_server("--prefill-chunk", "1", "--shutdown-delay", "0").target)
    a = generate(chunked, create(chunked, seed=9).id, prompt, max_tokens=20)
    b = generate(single, create(single, seed=9).id, prompt, max_tokens=20)
    assert a[0] == b[0] and a[1].position == b[1].position == 1 + 1000 + 20


def test_a_full_queue_answers_resource_exhausted(start_server):
    proc = start_server("--max-queue", "1", "--shutdown-delay", "0")
    stub = connect(proc.target)
    busy = create(stub)
    live = LiveStream(stub, busy.id)
    live.send(generate_request("g", 4000))
    next(live.call)
    with pytest.raises(grpc.RpcError) as err:
        create(stub)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
    live.call.cancel()
    deadline = time.monotonic() + 10
    while True:  # the cancelled request leaves the queue
        try:
            create(stub)
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert metric(scrape(proc), "lstm_serve_sessions_rejected_total", reason="queue_full") >= 1


def test_deadline_and_disconnect_release_the_session(server):
    stub = connect(server.target)
    session = create(stub)
    # past <eos> too: 4000 tokens never end within 0.3 s, whatever the random model samples
    request = pb.GenerateRequest(session_id=session.id, max_tokens=4000, ignore_eos=True)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    live = LiveStream(stub, session.id)  # no takeover needed: the session was released
    live.send(generate_request("g", 4000))
    next(live.call)
    live.call.cancel()
    deadline = time.monotonic() + 5
    while stub.GetSession(pb.GetSessionRequest(session_id=session.id)).session.attached:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    reopened = LiveStream(stub, session.id)  # `opened` reports the position once the last step landed
    time.sleep(0.3)
    assert (
        stub.GetSession(pb.GetSessionRequest(session_id=session.id)).session.position
        == reopened.opened.position
    )
    reopened.close()


def test_requests_on_one_stream_run_in_order(server):
    stub = connect(server.target)
    session = create(stub, seed=31)
    live = LiveStream(stub, session.id)
    for i in range(5):
        live.send(generate_request(f"g{i}", 3))
    order = []
    for response in live.call:
        if response.HasField("finished"):
            order.append(response.request_id)
            if len(order) == 5:
                break
    live.close()
    assert order == [f"g{i}" for i in range(5)]
