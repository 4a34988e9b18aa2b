"""What a training run leaves in models/NAME.train/ besides its weights: log.jsonl, curves.png,
and metrics.prom (its final figures in Prometheus text format, for a node-exporter textfile
collector)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile


class RunLog:
    """Append-only JSONL log of evaluations, and a plot of the train and held-out curves."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = run_dir / "log.jsonl"
        self.plot_path = run_dir / "curves.png"
        self.records: list[dict] = []
        if resume_step is not None and self.path.exists():
            # Keep what happened up to the resumed state; later lines belong to a lost future.
            lines = self.path.read_text().splitlines()
            self.records = [r for r in map(json.loads, lines) if r.get("step", 0) <= resume_step]
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, **record: object) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        """Bits per byte against tokens seen, for the train and held-out splits."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        evals = [r for r in self.records if r.get("event") == "eval"]
        train = [r for r in self.records if r.get("event") == "train"]
        if not evals:
            return
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(
            [r["tokens_seen"] / 1e6 for r in train],
            [r["bits_per_byte"] for r in train],
            label="train",
            alpha=0.8,
        )
        ax.plot(
            [r["tokens_seen"] / 1e6 for r in evals],
            [r["heldout_bits_per_byte"] for r in evals],
            label="held-out",
            marker="o",
        )
        ax.set_xlabel("tokens seen (millions)")
        ax.set_ylabel("bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=110)
        plt.close(fig)


def write_prom_file(
    path: Path, model: str, heldout_bits_per_byte: float, tokens_seen: int, seconds: float
) -> None:
    """The run's final figures as Prometheus gauges, written atomically."""
    registry = CollectorRegistry()
    figures = [
        ("heldout_bits_per_byte", "Held-out bits per byte of the best checkpoint", heldout_bits_per_byte),
        ("tokens_seen", "Training tokens processed", tokens_seen),
        ("duration_seconds", "Wall time of the training run, resumed parts included", seconds),
        ("finished_timestamp_seconds", "Unix time the run finished", time.time()),
    ]
    for name, documentation, value in figures:
        Gauge(f"lstm_serve_training_{name}", documentation, ["model"], registry=registry).labels(model).set(
            value
        )
    write_to_textfile(str(path), registry)
