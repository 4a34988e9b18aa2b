"""`lstm-client` against a real server, run as a subprocess the way a user or a script would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from client import Client, TokenStream
from client.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny"
LSTM_CLIENT = [sys.executable, "-m", "client.cli"]


def lstm_client(
    target: str, *args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LSTM_CLIENT, "--target", target, *args],
        cwd=ROOT,
        input=input,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], returncode: int = 1) -> str:
    """A failed command: the exit code, and one line on stderr naming the problem."""
    assert result.returncode == returncode, (result.returncode, result.stderr)
    assert result.stderr.startswith("lstm-client: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def ids(stream: TokenStream) -> list[int]:
    return [t.id for t in stream]


def session_ids(target: str) -> set[str]:
    with Client(target) as client:
        return {s.id for s in client.list_sessions()}


def test_health_and_models(server):
    assert ok(lstm_client(server.target, "health")) == "SERVING\n"
    assert json.loads(
        ok(lstm_client(server.target, "health", "--json", "--service", "lstmserve.v1.LstmServeService"))
    ) == {"status": "SERVING"}
    assert "not found" in one_line_error(lstm_client(server.target, "health", "--service", "no.such.Service"))
    table = ok(lstm_client(server.target, "models"))
    assert table.startswith("NAME") and TINY in table and "tiny-rnn" in table
    models = {m["name"]: m for m in json.loads(ok(lstm_client(server.target, "--json", "models")))}
    assert models[TINY]["cell"] == "lstm" and models["tiny-rnn"]["cell"] == "rnn"


def test_generate_prints_the_first_piece_before_the_last_token_is_generated(server):
    n = 300  # all of them, whatever the random model samples (a random seed)
    proc = subprocess.Popen(
        [
            *LSTM_CLIENT,
            "--target",
            server.target,
            "generate",
            "--new-session",
            "--model",
            TINY,
            "--max-tokens",
            str(n),
            "--ignore-eos",
            "hello",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    with Client(server.target) as client:
        session_id = proc.stderr.readline().decode().strip()  # printed before generating
        first = proc.stdout.read(1)
        while_generating = client.get_session(session_id).position
        proc.communicate(timeout=60)
        assert proc.returncode == 0 and first
        after = client.get_session(session_id).position
        assert while_generating < after == 1 + len("hello") + n
        client.delete_session(session_id)


def test_generate_new_session_then_continue_it(server):
    result = lstm_client(
        server.target,
        "generate",
        "--new-session",
        "--model",
        TINY,
        "--seed",
        "7",
        "--max-tokens",
        "5",
        "--json",
        "ab",
    )
    events = jsonl(ok(result))
    session_id = result.stderr.strip()
    first = events[-1]["finished"]
    assert events[-1]["session_id"] == session_id and all("token" in e for e in events[:-1])
    assert first["generated_tokens"] == len(events) - 1 and first["position"] == 3 + first["generated_tokens"]

    events = jsonl(
        ok(lstm_client(server.target, "generate", "--session", session_id, "--max-tokens", "3", "--json"))
    )
    second = events[-1]["finished"]
    assert second["position"] == first["position"] + second["generated_tokens"]
    assert (
        json.loads(ok(lstm_client(server.target, "--json", "sessions", "show", session_id)))["position"]
        == second["position"]
    )
    ok(lstm_client(server.target, "sessions", "delete", session_id))


def test_generate_is_reproducible_and_honours_stop(server):
    args = (
        "generate",
        "--model",
        TINY,
        "--seed",
        "3",
        "--max-tokens",
        "40",
        "--ignore-eos",
        "--json",
        "hello",
    )
    first, second = (jsonl(ok(lstm_client(server.target, *args))) for _ in range(2))
    assert [e.get("token") for e in first] == [e.get("token") for e in second]
    assert first[-1]["finished"]["generated_tokens"] == 40 and first[-1]["finished"]["reason"] == "length"
    pieces = [e["token"]["text"] for e in first[:-1] if e["token"]["text"] not in ("", "\0")]
    assert len(pieces) >= 2, "too little text to pick a stop sequence from"
    stop = pieces[1]  # a whole character that the text contains
    events = jsonl(ok(lstm_client(server.target, *args, "--stop", stop)))
    text = "".join(e["token"]["text"] for e in events[:-1])
    assert events[-1]["finished"]["reason"] == "stop_sequence" and text.endswith(stop)
    assert ok(lstm_client(server.target, *args[:-2], "hello")) == ok(
        lstm_client(server.target, *args[:-2], "hello")
    )


def test_chat_keeps_state_across_turns(server):
    result = lstm_client(
        server.target,
        "chat",
        "--model",
        TINY,
        "--keep",
        "--seed",
        "4",
        "--max-tokens",
        "4",
        "--json",
        input="hi\nthere\n",
    )
    session_id = result.stderr.strip()
    events = jsonl(ok(result))
    turns: list[list[int]] = [[]]
    finished = []
    for event in events:
        if "token" in event:
            turns[-1].append(event["token"]["id"])
        else:
            finished.append(event["finished"])
            turns.append([])
    assert len(finished) == 2
    assert finished[0]["position"] == 1 + len("hi\n") + len(turns[0])
    assert finished[1]["position"] == finished[0]["position"] + len("there\n") + len(turns[1])
    with Client(server.target) as client:
        assert client.get_session(session_id).position == finished[1]["position"]
        with client.create_session(TINY, seed=4) as replay:  # the same turns give the same answers
            assert ids(replay.generate("hi\n", max_tokens=4, temperature=0.8)) == turns[0]  # chat's default
            assert ids(replay.generate("there\n", max_tokens=4, temperature=0.8)) == turns[1]
        client.delete_session(session_id)


def chat_turns(target: str, lines: str, *extra: str) -> tuple[list[list[dict]], str]:
    """Run `lstm-client chat --json` on `lines`: each answer's token events, and stderr."""
    result = lstm_client(
        target, "chat", "--model", TINY, "--seed", "4", "--max-tokens", "4", "--json", *extra, input=lines
    )
    turns: list[list[dict]] = [[]]
    for event in jsonl(ok(result)):
        if "token" in event:
            turns[-1].append(event["token"])
        else:
            turns.append([])
    return turns[:-1], result.stderr


def test_generate_and_chat_sample_at_temperature_0_8_unless_told():
    parser = build_parser()
    assert parser.parse_args(["generate", "x"]).temperature == 0.8
    assert parser.parse_args(["chat"]).temperature == 0.8
    assert parser.parse_args(["generate", "x", "--temperature", "1.5"]).temperature == 1.5
    assert parser.parse_args(["bench"]).temperature is None  # the server's default, 1


def test_chat_commands_reset_fork_set_the_temperature_and_quit(server):
    lines = "hi\n/help\n/temperature 0\nhi\n/reset\nhi\n/fork\nhi\n//x\n/bogus\n/quit\nnever sent\n"
    turns, stderr = chat_turns(server.target, lines, "--keep")
    for command in ("/reset", "/fork", "/temperature T", "/quit"):
        assert command in stderr  # /help lists them
    assert "unknown command '/bogus'" in stderr
    assert len(turns) == 5  # hi, hi, hi, hi, //x; nothing after /quit
    session_id, fork_id = stderr.splitlines()[0], stderr.split("now on fork ")[1].split()[0]
    with Client(server.target) as client, client.create_session(TINY, seed=4) as replay:
        first = ids(replay.generate("hi\n", max_tokens=4, temperature=0.8))
        assert [t["id"] for t in turns[0]] == first
        greedy = ids(replay.generate("hi\n", max_tokens=4, temperature=0))
        assert [t["id"] for t in turns[1]] == greedy
        replay.reset()
        after_reset = ids(replay.generate("hi\n", max_tokens=4, temperature=0))
        assert [t["id"] for t in turns[2]] == after_reset
        assert turns[2][0]["position"] == 1 + len("hi\n") + 1  # from a new session's state
        assert [t["id"] for t in turns[3]] == ids(replay.generate("hi\n", max_tokens=4, temperature=0))
        assert [t["id"] for t in turns[4]] == ids(replay.generate("/x\n", max_tokens=4, temperature=0))
        original = client.get_session(session_id)  # kept where it was when forked
        assert original.position == turns[2][-1]["position"]
        assert client.get_session(fork_id).position == turns[4][-1]["position"]
        client.delete_session(session_id)
        client.delete_session(fork_id)


def test_chat_in_text_mode_deletes_its_session(server):
    before = session_ids(server.target)
    ok(lstm_client(server.target, "chat", "--model", TINY, "--max-tokens", "3", input="one\ntwo\n"))
    assert session_ids(server.target) == before


def test_sessions_subcommands(server, tmp_path):
    target = server.target
    session_id = ok(lstm_client(target, "sessions", "create", "--model", TINY, "--seed", "5")).strip()
    assert len(session_id) >= 16
    assert session_id in {s["id"] for s in json.loads(ok(lstm_client(target, "--json", "sessions", "list")))}
    assert session_id in ok(lstm_client(target, "sessions", "list"))
    shown = json.loads(ok(lstm_client(target, "sessions", "show", session_id, "--json")))
    assert (shown["position"], shown["seed"], shown["model"]) == (1, 5, TINY)
    assert "position:" in ok(lstm_client(target, "sessions", "show", session_id))

    ok(lstm_client(target, "generate", "--session", session_id, "--max-tokens", "3", "abc"))
    position = json.loads(ok(lstm_client(target, "--json", "sessions", "show", session_id)))["position"]
    assert 5 <= position <= 7

    fork = ok(lstm_client(target, "sessions", "fork", session_id)).strip()
    forked = json.loads(ok(lstm_client(target, "--json", "sessions", "show", fork)))
    assert fork != session_id and (forked["position"], forked["seed"]) == (position, 5)
    reseeded = json.loads(ok(lstm_client(target, "--json", "sessions", "fork", session_id, "--seed", "6")))
    assert reseeded["seed"] == 6

    blob = tmp_path / "session.blob"
    ok(lstm_client(target, "sessions", "export", session_id, str(blob)))
    imported = ok(lstm_client(target, "sessions", "import", str(blob))).strip()
    assert json.loads(ok(lstm_client(target, "--json", "sessions", "show", imported)))["position"] == position
    piped = subprocess.run(
        [*LSTM_CLIENT, "--target", target, "sessions", "export", session_id, "-"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert piped.returncode == 0 and piped.stdout == blob.read_bytes()
    from_stdin = subprocess.run(
        [*LSTM_CLIENT, "--target", target, "sessions", "import", "-"],
        cwd=ROOT,
        input=piped.stdout,
        capture_output=True,
        timeout=60,
    )
    assert from_stdin.returncode == 0
    imported_too = from_stdin.stdout.decode().strip()

    assert json.loads(ok(lstm_client(target, "--json", "sessions", "reset", session_id)))["position"] == 1
    ok(lstm_client(target, "sessions", "delete", session_id, fork, reseeded["id"], imported, imported_too))
    assert "not found" in one_line_error(lstm_client(target, "sessions", "show", session_id))
    assert not {session_id, fork, imported, imported_too} & session_ids(target)


@pytest.mark.parametrize(
    ("args", "words", "returncode"),
    [
        (("sessions", "show", "0" * 32), "not found", 1),
        (("sessions", "delete", "0" * 32), "not found", 1),
        (("generate", "--model", "no-such-model", "x"), "", 1),
        (("generate", "--model", TINY, "--top-p", "5", "x"), "invalid argument", 1),
        (("generate", "--model", TINY, "--max-tokens", "10000000", "x"), "invalid argument", 1),
        (("sessions", "import", "-"), "", 1),  # stdin is empty: not an exported session
        (("generate", "x"), "choose a model", 2),  # two models are served
    ],
)
def test_errors_are_one_line_with_a_nonzero_exit(server, args, words, returncode):
    result = lstm_client(server.target, *args, input="")
    assert words in one_line_error(result, returncode) and "Traceback" not in result.stderr


def test_api_keys(auth_server):
    target = auth_server.target
    key = next(iter(auth_server.keys.values()))
    assert "unauthenticated" in one_line_error(lstm_client(target, "models"))
    assert "unauthenticated" in one_line_error(lstm_client(target, "--api-key", "wrong-key", "models"))
    assert TINY in ok(lstm_client(target, "models", "--api-key", key))
    ok(
        lstm_client(
            target, "generate", "--model", TINY, "--max-tokens", "2", "x", env={"LSTM_CLIENT_API_KEY": key}
        )
    )


def test_interrupt_exits_130_and_closed_stdout_exits_quietly(server):
    command = [
        *LSTM_CLIENT,
        "--target",
        server.target,
        "generate",
        "--model",
        TINY,
        "--max-tokens",
        "1000",
        "--ignore-eos",
        "hi",
    ]

    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert proc.stdout.read(1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in stderr

    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert proc.stdout.read(1)
    proc.stdout.close()  # like `| head -c 1`
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 141 and stderr == b""


def test_bench_reports_throughput_and_latency(server):
    before = session_ids(server.target)
    result = lstm_client(
        server.target,
        "bench",
        "--model",
        TINY,
        "--sessions",
        "2",
        "--duration",
        "1.5",
        "--max-tokens",
        "8",
        "--prompt",
        "hi",
        "--json",
        "--no-progress",
        timeout=120,
    )
    report = json.loads(ok(result))
    assert report["sessions"] == 2 and report["duration_s"] >= 1.5 and report["errors"] == {}
    assert report["requests"] >= 1 and report["tokens"] >= 1 and report["tokens_per_s"] > 0
    for key in ("ttft_ms", "itl_ms"):
        assert set(report[key]) == {"p50", "p95", "p99"}
        assert 0 < report[key]["p50"] <= report[key]["p95"] <= report[key]["p99"]

    result = lstm_client(
        server.target,
        "bench",
        "--model",
        TINY,
        "--sessions",
        "2",
        "--tokens",
        "40",
        "--max-tokens",
        "8",
        timeout=120,
    )
    assert "tokens/s" in ok(result) and "time to first token" in result.stdout
    tokens = int(result.stdout.splitlines()[1].split()[4])
    assert 1 <= tokens <= 40
    assert session_ids(server.target) == before  # bench deletes its sessions
