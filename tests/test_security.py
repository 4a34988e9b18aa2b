"""Safe defaults against a real server: loopback unless asked, warnings when exposed, prompt
size checked before it costs memory, a cap on one session's queued requests, and another
API key's sessions out of reach."""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import pytest
import yaml

from client import Client, ClientOptions, StatusError
from server.config import ServeSettings, exposure_warnings, is_loopback
from tests.metrics_helpers import metric, scrape
from tests.stubs import connect, feed_request, run_stream

TINY = "tiny"
NO_KEYS_WARNING = "beyond loopback, without --api-keys-file"
CLEAR_KEYS_WARNING = "API keys travel unencrypted"
MiB = 1024 * 1024


def client_of(server, name: str) -> Client:
    return Client(server.target, ClientOptions(api_key=server.keys[name]))


def status_of(fn, *args, **kwargs) -> StatusError:
    """The StatusError `fn` raises (draining a returned stream)."""
    with pytest.raises(StatusError) as e:
        result = fn(*args, **kwargs)
        if hasattr(result, "wait"):
            result.wait()
    return e.value


# ---- listening ----------------------------------------------------------------------------


def test_the_default_host_is_loopback():
    assert ServeSettings.model_fields["host"].default == "127.0.0.1"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("::", False),
        ("[::]", False),
        ("10.1.2.3", False),
        ("example.com", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_exposure_warnings_need_keys_and_then_tls(tmp_path):
    keys = {"api_keys_file": tmp_path / "keys.yaml"}
    tls = {"tls_cert": tmp_path / "cert.pem", "tls_key": tmp_path / "key.pem"}
    assert exposure_warnings(ServeSettings(host="127.0.0.1")) == []
    assert exposure_warnings(ServeSettings(host="127.0.0.1", **keys)) == []  # keys stay on this machine
    assert NO_KEYS_WARNING in " ".join(exposure_warnings(ServeSettings(host="0.0.0.0", **tls)))
    assert CLEAR_KEYS_WARNING in " ".join(exposure_warnings(ServeSettings(host="0.0.0.0", **keys)))
    assert exposure_warnings(ServeSettings(host="0.0.0.0", **keys, **tls)) == []


def test_compose_publishes_on_loopback_and_the_image_listens_on_every_interface():
    root = Path(__file__).resolve().parent.parent
    services = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    ports = [port for service in services.values() for port in service.get("ports", [])]
    assert len(ports) == 4 and all(port.startswith("${PUBLISH_HOST:-127.0.0.1}:") for port in ports), ports
    assert "LSTM_SERVE_HOST=0.0.0.0" in (root / "Dockerfile").read_text()  # published ports reach the server


def log_line(server, text: str, timeout: float = 5) -> str:
    """The server's log line containing `text` (its output is read by a thread: wait a little)."""
    deadline = time.monotonic() + timeout
    while not (lines := [line for line in server.output if text in line]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lines) == 1, f"{text!r} should be logged once:\n{server.log}"
    return lines[0]


def test_a_server_listening_beyond_loopback_warns_in_its_log(start_server, auth_server, tmp_path):
    open_server = start_server(
        "--host", "0.0.0.0", "--shutdown-delay", "0"
    )  # a later --host wins over the fixture's
    assert open_server.target.startswith("0.0.0.0:")
    warning = log_line(open_server, NO_KEYS_WARNING)
    assert (
        " WARNING " in warning and "--api-keys-file" in warning and CLEAR_KEYS_WARNING not in open_server.log
    )

    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"- name: alice\n  sha256: '{'0' * 64}'\n")
    keyed = start_server("--host", "0.0.0.0", "--shutdown-delay", "0", "--api-keys-file", str(keys_file))
    warning = log_line(keyed, CLEAR_KEYS_WARNING)
    assert " WARNING " in warning and "--tls-cert" in warning and NO_KEYS_WARNING not in keyed.log

    assert NO_KEYS_WARNING not in auth_server.log and CLEAR_KEYS_WARNING not in auth_server.log  # loopback


# ---- prompt size --------------------------------------------------------------------------


def memory_kib(pid: int, field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)[1])


def peak_growth_mib(pid: int, call) -> float:
    """How far the process's peak RSS rises above its RSS while `call()` runs."""
    try:  # reset the peak to the current RSS, so earlier peaks cannot hide this one
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        before = memory_kib(pid, "VmRSS")
    except OSError:  # an older kernel, or not allowed: the peak so far
        before = memory_kib(pid, "VmHWM")
    call()
    return (memory_kib(pid, "VmHWM") - before) / 1024


@pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc"
)
def test_a_60_mib_prompt_is_refused_before_it_costs_memory(auth_server):
    """gRPC itself holds about three copies of a message while receiving it (its buffer, a
    bytearray, the bytes): the server adds no parsed copy, text or token list."""
    stub = connect(
        auth_server.target, auth_server.keys["alice"]
    )  # a Stream feed without the client's token history
    prompt = "a" * (60 * MiB)  # under the 64 MiB message limit of both sides

    def generate() -> None:
        error = status_of(alice.generate, prompt, model=TINY, max_tokens=1)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "split the prompt" in error.details

    def feed() -> None:
        with pytest.raises(grpc.RpcError) as e:
            run_stream(stub, session.id, [feed_request("f", prompt)])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "split the prompt" in e.value.details()

    with client_of(auth_server, "alice") as alice, alice.create_session(TINY) as session:
        alice.generate("warm up", model=TINY, max_tokens=2).wait()
        for call in (generate, feed):
            grown = peak_growth_mib(auth_server.proc.pid, call)
            assert grown < 200, f"{call.__name__}: the server's peak RSS grew by {grown:.0f} MiB"
        assert session.refresh().position == 1  # nothing was fed


def test_prompt_limits_count_utf8_bytes(auth_server):
    with client_of(auth_server, "alice") as alice:
        for prompt, words in (
            ("x" * 9000, "has 9000 tokens"),
            ("é" * 9000, "has at least 9000 tokens"),
            ("é" * 5000, "has 10000 tokens"),
            ([65] * 9000, "has 9000 tokens"),
        ):
            error = status_of(alice.generate, prompt, model=TINY, max_tokens=1)
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT and words in error.details
            assert "the limit is 8192" in error.details
        assert alice.generate("é" * 4096, model=TINY, max_tokens=1).wait().fed_tokens == 8192


# ---- queued requests per session -----------------------------------------------------------


def rejected(server) -> float:
    return metric(scrape(server), "lstm_serve_sessions_rejected_total", reason="session_queue_full")


@pytest.mark.parametrize(
    ("key", "cap", "words"),
    [
        ("alice", 16, "--max-queued-per-session"),  # the server's default
        ("queued", 2, "max_queued_requests"),  # the key's own, lower cap
    ],
)
def test_one_session_cannot_queue_more_than_its_cap(auth_server, key, cap, words):
    counted = rejected(auth_server)
    with (
        client_of(auth_server, key) as c,
        c.create_session(TINY, seed=1) as busy,
        c.create_session(TINY, seed=2) as other,
    ):
        # each runs to the server's token limit, and nothing is read: all stay queued or running
        streams = [busy.generate(ignore_eos=True) for _ in range(cap)]
        # meanwhile another session of the same key is served as usual
        assert other.generate("hi", max_tokens=5, ignore_eos=True).wait().generated_tokens == 5
        one_too_many = busy.generate(max_tokens=1)
        error = status_of(one_too_many.wait)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert f"already has {cap} requests queued or running" in error.details and words in error.details
        assert status_of(streams[0].wait).code == grpc.StatusCode.RESOURCE_EXHAUSTED  # the whole stream ended
        assert rejected(auth_server) == counted + 1
        # the refused stream ended; the session goes on
        busy.resume()
        assert busy.generate(max_tokens=3, ignore_eos=True).wait().generated_tokens == 3
        assert other.generate(max_tokens=3, ignore_eos=True).wait().generated_tokens == 3


# ---- other keys' sessions ------------------------------------------------------------------


def test_another_keys_session_is_not_found_for_every_call(auth_server):
    with client_of(auth_server, "alice") as alice, client_of(auth_server, "bob") as bob:
        with alice.create_session(TINY, seed=3) as mine:
            mine.feed("mine")
            mine.detach()
            for call in (
                bob.fork_session,
                bob.export_session,
                bob.reset_session,
                bob.get_session,
                bob.delete_session,
            ):
                error = status_of(call, mine.id)
                assert (
                    error.code == grpc.StatusCode.NOT_FOUND
                    and error.details == f"session {mine.id} not found"
                )
            for takeover in (False, True):
                error = status_of(bob.generate, "x", session_id=mine.id, max_tokens=1, takeover=takeover)
                assert error.code == grpc.StatusCode.NOT_FOUND
                error = status_of(bob.session(mine.id).attach, takeover=takeover)
                assert error.code == grpc.StatusCode.NOT_FOUND
            info = alice.get_session(mine.id)
            assert (info.position, info.attached) == (5, False)  # untouched
            assert {s.id for s in bob.list_sessions()}.isdisjoint({mine.id})


def test_generate_on_a_session_with_another_model_is_invalid(auth_server):
    with client_of(auth_server, "alice") as alice, alice.create_session(TINY, seed=4) as session:
        session_id = session.id
        session.detach()
        for model in ("tiny-rnn", "no-such-model"):
            error = status_of(alice.generate, "x", session_id=session_id, model=model, max_tokens=1)
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert f"runs model 'tiny', not '{model}': omit model, or give 'tiny'" in error.details
        assert alice.get_session(session_id).position == 1  # nothing was fed
        for model in ("", TINY):  # no model, or the session's own
            finished = alice.generate(
                "x", session_id=session_id, model=model, max_tokens=1, ignore_eos=True
            ).wait()
            assert finished.generated_tokens == 1
        assert alice.get_session(session_id).position == 5
