"""Durability under real faults: a full file system, write and fsync errors, a read-only state
dir, two servers on one state dir, resets between snapshots, kill -9 after a deletion.

Every test runs the real server; the faults are real too: a small tmpfs mounted in a private
mount namespace (`unshare -m`; the server runs inside it through `nsenter`), a read-only bind
mount, or a fault-injecting log file object inside the server process (tests/faulty_disk.py)
where no file system can produce the error. What the server reported durable must come back.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server import tokenizer
from server.sessions import blob
from tests.conftest import ROOT
from tests.metrics_helpers import metric, scrape
from tests.stubs import LiveStream, connect, create, feed_request, generate, run_stream

pytestmark = pytest.mark.slow
LONG = 100_000
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def wait_until(condition: Callable[[], bool], timeout: float = 30, what: str = "") -> float:
    """Poll `condition` until it holds; the seconds it took (printed: docs/reliability.md quotes them)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() < start + timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    print(f"{what}: {elapsed:.2f} s")
    return elapsed


def info(stub, session_id: str, tokens_after: int | None = None) -> pb.GetSessionResponse:
    request = pb.GetSessionRequest(session_id=session_id)
    if tokens_after is not None:
        request.tokens_after = tokens_after
    return stub.GetSession(request, timeout=10)


def endless(request_id: str = "g") -> pb.StreamRequest:
    """A generation that runs until the stream ends (the random test model's <eos> is ignored)."""
    return pb.StreamRequest(
        request_id=request_id, generate=pb.GenerateTokensRequest(max_tokens=LONG, ignore_eos=True)
    )


def read_until_error(live: LiveStream, tokens: list[pb.Token]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        for response in live.call:
            tokens.append(response.token)
    return e.value


def state_flags(state: Path, *extra: str) -> list[str]:
    return ["--state-dir", str(state), "--shutdown-delay", "0", "--max-new-tokens", str(LONG), *extra]


def durable_everywhere(stub, ids: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        return all(i.session.durable_position == i.session.position for i in (info(stub, sid) for sid in ids))

    return check


def faulty_disk_env(trigger: Path) -> dict[str, str]:
    """A server started with these variables injects the log faults `trigger` names, in every
    one of its processes (tests/fault_site/sitecustomize.py loads tests/faulty_disk.py)."""
    return {"FAULTY_DISK": str(trigger), "PYTHONPATH": f"{ROOT / 'tests' / 'fault_site'}:{ROOT}"}


@dataclass
class SmallFs:
    """A tmpfs of a few MiB at `path`, visible only in the mount namespace of `holder`."""

    holder: subprocess.Popen
    path: Path

    @property
    def launcher(self) -> list[str]:
        return [
            "nsenter",
            "-t",
            str(self.holder.pid),
            "-m",
            f"--wd={ROOT}",
            "--",
            sys.executable,
            "-m",
            "server.cli",
        ]

    @property
    def view(self) -> Path:
        """The tmpfs as this process sees it (through the holder's root)."""
        return Path(f"/proc/{self.holder.pid}/root") / self.path.relative_to("/")

    def fill(self) -> None:
        chunk = b"\0" * (64 << 10)
        with open(self.view / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError:
                pass
            try:  # the last partial page too
                while True:
                    f.write(b"\0" * 512)
            except OSError:
                pass

    def free(self) -> None:
        (self.view / "filler").unlink()


@pytest.fixture
def small_fs(tmp_path) -> Iterator[SmallFs]:
    path = tmp_path / "small"
    path.mkdir()
    script = 'mount -t tmpfs -o size=4m tmpfs "$0" && echo ready && exec sleep 3600'
    try:
        holder = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", script, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    line = holder.stdout.readline()
    if "ready" not in line:
        holder.kill()
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {line.strip()}")
    yield SmallFs(holder, path)
    holder.kill()
    holder.wait()


def test_a_reset_between_snapshots_comes_back_reset(start_server, tmp_path):
    """Fails before the fix: the snapshot skip compared positions only, so the reset session
    (same position) kept its old snapshot, and the log holding the reset was deleted."""
    state = tmp_path / "state"
    flags = state_flags(state, "--snapshot-interval", "0.5", "--fsync-interval", "0.05")
    first = start_server(*flags)
    stub = connect(first.target)
    session = create(stub, seed=5)
    run_stream(stub, session.id, [feed_request("f", "import os\n")])
    snapshot = state / "sessions" / f"{session.id}.snap"
    wait_until(
        lambda: snapshot.exists() and blob.unpack(snapshot.read_bytes()).position == 11, what="a snapshot"
    )
    stub.ResetSession(pb.ResetSessionRequest(session_id=session.id))
    run_stream(stub, session.id, [feed_request("f", "class Foo:")])
    assert info(stub, session.id).session.position == 11
    wait_until(durable_everywhere(stub, [session.id]), what="the durable position")
    time.sleep(1.5)  # the next snapshots pass
    first.stop(signal.SIGKILL)

    second = start_server(*flags)
    stub = connect(second.target)
    assert list(info(stub, session.id, tokens_after=0).tokens) == [
        tokenizer.BOS,
        *tokenizer.encode("class Foo:"),
    ]
    reference = create(stub, seed=5)
    run_stream(stub, reference.id, [feed_request("f", "class Foo:")])
    assert generate(stub, session.id, max_tokens=12)[0] == generate(stub, reference.id, max_tokens=12)[0]


def test_a_full_disk_ends_streams_unavailable_and_loses_nothing(start_server, small_fs):
    """A tmpfs filled up during generation, then freed. Fails before the fix: the buffered log
    hid the error until the fsync thread died, and durable positions stopped for good."""
    flags = state_flags(small_fs.path / "state", "--fsync-interval", "0.05", "--snapshot-interval", "3600")
    first = start_server(*flags, launcher=small_fs.launcher)
    stub = connect(first.target)
    idle = create(stub, seed=1)
    generate(stub, idle.id, max_tokens=20, ignore_eos=True)
    busy = create(stub, seed=2)
    live = LiveStream(stub, busy.id)
    live.send(endless())
    tokens = [next(live.call).token for _ in range(20)]
    small_fs.fill()
    error = read_until_error(live, tokens)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "state dir write failed: No space left on device" in error.details()
    # no state moved past what was recorded, and every recorded token was delivered
    assert info(stub, busy.id).session.position == tokens[-1].position
    assert first.health() == NOT_SERVING
    assert metric(scrape(first), "lstm_serve_durability_errors_total", operation="write") >= 1
    with pytest.raises(grpc.RpcError) as refused:
        generate(stub, idle.id, max_tokens=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info(stub, idle.id).session.position == 21  # the refused request changed nothing

    small_fs.free()
    wait_until(lambda: first.health() == SERVING, timeout=10, what="SERVING after the disk was freed")
    generate(stub, busy.id, max_tokens=30, ignore_eos=True)
    wait_until(durable_everywhere(stub, [idle.id, busy.id]), what="durable positions")
    before = {sid: list(info(stub, sid, tokens_after=0).tokens) for sid in (idle.id, busy.id)}
    fork = stub.ForkSession(pb.ForkSessionRequest(session_id=busy.id)).session  # snapshotted at once
    first.stop(signal.SIGKILL)

    second = start_server(*flags, launcher=small_fs.launcher)
    stub = connect(second.target)
    for sid, tokens_before in before.items():
        assert list(info(stub, sid, tokens_after=0).tokens) == tokens_before
    assert generate(stub, busy.id, max_tokens=10)[0] == generate(stub, fork.id, max_tokens=10)[0]


def test_a_fork_or_import_whose_snapshot_fails_is_not_registered(start_server, small_fs):
    """Fails before the fix: the session stayed registered behind an INTERNAL error."""
    flags = state_flags(small_fs.path / "state", "--snapshot-interval", "3600")
    proc = start_server(*flags, launcher=small_fs.launcher)
    stub = connect(proc.target)
    parent = create(stub, seed=3)
    exported = stub.ExportSession(pb.ExportSessionRequest(session_id=parent.id)).blob
    small_fs.fill()
    for call in (
        lambda: stub.ForkSession(pb.ForkSessionRequest(session_id=parent.id)),
        lambda: stub.ImportSession(pb.ImportSessionRequest(blob=exported)),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert (
            e.value.code() == grpc.StatusCode.UNAVAILABLE and "No space left on device" in e.value.details()
        )
    assert [s.id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions] == [parent.id]
    assert metric(scrape(proc), "lstm_serve_durability_errors_total", operation="snapshot") == 2
    small_fs.free()
    child = stub.ForkSession(pb.ForkSessionRequest(session_id=parent.id)).session
    assert {s.id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions} == {parent.id, child.id}


@pytest.mark.parametrize(
    ("operation", "errno_name", "words"),
    [
        ("fsync", "EIO", "Input/output error"),
        ("write", "EIO", "Input/output error"),
        ("write", "EROFS", "Read-only file system"),
    ],
)
def test_log_errors_refuse_steps_retry_on_a_new_segment_and_lose_nothing(
    start_server, tmp_path, operation, errno_name, words
):
    """Fails before the fix: a write error advanced states past unlogged tokens, and an fsync
    error killed the fsync thread silently."""
    state, trigger = tmp_path / "state", tmp_path / "fault"
    flags = state_flags(state, "--fsync-interval", "0.05", "--snapshot-interval", "3600")
    first = start_server(*flags, env=faulty_disk_env(trigger))
    stub = connect(first.target)
    session = create(stub, seed=4)
    live = LiveStream(stub, session.id)
    live.send(endless())
    tokens = [next(live.call).token for _ in range(10)]
    segments = sorted(p.name for p in (state / "wal").glob("*.log"))
    trigger.write_text(f"{operation} {errno_name}")
    error = read_until_error(live, tokens)
    assert (
        error.code() == grpc.StatusCode.UNAVAILABLE and f"state dir write failed: {words}" in error.details()
    )
    position = info(stub, session.id).session.position
    assert position == tokens[-1].position
    wait_until(lambda: first.health() == NOT_SERVING, timeout=5, what="NOT_SERVING")
    assert metric(scrape(first), "lstm_serve_durability_errors_total", operation=operation) >= 1
    time.sleep(1.5)  # retries fail while the fault lasts
    assert first.health() == NOT_SERVING

    trigger.unlink()
    wait_until(lambda: first.health() == SERVING, timeout=10, what="SERVING once writes succeed")
    assert max(p.name for p in (state / "wal").glob("*.log")) > max(
        segments
    )  # a new segment, never the failed one
    wait_until(durable_everywhere(stub, [session.id]), what="the unsynced tokens made durable")
    history = list(info(stub, session.id, tokens_after=0).tokens)
    first.stop(signal.SIGKILL)

    second = start_server(*flags)
    stub = connect(second.target)
    assert info(stub, session.id).session.position == position
    assert list(info(stub, session.id, tokens_after=0).tokens) == history


def test_a_slow_fsync_does_not_stall_the_step_thread(start_server, tmp_path):
    """While an fsync takes seconds, tokens keep flowing and only the durable position lags;
    were appends to wait for the fsync, each token would wait seconds and the call time out."""
    state, trigger = tmp_path / "state", tmp_path / "fault"
    flags = state_flags(state, "--fsync-interval", "0.05", "--snapshot-interval", "3600")
    server = start_server(*flags, env=faulty_disk_env(trigger))
    stub = connect(server.target)
    session = create(stub, seed=4)
    live = LiveStream(stub, session.id, timeout=30)
    live.send(endless())
    before = [next(live.call).token for _ in range(5)]
    trigger.write_text("fsync sleep 5")
    tokens = [next(live.call).token for _ in range(300)]
    assert max(t.position - t.durable_position for t in tokens) >= 200  # the durable position fell behind ...
    assert server.health() == SERVING  # ... which is slowness, not a fault
    trigger.unlink()
    wait_until(
        lambda: info(stub, session.id).session.durable_position >= tokens[-1].position,
        what="the durable position after the slow fsyncs",
    )
    assert tokens[0].position > before[-1].position
    live.close()


def test_a_temporary_session_is_never_written(start_server, tmp_path):
    """Fails before the fix: Generate without a session id came back as an orphan after a crash."""
    flags = state_flags(tmp_path / "state", "--fsync-interval", "0.05", "--snapshot-interval", "0.3")
    first = start_server(*flags)
    stub = connect(first.target)
    request = pb.GenerateRequest(model="tiny", prompt=pb.Input(text="def "), max_tokens=LONG, ignore_eos=True)
    call = stub.Generate(request, timeout=60)
    for _ in range(200):
        next(call)
    time.sleep(0.5)  # fsyncs and a checkpoint pass while it generates
    first.stop(signal.SIGKILL)
    second = start_server(*flags)
    assert list(connect(second.target).ListSessions(pb.ListSessionsRequest()).sessions) == []


def test_a_deleted_session_never_comes_back(start_server, tmp_path):
    """Fails before the fix (mostly): the deletion record sat in a buffer when DeleteSession
    returned OK, and a kill -9 lost it."""
    flags = state_flags(tmp_path / "state", "--fsync-interval", "0.05", "--snapshot-interval", "3600")
    first = start_server(*flags)
    stub = connect(first.target)
    kept, deleted = create(stub, seed=1), create(stub, seed=2)
    wait_until(durable_everywhere(stub, [kept.id, deleted.id]), what="both sessions logged")
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=deleted.id))
    first.stop(signal.SIGKILL)
    second = start_server(*flags)
    assert [s.id for s in connect(second.target).ListSessions(pb.ListSessionsRequest()).sessions] == [kept.id]


def serve_command(models_dir: Path, state: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--models-dir",
        str(models_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--state-dir",
        str(state),
        *extra,
    ]


def refused(command: list[str]) -> str:
    """Run a server that must refuse to start: its one line of output."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_second_server_on_a_state_dir_is_refused(start_server, models_dir, tmp_path):
    """Fails before the fix: the second server started and deleted the first's files."""
    state = tmp_path / "state"
    first = start_server(*state_flags(state, "--fsync-interval", "0.05"))
    stub = connect(first.target)
    session = create(stub, seed=1)
    segments = sorted((state / "wal").glob("*.log"))
    line = refused(serve_command(models_dir, state))
    assert f"in use by another lstm-serve (pid {first.proc.pid})" in line
    assert sorted((state / "wal").glob("*.log")) == segments and all(p.stat().st_size > 0 for p in segments)
    assert info(stub, session.id).session.position == 1


@pytest.mark.parametrize("mode", ["shutdown", "log"])
def test_an_unusable_state_dir_is_refused_at_start(models_dir, tmp_path, mode):
    """Fails before the fix: a read-only dir started a server that lost everything at shutdown."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert "is not a directory" in refused(serve_command(models_dir, not_a_dir, "--durability", mode))

    read_only = tmp_path / "ro"
    (read_only / "state" / "sessions").mkdir(parents=True)
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(read_only), "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()}")
    line = refused(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            script,
            str(read_only),
            *serve_command(models_dir, read_only / "state", "--durability", mode),
        ]
    )
    assert "is not writable: Read-only file system" in line
