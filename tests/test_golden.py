"""Golden outputs: the server's exact tokens, texts, positions and logprobs, pinned in a file.

A regression guard for refactors of server/ that must not change behaviour: a real
`lstm-serve serve` subprocess serves the shipped default model (`models/default.safetensors`,
a 1-layer LSTM, hidden 512) and the seeded test models `tiny` (LSTM) and `tiny-rnn` (Elman
RNN) from tests/conftest.py, and every scenario below runs on each of them through the wire
protocol (tests/stubs.py). What comes back is compared with tests/golden/outputs.json:

    greedy         Stream: feed the prompt with logprobs and top-5 next tokens, generate greedily;
                   then the session's token history (GetSession tokens_after=0)
    sampled        Generate on a session: temperature 0.8, top_k/top_p at their defaults
    sampled_top    Stream: temperature 0.8, top_k 20, top_p 0.9
    temporary      Generate without a session (a temporary one with the same seed)
    fork           generate, ForkSession with the parent's seed and with another seed, continue all three
    export_import  generate, ExportSession (its blob's size and sha256: the format, byte for byte),
                   ImportSession, continue the original and the import
    reset          generate, ResetSession, then feed the prompt (with logprobs) and generate
("generate" before a fork, export or reset: the prompt and MAX_TOKENS // 2 tokens at temperature 0.8.)

Token ids, texts, positions, finish events and session positions/seeds must match exactly;
logprobs are compared rounded to LOGPROB_DECIMALS decimals (also exactly). Every generation
uses `ignore_eos`, so a random model's <eos> cannot end it early.

Regenerate the file (only when a behaviour change is intended, or on a new machine):

    GOLDEN_WRITE=1 .venv/bin/python -m pytest tests/test_golden.py

The file also records the platform: the CPU model name and ISA flags, torch's version and
the ISA level its CPU kernels dispatch to, and numpy's version (sampling runs in numpy).
Floating-point results may legitimately differ on another platform (MKL, oneDNN and numpy
pick kernels by CPU), so there the tests skip, saying how to regenerate; the server runs with
MKL_CBWR=COMPATIBLE, also when writing, to make MKL's choice as stable as it can be. On the
recorded platform any difference fails. A model whose fingerprint (ListModels' version, the
sha256 of its tensors) differs from the recorded one fails too: its file changed.

All requests run one after another, so every step is a batch of one row; the backend
(torch), device (cpu), dtype (float32), intra-op threads (2) and prefill chunk (64) are
pinned by flags so that `LSTM_SERVE_*` variables in the environment cannot change them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.lstmserve.v1 import lstm_serve_pb2 as pb
from tests.conftest import ROOT, ServerProcess
from tests.stubs import LiveStream, connect, create, feed_request, generate_request

GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "outputs.json"
WRITE = os.environ.get("GOLDEN_WRITE", "") not in ("", "0")
REGENERATE = "GOLDEN_WRITE=1 .venv/bin/python -m pytest tests/test_golden.py"
DEFAULT_MODEL = ROOT / "models" / "default.safetensors"

MODELS = ("default", "tiny", "tiny-rnn")
SCENARIOS = ("greedy", "sampled", "sampled_top", "temporary", "fork", "export_import", "reset")
PROMPT = "def parse("
MAX_TOKENS = 40
HALF = MAX_TOKENS // 2  # before and after a fork, export or reset
SEED = 1234
OTHER_SEED = 4321
TEMPERATURE = 0.8
TOP_K, TOP_P = 20, 0.9  # sampled_top only
TOP_LOGPROBS = 5  # alternatives recorded for each fed token
LOGPROB_DECIMALS = 5
SERVER_ENV = {"MKL_CBWR": "COMPATIBLE"}
SERVER_FLAGS = [
    "--backend",
    "torch",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--threads",
    "2",
    "--max-batch-size",
    "128",
    "--prefill-chunk",
    "64",
    "--shutdown-delay",
    "0",
    "--session-ttl",
    "300",
]
CPU_FLAGS = (  # the instruction sets that decide which kernels MKL, oneDNN, ATen and numpy run
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512dq",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
)

Record = dict[str, Any]


# ---- the platform ----------------------------------------------------------------------------


def cpu_info() -> tuple[str, list[str]]:
    """The first CPU's "model name" and which of CPU_FLAGS it has (from /proc/cpuinfo)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux: the machine type is all we know
        pass
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine()), [flag for flag in CPU_FLAGS if flag in flags]


def platform_record() -> Record:
    """What the expected floating-point results depend on, besides the server's code."""
    name, flags = cpu_info()
    return {
        "cpu_model": name,
        "cpu_flags": flags,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numpy": np.__version__,
    }


# ---- what one call returns, as plain data ------------------------------------------------------


def logprob(value: float) -> float:
    return round(float(value), LOGPROB_DECIMALS)


def tokens_record(tokens: list[pb.Token]) -> Record:
    """Tokens as columns (ids, texts, positions, logprobs; top_logprobs for fed tokens that have them)."""
    record: Record = {
        "ids": [t.id for t in tokens],
        "text": "".join(t.text for t in tokens),
        "texts": [t.text for t in tokens],
        "positions": [t.position for t in tokens],
        "logprobs": [logprob(t.logprob) for t in tokens],
    }
    if any(t.top_logprobs for t in tokens):
        record["top_logprobs"] = [
            [[alt.token_id, logprob(alt.logprob)] for alt in t.top_logprobs] for t in tokens
        ]
    return record


def finished_record(finished: pb.Finished) -> Record:
    return {
        "reason": pb.FinishReason.Name(finished.reason),
        "fed_tokens": finished.fed_tokens,
        "generated_tokens": finished.generated_tokens,
        "position": finished.position,
    }


def session_record(session: pb.Session) -> Record:
    """The deterministic fields of a session (not its id, times or location)."""
    return {
        "model": session.model,
        "model_version": session.model_version,
        "seed": session.seed,
        "position": session.position,
    }


def call_record(tokens: list[pb.Token], finished: pb.Finished) -> Record:
    return {**tokens_record(tokens), "finished": finished_record(finished)}


# ---- the calls -------------------------------------------------------------------------------


def sampling(temperature: float, top_k: int = 0, top_p: float | None = None) -> pb.SamplingOptions:
    options = pb.SamplingOptions(temperature=temperature, top_k=top_k)
    if top_p is not None:
        options.top_p = top_p
    return options


def generate_call(stub, max_tokens: int, prompt: str = "", session_id: str = "", **fields: Any) -> Record:
    """A Generate call (temperature 0.8, ignore_eos) run to its end."""
    request = pb.GenerateRequest(
        session_id=session_id,
        prompt=pb.Input(text=prompt),
        max_tokens=max_tokens,
        sampling=sampling(TEMPERATURE),
        ignore_eos=True,
        **fields,
    )
    tokens, finished = [], None
    for response in stub.Generate(request, timeout=60):
        if response.HasField("token"):
            tokens.append(response.token)
        else:
            finished = response.finished
    assert finished is not None, "Generate ended without a finished event"
    return call_record(tokens, finished)


def stream_feed_and_generate(stub, session_id: str, options: pb.SamplingOptions) -> Record:
    """One Stream: feed PROMPT with logprobs and the top alternatives, then generate MAX_TOKENS."""
    stream = LiveStream(stub, session_id)
    try:
        stream.send(feed_request("feed", PROMPT, return_logprobs=True, top_logprobs=TOP_LOGPROBS))
        fed = call_record(*stream.until_finished("feed"))
        request = generate_request("gen", MAX_TOKENS)
        request.generate.sampling.CopyFrom(options)
        request.generate.ignore_eos = True
        stream.send(request)
        generated = call_record(*stream.until_finished("gen"))
    finally:
        stream.close()
        list(stream.call)  # the server ends the call once the requests are half-closed
    return {"fed": fed, "generated": generated}


# ---- the scenarios -----------------------------------------------------------------------------


def greedy(stub, model: str) -> Record:
    session = create(stub, model, seed=SEED)
    record = {"created": session_record(session), **stream_feed_and_generate(stub, session.id, sampling(0.0))}
    got = stub.GetSession(pb.GetSessionRequest(session_id=session.id, tokens_after=0), timeout=30)
    record["history"] = {"session": session_record(got.session), "tokens": list(got.tokens)}
    return record


def sampled(stub, model: str) -> Record:
    session = create(stub, model, seed=SEED)
    generated = generate_call(stub, MAX_TOKENS, PROMPT, session.id)
    return {"created": session_record(session), "generated": generated}


def sampled_top(stub, model: str) -> Record:
    session = create(stub, model, seed=SEED)
    options = sampling(TEMPERATURE, TOP_K, TOP_P)
    return {"created": session_record(session), **stream_feed_and_generate(stub, session.id, options)}


def temporary(stub, model: str) -> Record:
    return {"generated": generate_call(stub, MAX_TOKENS, PROMPT, model=model, seed=SEED)}


def fork(stub, model: str) -> Record:
    parent = create(stub, model, seed=SEED)
    before = generate_call(stub, HALF, PROMPT, parent.id)
    same = stub.ForkSession(pb.ForkSessionRequest(session_id=parent.id), timeout=30).session
    other = stub.ForkSession(pb.ForkSessionRequest(session_id=parent.id, seed=OTHER_SEED), timeout=30).session
    return {
        "before": before,
        "fork_same_seed": session_record(same),
        "fork_other_seed": session_record(other),
        "parent_after": generate_call(stub, HALF, session_id=parent.id),
        "same_seed_after": generate_call(stub, HALF, session_id=same.id),
        "other_seed_after": generate_call(stub, HALF, session_id=other.id),
    }


def export_import(stub, model: str) -> Record:
    original = create(stub, model, seed=SEED)
    before = generate_call(stub, HALF, PROMPT, original.id)
    exported = stub.ExportSession(pb.ExportSessionRequest(session_id=original.id), timeout=30)
    imported = stub.ImportSession(pb.ImportSessionRequest(blob=exported.blob), timeout=30).session
    return {
        "before": before,
        "exported": {
            "session": session_record(exported.session),
            "blob_bytes": len(exported.blob),
            "blob_sha256": hashlib.sha256(exported.blob).hexdigest(),
        },
        "imported": session_record(imported),
        "original_after": generate_call(stub, HALF, session_id=original.id),
        "imported_after": generate_call(stub, HALF, session_id=imported.id),
    }


def reset(stub, model: str) -> Record:
    session = create(stub, model, seed=SEED)
    before = generate_call(stub, HALF, PROMPT, session.id)
    after_reset = stub.ResetSession(pb.ResetSessionRequest(session_id=session.id), timeout=30).session
    continued = stream_feed_and_generate(stub, session.id, sampling(TEMPERATURE))
    return {"before": before, "reset": session_record(after_reset), **continued}


RUNNERS = {
    "greedy": greedy,
    "sampled": sampled,
    "sampled_top": sampled_top,
    "temporary": temporary,
    "fork": fork,
    "export_import": export_import,
    "reset": reset,
}
assert tuple(RUNNERS) == SCENARIOS


def model_record(info: pb.ModelInfo) -> Record:
    return {
        "version": info.version,
        "cell": pb.Cell.Name(info.cell),
        "layers": info.layers,
        "hidden": info.hidden,
        "vocab_size": info.vocab_size,
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        "backend": info.backend,
        "device": info.device,
        "dtype": info.dtype,
        "heldout_bits_per_byte": info.heldout_bits_per_byte,
    }


def run_all(stub) -> Record:
    """Every scenario on every model, one request at a time, in a fixed order."""
    listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert set(listed) == set(MODELS), f"the server loaded {sorted(listed)}, not {sorted(MODELS)}"
    outputs: Record = {}
    for name in MODELS:
        scenarios = {scenario: RUNNERS[scenario](stub, name) for scenario in SCENARIOS}
        outputs[name] = {"info": model_record(listed[name]), "scenarios": scenarios}
    return outputs


# ---- the file --------------------------------------------------------------------------------------


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with one key per line, but lists without objects in them on one line (short diffs)."""
    pad = "  " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}" if items else "{}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        items = [pad + dumps(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]" if items else "[]"
    return json.dumps(value, ensure_ascii=False)


def write_golden(observed: Record) -> None:
    document = {
        "about": f"Expected outputs of tests/test_golden.py; regenerate with: {REGENERATE}",
        "platform": platform_record(),
        "server": {"flags": SERVER_FLAGS, "env": SERVER_ENV},
        "models": observed,
    }
    GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_FILE.write_text(dumps(document) + "\n", encoding="utf-8")


def first_difference(expected: Any, observed: Any, path: str) -> str | None:
    """Where two JSON-like values first differ, as 'path: expected X, got Y' (None: equal)."""
    if isinstance(expected, dict) and isinstance(observed, dict):
        for key in [*expected, *(k for k in observed if k not in expected)]:
            if key not in observed or key not in expected:
                want, got = expected.get(key, "<absent>"), observed.get(key, "<absent>")
                return f"{path}.{key}: expected {want!r}, got {got!r}"
            found = first_difference(expected[key], observed[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(expected, list) and isinstance(observed, list):
        for i, (e, o) in enumerate(zip(expected, observed)):
            found = first_difference(e, o, f"{path}[{i}]")
            if found:
                return found
        if len(expected) != len(observed):
            return f"{path}: expected {len(expected)} items, got {len(observed)}"
        return None
    if expected != observed or type(expected) is not type(observed):  # JSON keeps floats apart from ints
        return f"{path}: expected {expected!r}, got {observed!r}"
    return None


# ---- fixtures and tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded() -> Record | None:
    """The golden file (None when writing it); skips on a platform other than the recorded one."""
    if WRITE:
        return None
    if not GOLDEN_FILE.exists():
        pytest.fail(f"{GOLDEN_FILE} is missing; write it with: {REGENERATE}")
    document = json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))
    recorded_on, here = document["platform"], platform_record()
    if recorded_on != here:
        differences = "; ".join(
            f"{key}: recorded {recorded_on.get(key)!r}, here {here.get(key)!r}"
            for key in sorted({*recorded_on, *here})
            if recorded_on.get(key) != here.get(key)
        )
        pytest.skip(
            f"golden outputs were recorded on another platform ({differences}), where floating-point "
            f"results may differ. To pin this platform's outputs instead, regenerate with: {REGENERATE} "
            f"(after checking that the tests pass on the recorded platform, if the code changed)"
        )
    return document


@pytest.fixture(scope="module")
def golden_server(models_dir: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server on the default model, `tiny` and `tiny-rnn`, with the settings pinned."""
    models = tmp_path_factory.mktemp("golden-models")
    shutil.copy(DEFAULT_MODEL, models / "default.safetensors")
    for name in ("tiny", "tiny-rnn"):
        shutil.copy(models_dir / f"{name}.safetensors", models / f"{name}.safetensors")
    proc = ServerProcess(["--models-dir", str(models), *SERVER_FLAGS], dict(SERVER_ENV), models_dir=models)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def observed(golden_server: ServerProcess) -> Record:
    """Every scenario's outputs from the running server; written to the golden file with GOLDEN_WRITE=1."""
    outputs = run_all(connect(golden_server.target))
    if WRITE:
        write_golden(outputs)
    return outputs


@pytest.fixture(scope="module")
def expected(recorded: Record | None, observed: Record) -> Record:
    """The recorded outputs per model (what was just observed, when writing)."""
    return observed if recorded is None else recorded["models"]


@pytest.mark.parametrize("model", MODELS)
def test_model_files_are_the_recorded_ones(model: str, expected: Record, observed: Record) -> None:
    """The served model is the one the outputs were recorded with (fingerprint), described alike."""
    want, got = expected[model]["info"], observed[model]["info"]
    assert got["version"] == want["version"], (
        f"model {model!r} has fingerprint {got['version']}, the golden outputs were recorded for "
        f"{want['version']}: its file changed (models/default.safetensors, or the seeded test models of "
        f"tests/conftest.py). If that was intended, regenerate with: {REGENERATE}"
    )
    if difference := first_difference(want, got, model):
        pytest.fail(difference)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("model", MODELS)
def test_outputs_match_the_golden_file(model: str, scenario: str, expected: Record, observed: Record) -> None:
    """One scenario's outputs on one model are exactly the recorded ones (logprobs rounded)."""
    if expected[model]["info"]["version"] != observed[model]["info"]["version"]:
        pytest.fail(f"model {model!r} changed (see test_model_files_are_the_recorded_ones)")
    want = expected[model]["scenarios"].get(scenario)
    assert want is not None, f"{GOLDEN_FILE.name} has no {model}/{scenario}; regenerate with: {REGENERATE}"
    if difference := first_difference(want, observed[model]["scenarios"][scenario], f"{model}.{scenario}"):
        pytest.fail(f"{difference}\n(a behaviour change; if it is intended, regenerate with: {REGENERATE})")


@pytest.mark.parametrize("model", MODELS)
def test_the_recorded_outputs_keep_the_api_contract(model: str, observed: Record) -> None:
    """Sanity of the scenarios themselves: what the API promises holds within one run."""
    runs = observed[model]["scenarios"]
    fresh, after_reset = runs["sampled"]["generated"], runs["reset"]
    assert runs["temporary"]["generated"] == fresh  # same seed, same prompt: same tokens
    assert after_reset["reset"]["position"] == 1
    assert after_reset["fed"]["ids"] == runs["greedy"]["fed"]["ids"]  # reset = a new session
    assert after_reset["generated"]["ids"] == fresh["ids"]
    forked, exported = runs["fork"], runs["export_import"]
    assert forked["same_seed_after"] == forked["parent_after"]  # a fork continues as its parent would
    assert forked["other_seed_after"]["positions"] == forked["parent_after"]["positions"]
    assert exported["imported_after"] == exported["original_after"]
    assert forked["before"]["ids"] + forked["parent_after"]["ids"] == fresh["ids"]
    for run in (runs["greedy"]["generated"], fresh, forked["parent_after"]):
        assert run["finished"]["reason"] == "FINISH_REASON_LENGTH"
