"""`lstm-serve`: train a model, sample from a checkpoint, serve models over gRPC."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train",
        help="train a language model on a text corpus, or a classifier (--task classify) (truncated BPTT)",
    )
    p.add_argument(
        "--task",
        choices=["lm", "classify"],
        default="lm",
        help="lm: next-token prediction on --corpus; classify: a head on labelled --data (default: %(default)s)",
    )
    c = p.add_argument_group("classify", "with --task classify")
    c.add_argument("--data", type=Path, help='JSONL, one {"text": ..., "label": ...} per line')
    c.add_argument("--eval-data", type=Path, help="held-out JSONL (default: a hash-chosen tenth of --data)")
    c.add_argument(
        "--init", type=Path, help="start from this language model (its encoder frozen unless --fine-tune)"
    )
    c.add_argument("--fine-tune", action="store_true", help="train the --init model's encoder too")
    c.add_argument("--head", default="label", help="the head's name (default: %(default)s)")
    c.add_argument("--head-hidden", type=int, help="an MLP head with this many tanh units (default: linear)")
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument(
        "--bptt", type=int, default=256, help="tokens each example backpropagates through (its last)"
    )
    p.add_argument(
        "--corpus",
        nargs="*",
        default=[],
        metavar="PATH",
        help="files, directories or globs of text (default: the Python standard library source)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("models/default.safetensors"),
        help="best checkpoint; the rest goes to OUT's .train/ folder",
    )
    p.add_argument("--cell", choices=["lstm", "rnn"], default="lstm")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--max-steps", type=int, help="the schedule's length in steps")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="time budget; alone, it sets the schedule's length from measured steps",
    )
    p.add_argument(
        "--stop-after-steps", type=int, help="stop at this step, leaving a state that --resume continues"
    )
    p.add_argument(
        "--autocast",
        choices=["auto", "bf16", "off"],
        default="auto",
        help="bf16 autocast: auto = on CUDA and on CPUs with native bf16 (avx512_bf16/amx_bf16); "
        "off = fp32 (default: %(default)s)",
    )
    p.add_argument("--eval-interval", type=int, default=200)
    p.add_argument("--eval-tokens", type=int, default=262_144)
    p.add_argument(
        "--resume", action="store_true", help="continue the run saved in OUT's .train/ folder exactly"
    )
    p.add_argument(
        "--existing",
        choices=["overwrite", "skip"],
        default="overwrite",
        help="when OUT already holds a valid checkpoint: train anyway, or do nothing (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    if args.task == "classify":
        return run_train_classifier(args)
    from server import checkpoint
    from server.training.config import TrainConfig
    from server.training.train import train

    if args.existing == "skip" and not args.resume and args.out.exists():
        try:
            found = checkpoint.load(args.out)
        except checkpoint.CheckpointError as e:
            print(f"lstm-serve: {e}; training a new one", file=sys.stderr)
        else:
            print(
                f"lstm-serve: {args.out} exists (version {found.fingerprint[:12]}); nothing to do",
                file=sys.stderr,
            )
            return 0
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    result = train(TrainConfig(**fields))
    return 0 if result.finished else 3


def run_train_classifier(args: argparse.Namespace) -> int:
    import logging

    from server.training.classify import ClassifyConfig, train_classifier

    if args.data is None:
        raise ValueError("--task classify needs --data FILE.jsonl")
    if args.out == Path("models/default.safetensors"):
        raise ValueError(
            "--task classify needs --out models/NAME.safetensors (not the default language model's file)"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fields = {k: v for k, v in vars(args).items() if k in ClassifyConfig.model_fields and v is not None}
    result = train_classifier(ClassifyConfig(**fields))
    print(
        f"lstm-serve: {args.out}: held-out accuracy {result.accuracy:.3f}, macro-F1 {result.macro_f1:.3f} "
        f"(epoch {result.epochs}, {result.wall_seconds:.0f} s); confusion [true][predicted] {result.confusion}",
        file=sys.stderr,
    )
    return 0


def add_sample_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("sample", help="generate text from a checkpoint, without the server")
    p.add_argument("--checkpoint", type=Path, default=Path("models/default.safetensors"))
    p.add_argument("--prompt", default="")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from server.generate import generate_text
    from server.sampling import SamplingParams

    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    params.validate()
    for piece in generate_text(args.checkpoint, args.prompt, args.max_tokens, params, args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    from server.config import ServeSettings  # pydantic only: cheap

    p = commands.add_parser(
        "serve",
        help="serve every models/*.safetensors over gRPC",
        description="Every flag also reads an LSTM_SERVE_<FLAG> environment variable (flags win).",
    )
    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = {int: int, float: float}.get(field.annotation, str)
        p.add_argument(
            flag,
            dest=name,
            type=kind,
            default=None,
            help=f"{field.description or ''} (default: {field.default})".strip(),
        )
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import os
    import shutil
    import tempfile

    from server.config import ServeSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServeSettings(
        **{k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    )
    # both processes' metrics meet here (prometheus-client reads the variable at import)
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        shutil.rmtree(given, ignore_errors=True)  # a former run's values must not count
        os.makedirs(given)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="lstm-serve-metrics-")
    from server.api.serve import serve

    try:
        return asyncio.run(serve(settings))
    finally:
        if not given:
            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstm-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_parser(commands)
    add_sample_parser(commands)
    add_serve_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except ImportError as e:
        print(
            f"lstm-serve: {e}: the server needs its extra: pip install 'lstm-serve[server]'", file=sys.stderr
        )
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors()
        )
        print(f"lstm-serve: invalid settings: {problems}", file=sys.stderr)
    except (ValueError, FileNotFoundError, FloatingPointError, ChildProcessError) as e:
        print(f"lstm-serve: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
