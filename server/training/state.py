"""The resumable state of a training run, in models/NAME.train/.

last.safetensors  the latest weights (a normal checkpoint)
trainer.pt        optimizer state, step, horizon, carried recurrent state, RNG state,
                  the run's settings; tensors and plain values only, loaded with
                  weights_only=True (nothing is unpickled)
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server import checkpoint
from server.model import RecurrentLM, State
from server.training.config import TrainConfig


@dataclass
class RunState:
    horizon: int | None  # the schedule's length in steps; None until a --max-minutes run calibrates
    carry: State  # recurrent state carried from chunk to chunk, [layers, batch, hidden]
    step: int = 0
    best_heldout: float = math.inf
    last_train_bpb: float = math.nan
    elapsed_seconds: float = 0.0
    saved: dict = field(default_factory=dict)  # the loaded trainer.pt, until restore()

    def restore(
        self, model: RecurrentLM, optimizer: torch.optim.Optimizer, corpus_digest: str, device: torch.device
    ) -> None:
        """Put the saved weights, optimizer, carry and RNG state back, exactly."""
        saved = self.saved
        if saved["corpus_digest"] != corpus_digest:
            raise ValueError(
                "the corpus changed since the run was saved (its digest differs); start a new run instead of --resume"
            )
        last = checkpoint.load(saved["run_dir"] + "/last.safetensors")
        if last.fingerprint != saved["weights_fingerprint"]:
            raise ValueError(
                "last.safetensors does not belong to trainer.pt (fingerprints differ); the run folder is inconsistent"
            )
        model.load_state_dict(last.model.state_dict())
        optimizer.load_state_dict(saved["optimizer"])
        h, c = saved["carry_h"].to(device), saved.get("carry_c")
        self.carry = State(h, None if c is None else c.to(device))
        torch.set_rng_state(saved["rng_cpu"])
        if torch.cuda.is_available() and "rng_cuda" in saved:
            torch.cuda.set_rng_state(saved["rng_cuda"])
        self.saved = {}


def save_run_state(
    cfg: TrainConfig, run: RunState, model: RecurrentLM, optimizer: torch.optim.Optimizer, corpus_digest: str
) -> None:
    """Write last.safetensors, then trainer.pt naming it by fingerprint (both atomically)."""
    run_dir = cfg.run_dir
    fingerprint = checkpoint.save(run_dir / "last.safetensors", model)
    state = {
        "config_json": cfg.model_dump_json(),
        "run_dir": str(run_dir),
        "corpus_digest": corpus_digest,
        "weights_fingerprint": fingerprint,
        "step": run.step,
        "horizon": run.horizon,
        "best_heldout": run.best_heldout,
        "last_train_bpb": run.last_train_bpb,
        "elapsed_seconds": run.elapsed_seconds,
        "optimizer": optimizer.state_dict(),
        "carry_h": run.carry.h.detach().cpu(),
        "carry_c": None if run.carry.c is None else run.carry.c.detach().cpu(),
        "rng_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    checkpoint.atomic_write(run_dir / "trainer.pt", buffer.getvalue())


def load_run_state(run_dir: Path) -> tuple[TrainConfig, RunState]:
    """The saved settings and state of the run in `run_dir`; restore() applies the tensors."""
    path = run_dir / "trainer.pt"
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist (start the run without --resume)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    saved["run_dir"] = str(run_dir)
    cfg = TrainConfig.model_validate_json(saved["config_json"])
    run = RunState(
        horizon=saved["horizon"],
        carry=State(saved["carry_h"], saved["carry_c"]),
        step=saved["step"],
        best_heldout=saved["best_heldout"],
        last_train_bpb=saved["last_train_bpb"],
        elapsed_seconds=saved["elapsed_seconds"],
        saved=saved,
    )
    return cfg, run
