"""Build the `language` example's labelled snippets from files every build machine has.

    python scripts/language_data.py --out data/language        # train.jsonl, eval.jsonl, manifest.tsv

Which language is a source snippet written in: `python`, `c` or `cpp`. The files come from
this Python install and the project's own dependencies, so nothing is downloaded, and all
are under permissive licenses that allow shipping weights trained on them:

    python  the standard library's *.py                       PSF-2.0  (Python's LICENSE.txt)
    c       CPython's C API headers, numpy's C API headers     PSF-2.0, BSD-3-Clause
    cpp     PyTorch's c10 and ATen C++ headers                 BSD-3-Clause (torch's LICENSE)

Each file gives up to SNIPPETS_PER_FILE snippets: windows of about SNIPPET_CHARS characters
that start at a line, spread over the file. Files, not snippets, are split between train and
eval (by a hash of the file's path), so no file is on both sides. `manifest.tsv` lists every
file used with its sha256, class, split and license; another Python, numpy or torch version
gives other files, and the manifest says which ones this model saw.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SNIPPET_CHARS = 256
SNIPPETS_PER_FILE = 6
MAX_FILES_PER_CLASS = 600  # the python class has thousands; keep the classes comparable
EVAL_SHARE = 0.15


@dataclass(frozen=True)
class Source:
    label: str
    root: Path  # files are named relative to it in the manifest, under `name`
    name: str
    patterns: tuple[str, ...]
    license: str


def sources() -> list[Source]:
    import numpy
    import torch

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    numpy_include = Path(numpy.get_include())
    torch_include = Path(torch.__file__).parent / "include"
    return [
        Source("python", stdlib, "python-stdlib", ("*.py", "[!s]*/*.py"), "PSF-2.0"),
        Source("c", Path(sysconfig.get_paths()["include"]), "python-include", ("*.h", "*/*.h"), "PSF-2.0"),
        Source("c", numpy_include, "numpy-include", ("numpy/*.h", "numpy/*/*.h"), "BSD-3-Clause"),
        Source("cpp", torch_include, "torch-include", ("c10/*/*.h", "ATen/*.h"), "BSD-3-Clause"),
    ]


def files_of(source: Source) -> list[Path]:
    """The source's files, sorted, without tests and vendored third-party code."""
    found = {p for pattern in source.patterns for p in source.root.glob(pattern) if p.is_file()}
    skip = ("test", "site-packages", "idlelib", "third_party")
    return sorted(p for p in found if not any(part in skip for part in p.relative_to(source.root).parts[:-1]))


def snippets(text: str) -> list[str]:
    """Up to SNIPPETS_PER_FILE windows starting at evenly spread lines, each with some code in it."""
    lines = text.splitlines(keepends=True)
    if not lines:
        return []
    found = []
    step = max(1, len(lines) // SNIPPETS_PER_FILE)
    for start in range(0, len(lines), step):
        window = "".join(lines[start:])[:SNIPPET_CHARS]
        if len(window.split()) >= 8 and len(window) >= SNIPPET_CHARS // 2:
            found.append(window)
        if len(found) == SNIPPETS_PER_FILE:
            break
    return found


def split_of(name: str) -> str:
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return "eval" if digest / 2**64 < EVAL_SHARE else "train"


def build(out: Path) -> dict[str, dict[str, int]]:
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"train": [], "eval": []}
    manifest = ["path\tsha256\tlabel\tsplit\tlicense\tsnippets"]
    per_label: dict[str, list[tuple[Source, Path]]] = {}
    for source in sources():
        per_label.setdefault(source.label, []).extend((source, p) for p in files_of(source))
    for label, entries in sorted(per_label.items()):
        # an even spread over the class's files when there are too many
        step = max(1, len(entries) / MAX_FILES_PER_CLASS)
        chosen = [entries[int(i * step)] for i in range(min(len(entries), MAX_FILES_PER_CLASS))]
        for source, path in chosen:
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            name = f"{source.name}/{path.relative_to(source.root)}"
            split = split_of(name)
            pieces = snippets(text)
            rows[split] += [{"text": piece, "label": label} for piece in pieces]
            manifest.append(
                f"{name}\t{hashlib.sha256(data).hexdigest()}\t{label}\t{split}\t{source.license}\t{len(pieces)}"
            )
    for split, items in rows.items():
        with (out / f"{split}.jsonl").open("w") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
    (out / "manifest.tsv").write_text("\n".join(manifest) + "\n")
    return {
        split: {label: sum(1 for r in items if r["label"] == label) for label in sorted(per_label)}
        for split, items in rows.items()
    }


def rebuild(manifest: Path, split: str) -> list[dict]:
    """The snippets of `split` again, from the files `manifest` lists; ValueError naming the first
    file this machine lacks or holds in another version (its sha256 differs)."""
    roots = {source.name: source.root for source in sources()}
    rows = []
    for line in manifest.read_text().splitlines()[1:]:
        name, digest, label, file_split, _license, _count = line.split("\t")
        if file_split != split:
            continue
        root, _, relative = name.partition("/")
        path = roots[root] / relative
        data = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(
                f"{name}: this machine lacks the file the manifest lists, or has another version"
            )
        rows += [{"text": piece, "label": label} for piece in snippets(data.decode("utf-8"))]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("data/language"))
    args = parser.parse_args()
    counts = build(args.out)
    for split, by_label in counts.items():
        print(f"{split}: {sum(by_label.values())} snippets {by_label}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
