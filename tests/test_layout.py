"""The package's shape: layers by folder, checked from the source (ast, nothing run) and by importing it.

Rules (README "How it works"):
- only ui/ and app.py import gradio;
- a module imports only its own layer and the layers below it:
  vocabulary (params, errors, events, images, files) < weights < memory < jobs < engine < worker < ui, CLI;
  in particular the engine, weights, memory and job-store layers never import the UI or the worker;
- no import cycles between modules, counting imports inside functions too;
- nothing happens at import: no statement at module level other than imports, definitions and
  assignments, and importing every module starts no thread, builds no torch module, touches no GPU
  and writes no file.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "framepack_local"

# Lower rank = lower layer. A module may import modules of its own rank or below.
VOCABULARY = {"params", "errors", "events", "images", "files"}
FOLDER_RANKS = {"weights": 1, "memory": 2, "jobs": 3, "engine": 4}
TOP_RANKS = {"worker": 5, "pipeline": 5, "doctor": 5, "__main__": 6, "__init__": 6}
UI_RANK = 6


def module_name(path: Path) -> str:
    if path == REPO / "app.py":
        return "app"
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    files["app"] = REPO / "app.py"
    return files


def rank(module: str) -> int:
    if module == "app":
        return UI_RANK
    parts = module.split(".")
    if len(parts) == 1:  # the package itself (its lazy re-exports resolve on use)
        return TOP_RANKS["__init__"]
    if parts[1] in VOCABULARY:
        return 0
    if parts[1] in FOLDER_RANKS:
        return FOLDER_RANKS[parts[1]]
    if parts[1] == "ui":
        return UI_RANK
    return TOP_RANKS[parts[1]]


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[str, int]]:
    """Every module this file imports (anywhere in it), resolved to the most specific known name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return found


@pytest.fixture(scope="module")
def graph():
    files = source_files()
    known = set(files)
    return files, {name: imports_of(path, name, known) for name, path in files.items()}


def test_only_the_ui_imports_gradio(graph):
    files, edges = graph
    offenders = [f"{name}:{line}" for name, imported in edges.items() for target, line in imported
                 if target.split(".")[0] == "gradio" and not (name == "app" or name.startswith("framepack_local.ui"))]
    assert offenders == []
    assert any(t.startswith("gradio") for t, _ in edges["framepack_local.ui.layout"])  # the check sees imports


def test_layers_import_only_downwards(graph):
    files, edges = graph
    offenders = []
    for name, imported in edges.items():
        for target, line in imported:
            if target in files and rank(target) > rank(name):
                offenders.append(f"{name}:{line} imports {target}")
    assert offenders == []
    # engine, weights, memory and the job store never reach the UI or the worker
    for name, imported in edges.items():
        if rank(name) <= FOLDER_RANKS["engine"]:
            assert not [t for t, _ in imported if t.startswith(("framepack_local.ui", "framepack_local.worker"))], name


def test_every_module_has_a_layer(graph):
    files, _ = graph
    for name in files:
        rank(name)  # raises KeyError for a module outside the known layers


def test_no_import_cycles(graph):
    files, edges = graph
    adjacency = {name: sorted({t for t, _ in imported if t in files and t != name}) for name, imported in edges.items()}
    # Tarjan's strongly connected components; any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in adjacency[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in adjacency:
        if node not in index:
            visit(node)
    assert cycles == []


def test_import_parsing_sees_planted_upward_and_self_imports(tmp_path):
    """The checks above rest on this parsing: a planted upward import and a self-import are resolved."""
    planted = tmp_path / "framepack_local" / "engine"
    planted.mkdir(parents=True)
    (planted / "bad.py").write_text("from ..ui import layout\nfrom . import bad\n", encoding="utf-8")
    name = "framepack_local.engine.bad"
    imported = imports_of(planted / "bad.py", name, {name, "framepack_local.ui.layout"})
    assert ("framepack_local.ui.layout", 1) in imported and (name, 2) in imported
    assert rank("framepack_local.ui.layout") > rank(name)


ALLOWED_TOP_LEVEL = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
                     ast.AnnAssign)


def test_module_level_code_only_defines(graph):
    files, _ = graph
    offenders = []
    for name, path in files.items():
        if name == "app":
            continue  # the entry point: sets one environment default before importing gradio
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for i, node in enumerate(tree.body):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and i == 0:
                continue  # docstring
            if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
                continue
            if not isinstance(node, ALLOWED_TOP_LEVEL):
                offenders.append(f"{name}:{node.lineno} {type(node).__name__}")
    assert offenders == []


IMPORT_ALL = r"""
import gc, importlib, json, os, sys, threading

def facts():
    import torch
    return {
        "threads": sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()),
        "cuda_initialized": torch.cuda.is_initialized(),
        "torch_modules": sum(1 for o in gc.get_objects() if isinstance(o, torch.nn.Module)),
        "gradio": "gradio" in sys.modules,
        "cwd_files": sorted(os.listdir(".")),
    }

import framepack_local
lazy_package = "torch" not in sys.modules  # the package's re-exports resolve on first use only
below_ui, ui = json.loads(sys.argv[1])
for name in below_ui:
    importlib.import_module(name)
first = facts()
for name in ui:
    importlib.import_module(name)
from framepack_local import Engine, JobParams
from framepack_local.pipeline import Engine as OldEngine
from framepack_local.params import JobParams as Params
print(json.dumps({"lazy_package": lazy_package, "below_ui": first, "all": facts(),
                  "names_kept": Engine is OldEngine and JobParams is Params}))
"""


def test_importing_every_module_does_nothing(graph, tmp_path):
    """One subprocess: the package alone imports no torch; every layer below the UI imports no gradio;
    nothing at all starts a thread, builds a torch module, initialises CUDA or writes a file; and
    Engine / JobParams are still where the README and older scripts find them."""
    files, _ = graph
    ui = sorted(n for n in files if n == "app" or n.startswith("framepack_local.ui"))
    below_ui = sorted(n for n in files if n not in ui)
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, json.dumps([below_ui, ui])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    quiet = {"threads": [], "cuda_initialized": False, "torch_modules": 0, "cwd_files": []}
    assert result["below_ui"] == {**quiet, "gradio": False}
    assert result["all"] == {**quiet, "gradio": True}
    assert result["lazy_package"] and result["names_kept"]
