"""The two processes: the gRPC front end and the engine core it spawns.

Real servers: the engine core killed (the server ends with one clear line and a non-zero
exit; durable sessions come back on restart), the server killed (its engine goes with it),
and the channel between them batching a turn's messages into one frame.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import grpc
import pytest

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server.ipc import messages as m
from server.ipc.channel import Channel, ChannelClosed
from server.sessions.jobs import FinishedEvent, FinishReason, TokenEvent
from tests.stubs import LiveStream, connect, create, generate, generate_request


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_the_engine_dying_ends_the_server_and_durable_sessions_come_back(start_server, tmp_path):
    state = ("--state-dir", str(tmp_path / "state"), "--shutdown-delay", "0", "--fsync-interval", "0.01")
    proc = start_server(*state, "--max-new-tokens", "100000")
    stub = connect(proc.target)
    session = create(stub, seed=5)
    live = LiveStream(stub, session.id)
    live.send(generate_request("g", 100_000))
    tokens = [next(live.call).token for _ in range(40)]
    durable = max(t.durable_position for t in tokens)
    assert durable > 1

    os.kill(proc.engine_pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        for _ in live.call:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "engine core process" in err.value.details()
    assert proc.proc.wait(30) == 1
    lines = [line for line in proc.log.splitlines() if "engine core process" in line and "ERROR" in line]
    assert len(lines) == 1 and "exited with code -9" in lines[0], proc.log

    restarted = connect(start_server(*state).target)
    back = restarted.GetSession(pb.GetSessionRequest(session_id=session.id)).session
    assert back.position >= durable  # everything reported durable survived


def test_killing_the_server_takes_its_engine_core_along(start_server):
    proc = start_server("--shutdown-delay", "0")
    engine = proc.engine_pid
    assert generate(connect(proc.target), create(connect(proc.target)).id, max_tokens=4)[0]
    proc.proc.kill()
    assert gone(engine), "the engine core outlived its front end"


def test_sigterm_stops_both_processes_cleanly(start_server):
    proc = start_server("--shutdown-delay", "0")
    engine = proc.engine_pid
    proc.proc.terminate()
    assert proc.proc.wait(30) == 0
    assert gone(engine)
    assert "ERROR" not in proc.log


async def test_one_turn_of_messages_is_one_frame():
    """The scheduler puts an iteration's events in one callback: they must leave as one frame."""
    ours, theirs = socket.socketpair()
    sender = await Channel.connect(ours, m.ToFrontEnd)
    receiver = await Channel.connect(theirs, m.ToFrontEnd)
    events = [
        m.StreamEvent(s, TokenEvent("g", 65, "A", -0.5, 10 + s, 9, (), 0.001, False)) for s in range(64)
    ]
    for event in events:
        sender.send(event)
    sender.send(m.StreamEvent(3, FinishedEvent("g", FinishReason.LENGTH, 0, 64, 75, 75)))
    frame = await receiver.receive()
    assert frame == [*events, m.StreamEvent(3, FinishedEvent("g", FinishReason.LENGTH, 0, 64, 75, 75))]
    sender.send(m.Health(False))
    assert await receiver.receive() == [m.Health(False)]
    sender.close()
    with pytest.raises(ChannelClosed):
        await receiver.receive()
    await asyncio.sleep(0)
