"""Settings of a training run; saved with its resumable state."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.model import Cell
from server.training.precision import Autocast


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    corpus: list[str] = []  # files, directories or globs; empty: the Python standard library
    out: Path = Path("models/default.safetensors")
    # model
    cell: Cell = "lstm"
    layers: int = Field(1, ge=1)
    hidden: int = Field(512, ge=1)
    embed: int = Field(128, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # data: each of `batch_size` rows is a contiguous stream, cut into chunks of `seq_len`
    batch_size: int = Field(64, ge=1)
    seq_len: int = Field(128, ge=1)
    # optimisation: AdamW, linear warmup, cosine decay to min_lr_ratio * lr
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # arithmetic: "auto" is bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere;
    # a run stores the resolved choice ("bf16" or "off"), which --resume keeps (see precision.py)
    autocast: Autocast = "auto"
    # length: the schedule spans max_steps; with only max_minutes it is estimated
    max_steps: int | None = Field(None, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    stop_after_steps: int | None = Field(None, ge=1)
    # evaluation and logging
    eval_interval: int = Field(200, ge=1)
    eval_tokens: int = Field(262_144, ge=1)
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: bool = False
    progress: bool = True

    @model_validator(mode="after")
    def _needs_a_length(self) -> TrainConfig:
        if not self.resume and self.max_steps is None and self.max_minutes is None:
            raise ValueError("give --max-steps or --max-minutes (or both) to set the run's length")
        return self

    @property
    def run_dir(self) -> Path:
        """models/NAME.train/ beside models/NAME.safetensors: everything but the best weights."""
        return self.out.with_suffix(".train")
