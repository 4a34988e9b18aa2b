"""`lstm-client classify`: a text's labels, or how they move as a file streams into a session."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from client.cli_commands import EXIT_OK, UsageError, connect, emit
from client.messages import Classification, label_probabilities
from client.sync_client import Client


def classifier(client: Client, requested: str | None) -> str:
    """The model asked for, else the only one served with classification heads."""
    if requested:
        return requested
    names = sorted({m.name for m in client.list_models() if m.heads})
    if len(names) == 1:
        return names[0]
    raise UsageError(
        f"choose a model with --model: {', '.join(names)}"
        if names
        else "no served model has classification heads: train one with `lstm-serve train --task classify`"
    )


def summary(classification: Classification) -> str:
    """'position 42  language=python 0.93  ...': each head's top label and its probability."""
    heads = label_probabilities(classification)
    tops = [f"{h.name}={h.top_label} {heads[h.name][h.top_label]:.2f}" for h in classification.heads]
    return f"position {classification.position}  " + "  ".join(tops)


def as_dict(classification: Classification) -> dict:
    return {"position": classification.position, "heads": label_probabilities(classification)}


def chunks(path: str, size: int) -> Iterator[str]:
    """The file's text (stdin for '-') in pieces of `size` characters, as it is read."""
    source = sys.stdin if path == "-" else Path(path).open(encoding="utf-8", errors="replace")
    with source:
        while piece := source.read(size):
            yield piece


def classify(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.stream is None):
        raise UsageError("give a TEXT to classify, or --stream FILE")
    with connect(args) as client:
        model = classifier(client, args.model)
        if args.text is not None:
            text = sys.stdin.read() if args.text == "-" else args.text
            answer = client.classify(text, model=model)
            if args.json:
                emit(as_dict(answer))
            else:
                for head, labels in label_probabilities(answer).items():
                    ranked = sorted(labels.items(), key=lambda item: -item[1])
                    print(f"{head}: " + "  ".join(f"{label} {p:.3f}" for label, p in ranked))
            return EXIT_OK
        with client.create_session(model) as session:  # deleted at the end
            for piece in chunks(args.stream, args.chunk):
                answer = session.feed(piece, classify=True).classification
                if args.json:
                    emit(as_dict(answer))
                else:
                    print(summary(answer), flush=True)
    return EXIT_OK


def add_parser(command, commands: argparse._SubParsersAction) -> None:
    p = command(
        commands,
        "classify",
        "a text's labels from a model's classification heads, or (--stream FILE) how they move as it arrives",
    )
    p.add_argument("text", nargs="?", metavar="TEXT", help="the text to classify ('-': read stdin)")
    p.add_argument(
        "--stream", metavar="FILE", help="feed FILE ('-': stdin) piece by piece, classifying after each"
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=64,
        metavar="N",
        help="characters per piece with --stream (default: %(default)s)",
    )
    p.add_argument("--model", metavar="NAME", help="default: the only served model with classification heads")
    p.set_defaults(run=classify)
