"""Client parts that need no server: options, retry config, rendering, statistics, CLI usage."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from client import AsyncTokenStream, Client, ClientOptions, StatusError, TokenStream
from client.bench import BenchConfig, BenchResult, _Run, percentile, report
from client.cli import build_parser
from client.errors import SessionDataLostError
from client.history import KEEP, TokenHistory
from client.lstmserve.v1 import lstm_serve_pb2 as pb
from client.messages import finish_reason_name, make_input, make_sampling
from client.options import IDEMPOTENT_METHODS, SERVICE, service_config
from client.render import session_dict, table

ROOT = Path(__file__).resolve().parent.parent


def lstm_client(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retry_policy_covers_exactly_the_idempotent_calls():
    (config,) = json.loads(service_config(5))["methodConfig"]
    methods = {n["method"] for n in config["name"] if n["service"] == SERVICE}
    assert methods == set(IDEMPOTENT_METHODS)
    assert not methods & {"CreateSession", "ForkSession", "ImportSession", "Generate", "Stream"}
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["retryPolicy"]["maxAttempts"] == 5
    assert "retryPolicy" not in json.loads(service_config(1))["methodConfig"][0]


def test_channel_arguments_and_metadata():
    options = ClientOptions(api_key="k", keepalive_time=30, max_message_bytes=1234, tls_server_name="example")
    args = dict(options.channel_args())
    assert args["grpc.keepalive_time_ms"] == 30_000 and args["grpc.max_receive_message_length"] == 1234
    assert args["grpc.ssl_target_name_override"] == "example" and "grpc.service_config" in args
    assert options.metadata() == (("authorization", "Bearer k"),)
    assert ClientOptions().metadata() == () and not ClientOptions().secure
    assert ClientOptions(ca_cert=b"pem").secure and "grpc.keepalive_time_ms" not in dict(
        ClientOptions().channel_args()
    )


def test_request_builders():
    assert make_input("hé").text == "hé" and list(make_input([1, 256]).tokens.ids) == [1, 256]
    default = make_sampling(None, 0, None)
    assert not default.HasField("temperature") and not default.HasField("top_p")
    greedy = make_sampling(0.0, 5, 0.9)
    assert greedy.HasField("temperature") and greedy.temperature == 0.0 and greedy.top_k == 5
    assert finish_reason_name(pb.FINISH_REASON_STOP_SEQUENCE) == "stop_sequence"


class CancelledCall(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "Locally cancelled by application!"


def test_token_stream_collects_tokens_and_ends_quietly_when_cancelled():
    def responses():
        yield pb.GenerateResponse(token=pb.Token(id=104, text="h", position=2), session_id="s1")
        yield pb.GenerateResponse(token=pb.Token(id=105, text="i", position=3), session_id="s1")
        raise CancelledCall()

    stream = TokenStream(responses(), cancel=lambda: None)
    assert next(stream).text == "h" and stream.session_id == "s1"
    stream.cancel()
    assert [t.text for t in stream] == ["i"] and stream.text == "hi" and stream.position == 3
    assert stream.finished is None

    failing = TokenStream(responses(), cancel=lambda: None)  # not cancelled by us: an error
    with pytest.raises(StatusError) as e:
        list(failing)
    assert e.value.code == grpc.StatusCode.CANCELLED and e.value.words == "cancelled"


def test_percentiles_interpolate_like_numpy():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0


def test_bench_report_fields():
    result = BenchResult(
        BenchConfig(model="tiny", sessions=2),
        elapsed_s=2.0,
        requests=3,
        tokens=10,
        ttft_s=[0.01, 0.02],
        itl_s=[0.001] * 8,
    )
    result.errors["UNAVAILABLE"] += 1
    d = result.to_dict()
    assert d["tokens_per_s"] == 5.0 and d["errors"] == {"UNAVAILABLE": 1}
    assert set(d["ttft_ms"]) == set(d["itl_ms"]) == {"p50", "p95", "p99"}
    assert d["itl_ms"]["p99"] == pytest.approx(1.0)
    assert BenchResult(BenchConfig(model="tiny")).to_dict()["ttft_ms"]["p50"] is None
    assert d["stream_interval"] == 1 and "stream_interval" in report(result)
    assert BenchResult(BenchConfig(model="tiny", stream_interval=0)).to_dict()["stream_interval"] == 1
    assert BenchResult(BenchConfig(model="tiny", stream_interval=4)).to_dict()["stream_interval"] == 4
    assert "UNAVAILABLE 1" in report(result) and "time to first token" in report(result)


def test_render():
    info = pb.Session(id="abc", model="tiny", position=7, seed=3, location=pb.SESSION_LOCATION_HOST)
    d = session_dict(info)
    assert (d["id"], d["position"], d["seed"], d["location"], d["created_at"]) == ("abc", 7, 3, "host", None)
    assert session_dict(pb.Session(location=pb.SESSION_LOCATION_STORE))["location"] == "store"
    assert table(["A", "BB"], [["xxx", 1]]).splitlines() == ["A    BB", "xxx  1"]


def test_global_options_go_before_or_after_the_command(monkeypatch):
    monkeypatch.setenv("LSTM_CLIENT_TARGET", "env-host:1")
    monkeypatch.setenv("LSTM_CLIENT_API_KEY", "env-key")
    args = build_parser().parse_args(["sessions", "list"])
    assert (args.target, args.api_key, args.json) == ("env-host:1", "env-key", False)
    args = build_parser().parse_args(
        ["--json", "sessions", "show", "ID", "--target", "h:2", "--timeout", "3"]
    )
    assert (args.target, args.json, args.timeout, args.session_id) == ("h:2", True, 3.0, "ID")


def test_unreachable_server_is_one_line_and_exit_1():
    result = lstm_client("--target", f"127.0.0.1:{closed_port()}", "--timeout", "10", "models")
    assert result.returncode == 1
    assert result.stderr.startswith("lstm-client: unavailable") and result.stderr.count("\n") == 1
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--session", "ID", "--seed", "1", "x"],
        ["generate", "--session", "ID", "--new-session"],
        ["bench", "--max-tokens", "0"],
        ["bench", "--stream-interval", "-1"],
        ["generate", "--stream-interval", "four", "x"],
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2(args):
    result = lstm_client("--target", f"127.0.0.1:{closed_port()}", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_missing_files_are_one_line_and_exit_1(tmp_path):
    result = lstm_client("--ca-cert", str(tmp_path / "missing.pem"), "models")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "missing.pem" in result.stderr
    result = lstm_client(
        "--target", f"127.0.0.1:{closed_port()}", "sessions", "import", str(tmp_path / "missing.blob")
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1


@pytest.fixture
def tls_health_server(tmp_path):
    """A TLS endpoint serving only the standard health service, with a self-signed certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=lstm-test",
            "-addext",
            "subjectAltName=DNS:lstm-test",
        ],
        check=True,
        capture_output=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    )
    server.start()
    yield f"127.0.0.1:{port}", cert
    server.stop(None)


def test_tls_with_a_ca_certificate(tls_health_server):
    target, cert = tls_health_server
    with Client(target, ClientOptions(ca_cert=cert, tls_server_name="lstm-test", retry_attempts=1)) as client:
        assert client.health() == "SERVING"
    with (
        Client(target, ClientOptions(tls=True, timeout=5, retry_attempts=1)) as client,
        pytest.raises(StatusError) as e,
    ):
        client.health()  # the system's roots do not trust it
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    result = lstm_client(
        "--target", target, "--ca-cert", str(cert), "--tls-server-name", "lstm-test", "health"
    )
    assert result.returncode == 0 and result.stdout == "SERVING\n"
    result = lstm_client("--target", target, "--timeout", "5", "health")  # plaintext to a TLS port
    assert result.returncode == 1 and result.stderr.count("\n") == 1


def test_token_history_tracks_what_resume_needs():
    def token(rid: str, token_id: int, position: int, durable: int) -> pb.StreamResponse:
        return pb.StreamResponse(
            request_id=rid, token=pb.Token(id=token_id, position=position, durable_position=durable)
        )

    def finished(rid: str, fed: int, position: int, durable: int) -> pb.StreamResponse:
        return pb.StreamResponse(
            request_id=rid, finished=pb.Finished(fed_tokens=fed, position=position, durable_position=durable)
        )

    history = TokenHistory(pb.Session(id="s", position=1, durable_position=0))
    history.sent(pb.StreamRequest(request_id="1", feed=pb.FeedRequest(input=make_input("ab"))))
    history.sent(pb.StreamRequest(request_id="2", generate=pb.GenerateTokensRequest(max_tokens=2)))
    history.received(finished("1", 2, 3, 1))  # the feed's tokens (97, 98) at positions 2 and 3
    history.received(token("2", 7, 4, 1))
    history.received(token("2", 8, 5, 2))  # durable up to 2: positions 3-5 are kept
    assert (history.position, history.durable, history.end) == (5, 2, 5)
    assert history.reconcile("s", pb.Session(position=2, durable_position=2)) == ([98, 7, 8], None)  # behind

    history.sent(pb.StreamRequest(request_id="3", feed=pb.FeedRequest(input=make_input([98, 7, 8]))))
    history.received(finished("3", 3, 5, 2))
    history.sent(pb.StreamRequest(request_id="4", feed=pb.FeedRequest(input=make_input("xyz"))))
    history.received(finished("4", 1, 6, 3))  # cancelled after one token: only "x" was absorbed
    assert history.end == 6
    assert history.reconcile("s", pb.Session(position=9, durable_position=9)) == (
        [],
        6,
    )  # ahead: fetch after 6
    history.caught_up(6, [1, 2, 3])
    assert (history.position, history.end) == (9, 9)
    history.received(token("4", 9, 10, 9))  # durable up to 9: only position 10 is kept
    with pytest.raises(SessionDataLostError) as e:
        history.reconcile("s", pb.Session(position=8, durable_position=8))
    assert (e.value.position, e.value.known_from) == (8, 9) and "positions 9-9 are lost" in str(e.value)

    unlogged = TokenHistory(
        pb.Session(position=1)
    )  # no durable position ever: the last KEEP+ tokens are kept
    for position in range(2, 3 * KEEP + 2):
        unlogged.received(token("g", 1, position, 0))
    with pytest.raises(SessionDataLostError) as e:
        unlogged.reconcile("s", pb.Session(position=1))
    assert KEEP <= 3 * KEEP + 1 - e.value.known_from <= 2 * KEEP

    handle = TokenHistory(None)  # a handle by id knows nothing: resume just attaches
    assert handle.reconcile("s", pb.Session(position=42)) == ([], None) and handle.end == 42


def batch(*tokens: tuple[int, int], durable: int = 0) -> pb.TokenBatch:
    """A `tokens` event's batch of (id, position)."""
    return pb.TokenBatch(
        tokens=[pb.Token(id=i, text=chr(i), position=p, durable_position=durable) for i, p in tokens]
    )


def test_token_stream_yields_a_batchs_tokens_one_by_one():
    def responses():
        yield pb.GenerateResponse(tokens=batch((104, 2), (105, 3), (106, 4)), session_id="s1")
        yield pb.GenerateResponse(tokens=batch((107, 5)), session_id="s1")
        yield pb.GenerateResponse(finished=pb.Finished(generated_tokens=4, position=5), session_id="s1")

    stream = TokenStream(responses(), cancel=lambda: None)
    assert next(stream).text == "h"
    assert stream.text == "hij" and stream.position == 4  # the whole message has arrived
    assert [t.position for t in stream] == [3, 4, 5] and stream.finished.position == 5
    assert list(stream) == [] and stream.text == "hijk" and stream.session_id == "s1"

    def cut():
        yield pb.GenerateResponse(tokens=batch((104, 2), (105, 3)))
        raise CancelledCall()

    cancelled = TokenStream(cut(), cancel=lambda: None)
    next(cancelled)
    cancelled.cancel()
    assert [t.id for t in cancelled] == [105] and cancelled.finished is None  # the rest, then quietly
    failing = TokenStream(cut(), cancel=lambda: None)
    assert [next(failing).id, next(failing).id] == [104, 105]  # a message's tokens come before an error
    with pytest.raises(StatusError):
        next(failing)


async def test_async_token_stream_yields_a_batchs_tokens_one_by_one():
    async def responses():
        yield pb.StreamResponse(tokens=batch((104, 2), (105, 3)))
        yield pb.StreamResponse(tokens=pb.TokenBatch())  # an empty batch yields nothing
        yield pb.StreamResponse(token=pb.Token(id=106, text="j", position=4))
        yield pb.StreamResponse(finished=pb.Finished(generated_tokens=3, position=4))

    async def cancel() -> None:
        pass

    stream = AsyncTokenStream(responses(), cancel)
    assert (await anext(stream)).id == 104 and len(stream.tokens) == 2
    assert [t.id async for t in stream] == [105, 106] and stream.finished.position == 4


def test_token_history_counts_a_batch_as_all_its_tokens():
    history = TokenHistory(pb.Session(id="s", position=3, durable_position=3))
    history.sent(pb.StreamRequest(request_id="1", generate=pb.GenerateTokensRequest(stream_interval=4)))
    history.received(
        pb.StreamResponse(request_id="1", tokens=batch((7, 4), (8, 5), (9, 6), (10, 7), durable=3))
    )
    history.received(pb.StreamResponse(request_id="1", tokens=batch((11, 8), (12, 9), durable=5)))
    assert (history.position, history.durable, history.end) == (9, 5, 9)  # positions 6-9 are kept
    assert history.reconcile("s", pb.Session(position=5, durable_position=5)) == ([9, 10, 11, 12], None)
    history.received(pb.StreamResponse(request_id="2", tokens=batch((9, 6), (10, 7), (11, 8), (12, 9))))
    assert history.reconcile("s", pb.Session(position=12, durable_position=5)) == ([], 9)  # ahead
    history.caught_up(9, [13, 14, 15])
    assert (history.position, history.end) == (12, 12)
    history.received(pb.StreamResponse(request_id="3", tokens=pb.TokenBatch()))  # nothing: nothing changes
    assert (history.position, history.end) == (12, 12)


async def test_bench_times_a_batchs_tokens_at_their_message():
    """A token arrives with its message: the first message is the time to first token, and the
    other tokens of a message are 0 ms after the one before."""
    gap = 0.05

    class Session:
        async def generate(self, prompt, *, max_tokens, stream_interval, **sampling):
            async def responses():
                for start in range(0, max_tokens, stream_interval):
                    await asyncio.sleep(gap)
                    positions = range(start + 2, min(start + stream_interval, max_tokens) + 2)
                    yield pb.StreamResponse(tokens=batch(*((97, p) for p in positions)))
                yield pb.StreamResponse(finished=pb.Finished(generated_tokens=max_tokens))

            async def cancel() -> None:
                pass

            return AsyncTokenStream(responses(), cancel)

    run = _Run(None, BenchConfig(model="m", max_tokens=10, tokens=10, stream_interval=4))  # type: ignore[arg-type]
    await run.request(Session())  # type: ignore[arg-type]
    result = run.result
    assert (result.requests, result.tokens, len(result.ttft_s), len(result.itl_s)) == (1, 10, 1, 9)
    assert result.ttft_s[0] >= gap
    spanning = [i for i, v in enumerate(result.itl_s) if v > 0]  # 4,4,2: gaps 4 and 8 span messages
    assert spanning == [3, 7] and all(result.itl_s[i] >= gap * 0.9 for i in spanning)
