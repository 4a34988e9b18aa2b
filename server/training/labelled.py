"""Labelled text for classification: JSONL lines of {"text": ..., "label": ...}, split and checked.

The held-out split is by a hash of each line (about `HELDOUT_FRACTION` of them), so adding
lines never moves another across it; `--eval-data` gives a held-out file instead. Every
problem is reported with what to fix: the file and line, or the label.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from server import tokenizer

HELDOUT_FRACTION = 0.1


class DataError(ValueError):
    """Labelled data that cannot be trained on; the message names the line or the label."""


@dataclass(frozen=True)
class Example:
    tokens: list[int]  # <bos> and the text's bytes: what a session that was fed the text absorbed
    label: int  # index into Dataset.labels
    line: int  # 1-based, for messages


@dataclass(frozen=True)
class Dataset:
    labels: tuple[str, ...]  # sorted
    train: list[Example]
    heldout: list[Example]
    digest: str  # sha256 of the file(s) read

    def counts(self, split: str) -> list[int]:
        """Examples per label in one split, in label order."""
        found = Counter(e.label for e in getattr(self, split))
        return [found[i] for i in range(len(self.labels))]


def read_lines(path: Path) -> list[tuple[int, str, str, bytes]]:
    """(line number, text, label, raw line) of every non-blank line; DataError on the first bad one."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from e
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(
                f'{where}: not a JSON object ({e}); each line must be {{"text": ..., "label": ...}}'
            ) from e
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or "label" not in item:
            raise DataError(f'{where}: each line must be an object {{"text": "...", "label": "..."}}')
        if not item["text"]:
            raise DataError(f"{where}: empty text; remove the line or give it text")
        if not isinstance(item["label"], str | int) or str(item["label"]) == "":
            raise DataError(f"{where}: the label must be a non-empty string (or an integer)")
        rows.append((number, item["text"], str(item["label"]), line))
    if not rows:
        raise DataError(f"{path}: no examples (an empty file?)")
    return rows


def heldout(raw_line: bytes) -> bool:
    return hashlib.sha256(raw_line).digest()[0] < 256 * HELDOUT_FRACTION


def load_dataset(path: Path, eval_path: Path | None = None) -> Dataset:
    """The examples of `path` split into train and held-out (or held out from `eval_path`)."""
    rows = read_lines(path)
    eval_rows = read_lines(eval_path) if eval_path is not None else None
    labels = tuple(sorted({label for _, _, label, _ in rows + (eval_rows or [])}))
    index = {label: i for i, label in enumerate(labels)}

    def example(number: int, text: str, label: str) -> Example:
        return Example([tokenizer.BOS, *tokenizer.encode(text)], index[label], number)

    if eval_rows is None:
        train = [example(n, t, lab) for n, t, lab, raw in rows if not heldout(raw)]
        held = [example(n, t, lab) for n, t, lab, raw in rows if heldout(raw)]
    else:
        train = [example(n, t, lab) for n, t, lab, _ in rows]
        held = [example(n, t, lab) for n, t, lab, _ in eval_rows]
    digest = hashlib.sha256(path.read_bytes() + (eval_path.read_bytes() if eval_path else b"")).hexdigest()
    dataset = Dataset(labels, train, held, digest)
    if len(labels) < 2:
        raise DataError(f"{path}: every example has the label {labels[0]!r}; a classifier needs at least two")
    for label, n_train, n_held in zip(labels, dataset.counts("train"), dataset.counts("heldout")):
        if not n_train or not n_held:
            missing = "training" if not n_train else "held-out"
            raise DataError(
                f"label {label!r} has no {missing} example ({n_train + n_held} in all): give it more examples, "
                f"or remove it" + ("" if eval_path else ", or give a held-out file with --eval-data")
            )
    return dataset
