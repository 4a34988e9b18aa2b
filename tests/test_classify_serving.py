"""Many-to-one serving (issue 17): classify on live sessions, the one-shot Classify RPC, the
client's classify calls and CLI, against real servers and a float64 reference."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import torch

from client import Client, ClientOptions, StatusError, label_probabilities
from client.lstmserve.v1 import lstm_serve_pb2 as pb
from server import checkpoint, tokenizer
from server.classifier import HeadSpec
from server.model import ModelConfig, RecurrentLM
from tests.conftest import ROOT, TINY_MODELS, ServerProcess, write_model
from tests.metrics_helpers import metric, scrape
from tests.stubs import connect, run_stream

LANGUAGE = HeadSpec(name="language", labels=("python", "c", "shell"))
MOOD = HeadSpec(name="mood", labels=("calm", "angry"), hidden=5)
CLASSIFIERS = {
    "clf-lstm": ModelConfig(cell="lstm", layers=2, hidden=24, embed=8, heads=(LANGUAGE, MOOD)),
    "clf-rnn": ModelConfig(cell="rnn", layers=1, hidden=20, embed=8, heads=(LANGUAGE,)),
}


@pytest.fixture(scope="module")
def classifier_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifiers")
    for i, (name, config) in enumerate(CLASSIFIERS.items()):
        torch.manual_seed(10 + i)
        model = RecurrentLM(config)
        with torch.no_grad():
            for head in model.heads.values():  # sharper than at init, so labels differ visibly
                head.layers[-1].weight.mul_(20.0)
        checkpoint.save(root / f"{name}.safetensors", model)
    write_model(root / "tiny.safetensors", TINY_MODELS["tiny"])  # a language model alone
    return root


@pytest.fixture(scope="module")
def classify_server(classifier_models):
    proc = ServerProcess(
        ["--models-dir", str(classifier_models), "--shutdown-delay", "0"], models_dir=classifier_models
    ).start()
    yield proc
    proc.stop()


def reference(models_dir, name: str, tokens: list[int]) -> dict[str, list[float]]:
    """Each head's probabilities on the top layer's h after `tokens`, by a float64 forward."""
    model = checkpoint.load(models_dir / f"{name}.safetensors").model.double()
    with torch.no_grad():
        _, state = model(torch.tensor([tokens]))
        return {
            head: torch.softmax(model.heads[head](state.h[-1]), dim=-1)[0].tolist() for head in model.heads
        }


def assert_close(answer, expected: dict[str, list[float]]) -> None:
    got = {name: list(labels.values()) for name, labels in label_probabilities(answer).items()}
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-4), name


@pytest.mark.parametrize("model", list(CLASSIFIERS))
def test_classify_equals_the_float64_head_on_the_state_and_moves_nothing(
    classify_server, classifier_models, model
):
    texts = ["int main(void) {", " return 0; }", "\n# done"]
    with Client(classify_server.target) as client, client.create_session(model, seed=3) as session:
        absorbed = [tokenizer.BOS]
        for text in texts:
            fed = session.feed(text, classify=True)
            absorbed += tokenizer.encode(text)
            assert fed.classification.position == len(absorbed) == fed.finished.position
            assert_close(fed.classification, reference(classifier_models, model, absorbed))
            again = session.classify()  # the same state, asked again: the same answer, no move
            assert again == fed.classification
            assert session.refresh().position == len(absorbed)
        generated = session.generate(max_tokens=12).wait()
        absorbed += client.session_tokens(session.id, len(absorbed))
        assert len(absorbed) == generated.position
        assert_close(session.classify(), reference(classifier_models, model, absorbed))
        whole = "".join(texts)
        one_shot = client.classify(whole, model=model)
        assert_close(one_shot, reference(classifier_models, model, [tokenizer.BOS, *tokenizer.encode(whole)]))
        assert one_shot.position == 1 + len(whole)
        assert [s.id for s in client.list_sessions()] == [session.id]  # the one-shot's session ended


def test_classifying_after_every_token_does_not_change_the_generation(classify_server):
    with Client(classify_server.target) as client:
        with client.create_session("clf-lstm", seed=99) as plain:
            expected = [t.id for t in plain.generate("x = ", max_tokens=64, ignore_eos=True)]
        with client.create_session("clf-lstm", seed=99) as watched:
            watched.feed("x = ")
            got = []
            for n in range(1, 65):
                got += [t.id for t in watched.generate(max_tokens=1, ignore_eos=True)]
                assert watched.classify().position == 5 + n  # <bos>, "x = ", n generated
            assert got == expected


def test_a_model_without_heads_is_a_failed_precondition_naming_its_heads(classify_server):
    with Client(classify_server.target) as client:
        with pytest.raises(StatusError) as e:
            client.classify("hello", model="tiny")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "no classification heads (heads: none)" in e.value.details
        with client.create_session("tiny", seed=1) as session:
            session.feed("abc")
            with pytest.raises(StatusError) as e:
                session.classify()
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert session.refresh().position == 4  # nothing moved; the session serves on
            again = client.session(session.id)
            assert again.generate(max_tokens=3, ignore_eos=True).wait().position == 7


def test_classify_requests_are_counted_and_timed(classify_server):
    before = scrape(classify_server)
    with Client(classify_server.target) as client:
        for _ in range(3):
            client.classify("def f(): pass", model="clf-rnn")
        with client.create_session("clf-rnn") as session:
            session.feed("abc", classify=True)
            session.classify()
    after = scrape(classify_server)
    count = "lstm_serve_classifications_total"
    assert metric(after, count, model="clf-rnn") - metric(before, count, model="clf-rnn") == 5
    timed = "lstm_serve_classify_latency_seconds_count"
    assert metric(after, timed, model="clf-rnn") - metric(before, timed, model="clf-rnn") == 5


def test_empty_or_modelless_classify_requests_say_what_to_fix(classify_server):
    stub = connect(classify_server.target)
    for request, words in (
        (pb.ClassifyRequest(model="clf-lstm"), "input is empty"),
        (pb.ClassifyRequest(input=pb.Input(text="x")), "give model"),
        (pb.ClassifyRequest(model="nope", input=pb.Input(text="x")), "unknown model 'nope'"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            stub.Classify(request)
        assert words in e.value.details()


def test_another_keys_session_is_not_found_for_classify(auth_server):
    alice = Client(auth_server.target, ClientOptions(api_key=auth_server.keys["alice"]))
    session = alice.create_session("tiny")
    bob = connect(auth_server.target, auth_server.keys["bob"])
    with pytest.raises(grpc.RpcError) as e:
        run_stream(bob, session.id, [pb.StreamRequest(request_id="c", classify=pb.ClassifyCommand())])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    alice.close()


def test_the_cli_classifies_a_text_and_a_stream(classify_server, classifier_models, tmp_path):
    cli = [sys.executable, "-m", "client.cli", "--target", classify_server.target]
    text = "for x in range(3): print(x)"
    done = subprocess.run(
        [*cli, "--json", "classify", text, "--model", "clf-lstm"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    expected = reference(classifier_models, "clf-lstm", [tokenizer.BOS, *tokenizer.encode(text)])
    for head, probabilities in expected.items():
        assert list(answer["heads"][head].values()) == pytest.approx(probabilities, abs=1e-4)
    source = tmp_path / "snippet.py"
    source.write_text("import os\n" * 20)  # 200 characters: 4 pieces of 64
    done = subprocess.run(
        [*cli, "classify", "--stream", str(source), "--model", "clf-rnn"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [int(line.split()[1]) for line in lines] == [65, 129, 193, 201]
    assert all("language=" in line for line in lines)
