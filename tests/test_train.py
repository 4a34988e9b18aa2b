import json
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from server import checkpoint
from server.generate import generate_text
from server.model import ModelConfig, RecurrentLM
from server.sampling import SamplingParams
from server.training.config import TrainConfig
from server.training.corpus import load_corpus, recorded_source, stdlib_documents
from server.training.precision import cpu_has_native_bf16, cpuinfo_flags, resolve_autocast
from server.training.state import load_run_state
from server.training.train import evaluate, train

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = dict(
    hidden=48,
    embed=16,
    batch_size=8,
    seq_len=32,
    eval_interval=40,
    eval_tokens=4096,
    warmup_steps=10,
    progress=False,
)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A few hundred KB of real Python source, copied so that the test owns it."""
    root = tmp_path_factory.mktemp("corpus")
    for name in ["json", "email"]:
        shutil.copytree(STDLIB / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_short_run_lowers_heldout_loss_and_the_checkpoint_samples(tmp_path, corpus_dir, cell):
    cfg = TrainConfig(
        corpus=[str(corpus_dir)], out=tmp_path / "m.safetensors", cell=cell, max_steps=120, lr=1e-2, **SMALL
    )
    torch.manual_seed(cfg.seed)
    untrained = RecurrentLM(ModelConfig(cell=cell, hidden=48, embed=16))
    corpus = load_corpus(cfg.corpus)
    before = evaluate(untrained, corpus.heldout, cfg, torch.device("cpu"))

    result = train(cfg)

    assert result.finished and result.steps == 120
    assert result.heldout_bits_per_byte < before - 2.5, (before, result.heldout_bits_per_byte)
    ckpt = checkpoint.load(cfg.out)
    summary = ckpt.meta.training
    assert ckpt.meta.model.cell == cell
    assert summary.corpus_digest == corpus.digest and summary.corpus == [corpus_dir.name]  # no absolute path
    assert summary.heldout_bits_per_byte == result.heldout_bits_per_byte
    assert summary.tokens_seen == summary.steps * 8 * 32 and summary.seed == cfg.seed
    assert {"log.jsonl", "curves.png", "last.safetensors", "trainer.pt", "metrics.prom"} <= {
        p.name for p in cfg.run_dir.iterdir()
    }
    prom = {
        s.name: s.samples[0]
        for s in text_string_to_metric_families((cfg.run_dir / "metrics.prom").read_text())
    }
    assert prom["lstm_serve_training_heldout_bits_per_byte"].value == pytest.approx(
        result.heldout_bits_per_byte
    )
    assert prom["lstm_serve_training_heldout_bits_per_byte"].labels == {"model": "m"}
    assert prom["lstm_serve_training_tokens_seen"].value == 120 * 8 * 32
    assert 0 < prom["lstm_serve_training_duration_seconds"].value < 600
    assert abs(prom["lstm_serve_training_finished_timestamp_seconds"].value - time.time()) < 600
    evals = [json.loads(line) for line in (cfg.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["event"] == "eval"] == [40, 80, 120]
    text = "".join(generate_text(cfg.out, "def ", 60, SamplingParams(temperature=0.8), seed=1))
    assert len(text) > 10


def test_stop_and_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, corpus_dir):
    common = dict(
        corpus=[str(corpus_dir)], layers=2, dropout=0.1, max_steps=60, **SMALL | {"eval_interval": 25}
    )
    straight = TrainConfig(out=tmp_path / "a" / "m.safetensors", **common)
    assert train(straight).finished

    split = TrainConfig(out=tmp_path / "b" / "m.safetensors", stop_after_steps=30, **common)
    first = train(split)
    assert not first.finished and first.steps == 30
    resumed = train(TrainConfig(out=split.out, resume=True, progress=False))
    assert resumed.finished and resumed.steps == 60

    for name in ["m.safetensors", "m.train/last.safetensors"]:
        a, b = checkpoint.load(tmp_path / "a" / name), checkpoint.load(tmp_path / "b" / name)
        assert a.fingerprint == b.fingerprint, name
    assert resumed.heldout_bits_per_byte == checkpoint.load(straight.out).meta.training.heldout_bits_per_byte


def test_max_minutes_alone_chooses_and_records_a_horizon(tmp_path, corpus_dir):
    cfg = TrainConfig(corpus=[str(corpus_dir)], out=tmp_path / "m.safetensors", max_minutes=0.15, **SMALL)
    started = time.monotonic()
    result = train(cfg)
    took = time.monotonic() - started
    records = [json.loads(line) for line in (cfg.run_dir / "log.jsonl").read_text().splitlines()]
    horizon = [r for r in records if r["event"] == "horizon"]
    assert len(horizon) == 1 and horizon[0]["horizon"] > 20
    assert checkpoint.load(cfg.out).meta.training.horizon_steps == horizon[0]["horizon"]
    assert result.steps <= horizon[0]["horizon"]
    assert took < 0.15 * 60 + 5  # the final evaluation fits in the budget


def test_ctrl_c_stops_after_the_step_and_leaves_a_resumable_state(tmp_path, corpus_dir):
    out = tmp_path / "m.safetensors"
    args = [
        "train",
        "--corpus",
        str(corpus_dir),
        "--out",
        str(out),
        "--max-steps",
        "100000",
        "--hidden",
        "32",
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--eval-interval",
        "20",
        "--eval-tokens",
        "512",
        "--no-progress",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out.with_suffix(".train") / "trainer.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    resumed = run_cli("train", "--out", str(out), "--resume", "--stop-after-steps", "1", "--no-progress")
    assert resumed.returncode == 3 and "stopped at step" in resumed.stderr


@pytest.mark.parametrize(
    "corpus_args,message",
    [
        (["/nonexistent/corpus/dir"], "matching any file"),
        (["EMPTY"], "no non-empty UTF-8 text"),
    ],
)
def test_missing_or_empty_corpus_is_a_one_line_error(tmp_path, corpus_args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    corpus = [str(tmp_path / "empty") if a == "EMPTY" else a for a in corpus_args]
    proc = run_cli("train", "--corpus", *corpus, "--out", str(tmp_path / "m.safetensors"), "--max-steps", "5")
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_corpus_too_small_for_the_batch_says_what_to_lower(tmp_path):
    (tmp_path / "a.txt").write_text("tiny text " * 20)
    proc = run_cli(
        "train",
        "--corpus",
        str(tmp_path / "a.txt"),
        "--out",
        str(tmp_path / "m.safetensors"),
        "--max-steps",
        "5",
    )
    assert proc.returncode == 2 and "--batch-size" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_without_a_saved_run_is_a_clear_error(tmp_path):
    proc = run_cli("train", "--out", str(tmp_path / "m.safetensors"), "--resume")
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr


def test_corpus_paths_are_recorded_without_the_machines_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recorded_source("data/*.py") == "data/*.py"
    assert recorded_source(str(tmp_path / "data" / "a.py")) == "data/a.py"
    assert recorded_source("/srv/corpora/python") == "python"


def test_default_corpus_is_the_stdlib_without_tests_or_site_packages():
    _, docs = stdlib_documents()
    names = [d.name for d in docs]
    assert "json/decoder.py" in names and "os.py" in names
    excluded = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert not [n for n in names if excluded.intersection(Path(n).parts)]
    corpus = load_corpus([])
    assert corpus.sources == [f"python-stdlib:{platform.python_version()}"]  # no install path recorded
    assert len(corpus.train) > 1_000_000 and 0 < len(corpus.heldout) < len(corpus.train) / 5
    assert load_corpus([]).digest == corpus.digest


CPUINFO_X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl {extra} rdpid
"""


@pytest.mark.parametrize(
    "extra,native",
    [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512_vnni", False), ("", False)],
)
def test_native_bf16_is_read_from_the_cpu_flags(extra, native):
    assert cpu_has_native_bf16(CPUINFO_X86.format(extra=extra)) is native
    assert "avx512f" in cpuinfo_flags(CPUINFO_X86.format(extra=extra))


def test_no_flags_line_means_no_native_bf16():
    assert cpu_has_native_bf16("processor : 0\nmodel name : something\n") is False
    assert cpuinfo_flags("") == set()


def test_autocast_auto_resolves_by_device_and_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_autocast("auto", cpu, native_bf16=True) == "bf16"
    assert resolve_autocast("auto", cpu, native_bf16=False) == "off"
    assert resolve_autocast("auto", cuda, native_bf16=False) == "bf16"
    assert (
        resolve_autocast("off", cuda) == "off" and resolve_autocast("bf16", cpu, native_bf16=False) == "bf16"
    )
    assert resolve_autocast("auto", cpu) in {"bf16", "off"}  # this machine's answer, whichever it is
    with pytest.raises(ValueError):
        TrainConfig(max_steps=1, autocast="fp16")


def test_the_run_records_the_resolved_autocast_and_bf16_trains(tmp_path, corpus_dir):
    cfg = TrainConfig(
        corpus=[str(corpus_dir)],
        out=tmp_path / "m.safetensors",
        max_steps=40,
        autocast="bf16",
        lr=1e-2,
        **SMALL,
    )
    torch.manual_seed(cfg.seed)
    before = evaluate(
        RecurrentLM(ModelConfig(hidden=48, embed=16)),
        load_corpus(cfg.corpus).heldout,
        cfg,
        torch.device("cpu"),
    )
    result = train(cfg)
    assert result.finished and result.heldout_bits_per_byte < before - 1.0
    start = json.loads((cfg.run_dir / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["config"]["autocast"] == "bf16"
    saved, run = load_run_state(cfg.run_dir)
    assert saved.autocast == "bf16" and run.carry.h.dtype == torch.float32  # the carry stays fp32


def test_a_run_saved_before_the_autocast_setting_resumes_in_fp32_on_the_cpu(tmp_path, corpus_dir):
    common = dict(corpus=[str(corpus_dir)], max_steps=30, autocast="off", **SMALL | {"eval_interval": 15})
    straight = TrainConfig(out=tmp_path / "a" / "m.safetensors", **common)
    assert train(straight).finished
    split = TrainConfig(out=tmp_path / "b" / "m.safetensors", stop_after_steps=15, **common)
    train(split)
    trainer_pt = split.run_dir / "trainer.pt"
    state = torch.load(trainer_pt, weights_only=True)
    legacy = json.loads(state["config_json"])
    del legacy["autocast"]  # as written before the setting existed
    state["config_json"] = json.dumps(legacy)
    torch.save(state, trainer_pt)
    resumed = train(TrainConfig(out=split.out, resume=True, progress=False))
    assert resumed.finished
    a, b = (
        checkpoint.load(tmp_path / "a" / "m.train/last.safetensors"),
        checkpoint.load(split.run_dir / "last.safetensors"),
    )
    assert a.fingerprint == b.fingerprint
