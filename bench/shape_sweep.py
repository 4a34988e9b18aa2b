"""Which model shape trains best in a fixed wall time: the default model's shape, measured.

    python bench/shape_sweep.py                          # 1x512 and 2x384, 5 minutes each
    python bench/shape_sweep.py --minutes 10 --shapes 1x512 2x384 1x768

Each shape (LAYERSxHIDDEN, embedding 128) is trained by `lstm-serve train --max-minutes M`
on the default corpus with every other setting at its default, one after the other on an
otherwise idle machine; the table compares held-out bits per byte reached (the best
checkpoint's, from its own metadata), tokens seen and the checkpoint's size. Prints a table,
writes JSON (bench/results/shape_sweep.json by default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.serve_bench import machine, table  # noqa: E402
from server import checkpoint  # noqa: E402

BIN = Path(sys.executable).parent


def train(shape: str, minutes: float, workdir: Path) -> dict:
    layers, hidden = (int(x) for x in shape.split("x"))
    out = workdir / f"{shape}.safetensors"
    command = [str(BIN / "lstm-serve"), "train", "--out", str(out), "--layers", str(layers)]
    command += ["--hidden", str(hidden), "--max-minutes", str(minutes), "--no-progress"]
    print(f"{shape}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    summary = checkpoint.load(out).meta.training
    return {
        "shape": shape,
        "heldout_bits_per_byte": summary.heldout_bits_per_byte,
        "train_bits_per_byte": summary.train_bits_per_byte,
        "tokens_seen": summary.tokens_seen,
        "steps": summary.steps,
        "wall_seconds": summary.wall_seconds,
        "checkpoint_mb": round(out.stat().st_size / 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["1x512", "2x384"], help="LAYERSxHIDDEN")
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-time budget of each run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/shape_sweep.json")
    args = parser.parse_args()
    report = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory() as tmp:
        report["runs"] = [train(shape, args.minutes, Path(tmp)) for shape in args.shapes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    keys = ["shape", "heldout_bits_per_byte", "train_bits_per_byte", "tokens_seen", "steps", "wall_seconds"]
    rows = [
        [f"{r[k]:.3f}" if k.endswith("per_byte") else r[k] for k in [*keys, "checkpoint_mb"]]
        for r in report["runs"]
    ]
    print(table([*keys, "checkpoint_mb"], rows))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
