"""The import direction of server/'s layers, read from the source (no module is imported).

    server/cli.py         the entry point: may import anything
    server/api/           the gRPC front end process: the only place that imports grpc
    server/engine/        the engine core process: engine, scheduler, model registry
    server/ipc/           the messages between the two processes and their channel
    server/durability/    state dir: snapshots, write-ahead log, recovery
    server/sessions/      sessions, their jobs and events, residency, blobs
    server/kernels/       step backends and the state pool they index
    server/*.py           shared: model, tokenizer, checkpoint, sampling, config, errors, device
    server/training/      the training job: beside the serving layers, on the shared modules only

A module may import its own layer and the layers below it, but the front end (api/) runs in
its own process and reaches the engine core only through ipc/: it imports no engine,
durability or kernels module, and no torch (checked on a real import too). Each package's
docstring says what it owns; this test is what keeps the picture true.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SERVER = ROOT / "server"
RANKS = {"shared": 0, "kernels": 1, "sessions": 2, "durability": 3, "ipc": 4, "engine": 5, "api": 6, "cli": 7}
GRPC_LAYERS = {"api", "cli"}
BEYOND_THE_FRONT_END = {"engine", "durability", "kernels"}  # in the engine core process


def layer_of(module: str) -> str:
    """'server.engine.core' -> 'engine'; a top-level module is shared, but for the entry point."""
    parts = module.split(".")
    if module == "server.cli":
        return "cli"
    if len(parts) > 2 or (len(parts) == 2 and (SERVER / parts[1]).is_dir()):
        return parts[1]
    return "shared"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from server import tokenizer` names modules; `from server.x import Y` a module
            names = (
                [f"{node.module}.{a.name}" for a in node.names] if node.module == "server" else [node.module]
            )
            found += [(node.lineno, name) for name in names]
    return found


def violations(path: Path) -> list[str]:
    importer = module_name(path)
    source = layer_of(importer)
    problems = []
    for line, imported in imports_of(path):
        where = f"{path.relative_to(ROOT)}:{line} imports {imported}"
        if imported.split(".")[0] == "grpc" or imported.startswith(("grpc_", "client.lstmserve")):
            if source not in GRPC_LAYERS:
                problems.append(f"{where}: only server/api/ speaks gRPC")
            continue
        if not imported.startswith("server.") and imported != "server":
            continue
        target = layer_of(imported)
        if target == "training" or source == "training":
            if source != target and source != "cli" and target != "shared":
                problems.append(f"{where}: training and serving meet only in cli.py and the shared modules")
        elif RANKS[target] > RANKS[source]:
            problems.append(f"{where}: layer {source} may not import the higher layer {target}")
        elif source == "api" and target in BEYOND_THE_FRONT_END:
            problems.append(f"{where}: the front end reaches the engine core process only through ipc/")
    if source == "api" and any(name.split(".")[0] == "torch" for _, name in imports_of(path)):
        problems.append(f"{path.relative_to(ROOT)} imports torch: the front end must not")
    return problems


SOURCES = sorted(SERVER.rglob("*.py"))


def test_every_module_is_in_a_known_layer():
    layers = {layer_of(module_name(p)) for p in SOURCES}
    assert layers <= set(RANKS) | {"training"}, layers - set(RANKS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SERVER)))
def test_imports_point_down(path: Path):
    assert violations(path) == []


def test_the_check_catches_an_upward_import_and_grpc_outside_the_edge(tmp_path, monkeypatch):
    fake = SERVER / "sessions" / "store.py"
    monkeypatch.setattr(
        Path, "read_text", lambda self, *a, **k: "import grpc\nfrom server.engine import core\n"
    )
    found = violations(fake)
    assert len(found) == 2
    assert "only server/api/ speaks gRPC" in found[0] and "may not import the higher layer engine" in found[1]


def test_the_check_catches_the_front_end_reaching_into_the_engine(monkeypatch):
    fake = SERVER / "api" / "service.py"
    monkeypatch.setattr(
        Path, "read_text", lambda self, *a, **k: "import torch\nfrom server.engine.core import Engine\n"
    )
    found = violations(fake)
    assert len(found) == 2, found
    assert "only through ipc/" in found[0] and "imports torch" in found[1]


def test_the_front_end_loads_no_torch():
    """What the running front end imports, transitively: no torch, numpy only if a shared module needs it."""
    code = "import sys, server.api.serve, server.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_package_says_what_it_owns():
    for init in SERVER.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, (
            f"{init.relative_to(ROOT)} needs a docstring: what it owns, what it may import"
        )
