"""Model files change while serving: SIGHUP rescans; sessions keep their version."""

from __future__ import annotations

import shutil
import signal
import time

import grpc
import pytest

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from tests.conftest import TINY_MODELS, write_model
from tests.metrics_helpers import metric, scrape
from tests.stubs import connect, create, generate


def sighup(proc, rescans: int) -> None:
    """Send SIGHUP and wait for the rescan's log line."""
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while proc.log.count("models rescanned") < rescans:
        assert time.monotonic() < deadline, proc.log
        time.sleep(0.05)


@pytest.fixture
def models(tmp_path, models_dir):
    """A models directory of our own, holding `tiny` version 1."""
    own = tmp_path / "models"
    own.mkdir()
    shutil.copy(models_dir / "tiny.safetensors", own / "tiny.safetensors")
    return own


def versions(stub) -> list[str]:
    return [m.version for m in stub.ListModels(pb.ListModelsRequest()).models if m.name == "tiny"]


def test_sighup_loads_a_new_version_and_sessions_keep_theirs(start_server, models, server):
    proc = start_server("--shutdown-delay", "0", models=models)
    stub = connect(proc.target)
    (v1,) = versions(stub)
    old = create(stub, seed=4)
    first = generate(stub, old.id, "x = ", max_tokens=10)[0]

    v2 = write_model(models / "tiny.safetensors", TINY_MODELS["tiny"], seed=99)
    sighup(proc, 1)
    assert versions(stub) == [v1, v2]
    new = create(stub, seed=4)
    assert new.model_version == v2 and old.model_version == v1
    # the old session continues on version 1, exactly as a version-1 session would
    reference = connect(server.target)
    ref = create(reference, seed=4)
    assert generate(reference, ref.id, "x = ", max_tokens=10)[0] == first
    assert generate(stub, old.id, max_tokens=20)[0] == generate(reference, ref.id, max_tokens=20)[0]


def test_a_corrupt_replacement_is_refused_with_a_log_line_and_a_metric(start_server, models):
    proc = start_server("--shutdown-delay", "0", models=models)
    stub = connect(proc.target)
    before = versions(stub)
    data = (models / "tiny.safetensors").read_bytes()
    (models / "tiny.safetensors").write_bytes(data[: len(data) // 2])
    sighup(proc, 1)
    assert versions(stub) == before
    assert "refusing model file" in proc.log and "truncated" in proc.log
    assert metric(scrape(proc), "lstm_serve_invalid_model_files_total") == 1
    assert generate(stub, create(stub).id, max_tokens=5)[0]


def test_a_restored_session_whose_version_is_gone_is_kept_until_it_returns(start_server, models, tmp_path):
    state = tmp_path / "state"
    proc = start_server("--state-dir", str(state), "--shutdown-delay", "0", models=models)
    stub = connect(proc.target)
    session = create(stub, seed=12)
    generate(stub, session.id, "def ", max_tokens=8)
    assert proc.stop() == 0

    kept = tmp_path / "kept.safetensors"
    shutil.move(models / "tiny.safetensors", kept)
    write_model(
        models / "tiny.safetensors", TINY_MODELS["tiny"], seed=98
    )  # a different version under the name
    proc = start_server("--state-dir", str(state), "--shutdown-delay", "0", models=models)
    stub = connect(proc.target)
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, session.id, max_tokens=3)
    assert (
        err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        and "not loaded; its data is kept" in err.value.details()
    )
    assert stub.GetSession(pb.GetSessionRequest(session_id=session.id)).session.position == 1 + 4 + 8
    assert (state / "sessions" / f"{session.id}.snap").exists()

    shutil.copy(kept, models / "tiny-v1.safetensors")  # the version returns (under another name)
    sighup(proc, 1)
    continued = generate(stub, session.id, max_tokens=12)[0]
    reference = create(stub, model="tiny-v1", seed=12)
    generate(stub, reference.id, "def ", max_tokens=8)
    assert continued == generate(stub, reference.id, max_tokens=12)[0]
