"""The models a server serves: every top-level `*.safetensors` in the models directory.

A model is named by its file stem; its version is the checkpoint's fingerprint. Each loaded
version gets a runtime: its weights on the device, a state pool, a step backend and a
scheduler. An invalid file is skipped with a log line (and a metric), never fatal.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server import checkpoint
from server.classifier import HeadSpec
from server.config import ServeSettings
from server.device import pick_device
from server.engine.scheduler import Scheduler, StepStats
from server.errors import NotFound
from server.kernels import make_backend
from server.kernels.state_pool import StatePool
from server.metrics import Metrics
from server.sessions.residency import DeviceResidency

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelRuntime:
    name: str
    meta: checkpoint.CheckpointMeta
    path: Path
    device: torch.device
    pool: StatePool
    residency: DeviceResidency
    scheduler: Scheduler
    backend_name: str
    dtype: torch.dtype

    @property
    def version(self) -> str:
        return self.meta.fingerprint

    @property
    def heads(self) -> tuple[HeadSpec, ...]:
        """Its classification heads (none for a language model only)."""
        return self.meta.model.heads

    @property
    def vocab_size(self) -> int:
        return self.meta.model.vocab_size

    def zero_logits(self) -> np.ndarray:
        """Placeholder next-token logits of a session that has absorbed nothing yet."""
        return np.zeros(self.vocab_size, dtype=np.float32)


class ModelRegistry:
    def __init__(self, settings: ServeSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = pick_device(settings.device)
        self._models: dict[str, list[ModelRuntime]] = {}  # name -> versions, newest last
        self._seen: dict[Path, tuple[int, int]] = {}  # file -> (mtime, size) when last read

    def scan(self) -> list[ModelRuntime]:
        """Load the top-level *.safetensors files that are new or changed since the last scan.

        Every loaded version stays (sessions keep theirs); the newest one of a name serves
        new sessions. An invalid file is refused with a log line and a metric.
        """
        models_dir = self.settings.models_dir
        if not models_dir.is_dir():
            raise ValueError(f"models directory {models_dir} does not exist")
        added = []
        for path in sorted(models_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            stat = path.stat()
            if self._seen.get(path) == (stat.st_mtime_ns, stat.st_size):
                continue
            self._seen[path] = (stat.st_mtime_ns, stat.st_size)
            try:
                runtime = self.add(path)
            except (checkpoint.CheckpointError, ValueError) as e:
                log.error("refusing model file %s: %s", path, e)
                self.metrics.invalid_model_files.inc()
                continue
            if runtime is not None:
                added.append(runtime)
        return added

    def add(self, path: Path) -> ModelRuntime | None:
        """Load a model file as a version of the model named by its stem (None: already loaded)."""
        started = time.perf_counter()
        loaded = checkpoint.load(path, self.device)
        if self.by_fingerprint(loaded.fingerprint) is not None:
            return None
        runtime = self._runtime(path.stem, loaded)
        self._models.setdefault(runtime.name, []).append(runtime)
        seconds = time.perf_counter() - started
        self.metrics.model_load_duration.labels(runtime.name).observe(seconds)
        cfg = loaded.meta.model
        self.metrics.init_model(runtime.name, runtime.backend_name)
        self.metrics.model_info.labels(
            runtime.name,
            runtime.version,
            cfg.cell,
            str(cfg.layers),
            str(cfg.hidden),
            runtime.backend_name,
            str(self.device),
        ).set(1)
        log.info(
            "loaded model %s version %s (%s, %d layers, hidden %d) in %.2fs",
            runtime.name,
            runtime.version[:12],
            cfg.cell,
            cfg.layers,
            cfg.hidden,
            seconds,
        )
        return runtime

    def _runtime(self, name: str, loaded: checkpoint.Checkpoint) -> ModelRuntime:
        s, metrics = self.settings, self.metrics
        pool = StatePool(
            loaded.meta.model, self.device, initial_slots=min(64, s.device_slots), max_slots=s.device_slots
        )
        dtype = None if s.dtype == "auto" else DTYPES[s.dtype]
        backend = make_backend(loaded.model, pool, s.backend, dtype)
        moved = {
            "to_host": metrics.sessions_to_host.labels(name),
            "to_device": metrics.sessions_to_device.labels(name),
        }
        residency = DeviceResidency(pool, on_move=lambda direction: moved[direction].inc())
        step_hist = metrics.step_duration.labels(name, backend.name)
        batch_hist, wait_hist = metrics.batch_size.labels(name), metrics.queue_wait.labels(name)
        fed, generated = metrics.tokens_fed.labels(name), metrics.tokens_generated.labels(name)

        def on_iteration(stats: StepStats) -> None:
            step_hist.observe(stats.seconds)
            batch_hist.observe(stats.rows)
            if stats.fed:  # each update of a multiprocess metric writes its mmap'd file
                fed.inc(stats.fed)
            if stats.generated:
                generated.inc(stats.generated)
            for wait in stats.queue_wait:
                wait_hist.observe(wait)

        heads = loaded.meta.model.heads
        scheduler = Scheduler(
            backend,
            residency,
            s.max_batch_size,
            s.max_queue,
            s.prefill_chunk,
            on_iteration,
            classify=loaded.model.to(torch.float32).classify if heads else None,
            labels={head.name: head.labels for head in heads},
        )
        return ModelRuntime(
            name,
            loaded.meta,
            loaded.path,
            self.device,
            pool,
            residency,
            scheduler,
            backend.name,
            backend.dtype,
        )

    def get(self, name: str, version: str = "") -> ModelRuntime:
        """The model `name` at `version` (a fingerprint or a unique prefix of one), else its newest."""
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"unknown model {name!r}; loaded models: {known}")
        if not version:
            return versions[-1]
        matches = [r for r in versions if r.version.startswith(version)]
        if len(matches) != 1:
            raise NotFound(
                f"model {name!r} has no loaded version {version!r}; loaded: {', '.join(r.version[:12] for r in versions)}"
            )
        return matches[0]

    def by_fingerprint(self, fingerprint: str) -> ModelRuntime | None:
        return next((r for r in self.runtimes() if r.version == fingerprint), None)

    def runtimes(self) -> list[ModelRuntime]:
        return [r for versions in self._models.values() for r in versions]
