"""Training text: find the files, split them by file into train and held-out, tokenize.

With no paths given, the corpus is the running interpreter's standard library source
(`*.py`, without site-packages, dist-packages and test folders): present everywhere,
no download. The split is by file and deterministic (a hash of each file's path), so
adding files never moves another file across it. Every document becomes
`<bos> bytes <eos>`, matching a served session, which starts by absorbing `<bos>`.
"""

from __future__ import annotations

import glob
import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from server.tokenizer import BOS, EOS

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
HELDOUT_FRACTION = 0.05


class CorpusError(ValueError):
    """A corpus that cannot be trained on; the message says what to fix."""


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root it was found under; decides the split
    data: bytes


@dataclass(frozen=True)
class Corpus:
    sources: list[str]  # what was asked for, as recorded in the checkpoint (see recorded_source)
    digest: str  # sha256 over every document's name and content digest
    train: torch.Tensor  # int16 token stream
    heldout: torch.Tensor

    @property
    def total_bytes(self) -> int:
        return len(self.train) + len(self.heldout)


def stdlib_documents() -> tuple[str, list[Document]]:
    """The standard library's Python source, without site-packages and tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [
        Document(str(p.relative_to(root)), p.read_bytes())
        for p in sorted(root.rglob("*.py"))
        if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()
    ]
    return f"python-stdlib:{platform.python_version()}", docs  # the digest says which files exactly


def recorded_source(source: str) -> str:
    """A corpus path as the checkpoint records it: relative to the working directory when it is
    inside it, else its last component, so that no build machine's absolute paths ship."""
    path = Path(source)
    if not path.is_absolute():
        return source
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return path.name


def find_documents(source: str) -> list[Document]:
    """The text files named by `source`: a file, a directory (recursive) or a glob."""
    path = Path(source)
    if path.is_file():
        return [Document(path.name, path.read_bytes())]
    if path.is_dir():
        files = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
        ]
        return [Document(str(p.relative_to(path)), p.read_bytes()) for p in files]
    matches = sorted(Path(m) for m in glob.glob(source, recursive=True) if Path(m).is_file())
    if not matches:
        raise CorpusError(f"corpus path {source!r} is not a file, a directory or a glob matching any file")
    return [Document(str(p), p.read_bytes()) for p in matches]


def is_text(data: bytes) -> bool:
    """UTF-8 text without NUL bytes (binary files are skipped)."""
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def load_corpus(sources: list[str]) -> Corpus:
    """Find, check, split and tokenize the corpus; raises CorpusError with what to fix."""
    if sources:
        docs = [d for s in sources for d in find_documents(s)]
        labels = [recorded_source(s) for s in sources]
    else:
        label, docs = stdlib_documents()
        labels = [label]
    docs = [d for d in docs if d.data and is_text(d.data)]
    if not docs:
        raise CorpusError(f"the corpus {labels} holds no non-empty UTF-8 text files")
    train, heldout = split(docs)
    return Corpus(labels, digest(docs), tokens(train), tokens(heldout))


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """Hold out about HELDOUT_FRACTION of the files, chosen by a hash of their names.

    A single document is split at 95% of its length instead (there is no other file).
    """
    if len(docs) == 1:
        doc = docs[0]
        cut = int(len(doc.data) * (1 - HELDOUT_FRACTION))
        return [Document(doc.name, doc.data[:cut])], [Document(doc.name + "#heldout", doc.data[cut:])]
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).digest())
    n_heldout = max(1, round(len(docs) * HELDOUT_FRACTION))
    held = {d.name for d in ranked[:n_heldout]}
    return [d for d in docs if d.name not in held], [d for d in docs if d.name in held]


def digest(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in sorted(docs, key=lambda d: d.name):
        h.update(d.name.encode() + b"\0" + hashlib.sha256(d.data).digest())
    return h.hexdigest()


def tokens(docs: list[Document]) -> torch.Tensor:
    """`<bos> bytes <eos>` for each document, concatenated: int16 [N]."""
    parts = []
    for d in docs:
        body = torch.frombuffer(bytearray(d.data), dtype=torch.uint8).to(torch.int16)
        parts += [torch.tensor([BOS], dtype=torch.int16), body, torch.tensor([EOS], dtype=torch.int16)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int16)
