"""The layout's rules, read from the source (ast): dependencies point one way (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fastpadim"
# Modules that must run where PyTorch is not installed (pip install 'fastpadim[runtime]').
TORCH_FREE = {"errors", "files", "sizes", "regions", "images", "sources", "results", "visualize", "onnx_runtime", "serve", "batcher",
              "metadata", "_version", "http_api", "http_line", "lineage", "records", "records.store", "records.inspection",
              "recording", "watching", "feedback", "drift", "metrics", "access", "kept_images", "model_registry",
              "calibration", "engines", "ahead", "quantize", "timing", "gaussian", "array_ops", "onnx_fit", "network_graph", "presets", "export"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, module_level_only: bool = False) -> set[str]:
    """Absolute names a module imports (relative imports resolved); with ``module_level_only``, only the
    statements run when the module is imported (not inside functions, nor under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                if not module_level_only:
                    visit(child, False)
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                if not module_level_only:
                    visit(child, top)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in child.names if f"{target}.{alias.name}" in MODULES)
            visit(child, top)

    visit(tree, True)
    return found


def internal(names: set[str], own: str) -> set[str]:
    return {n for n in names if n in MODULES and n != own and not own.startswith(n + ".") and n != "fastpadim"}


GRAPH = {name: internal(imports_of(path), name) for name, path in MODULES.items()}


def is_cli(name: str) -> bool:
    return name == "fastpadim.cli" or name.startswith("fastpadim.cli.") or name == "fastpadim.__main__"


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, trail + [nxt])
        state[node] = 2

    for start in sorted(GRAPH):
        if start not in state:
            walk(start, [start])
    assert cycles == []


def test_the_command_line_is_a_leaf():
    broken = []
    for name, path in MODULES.items():
        if is_cli(name):
            continue
        names = imports_of(path)
        bad = sorted(n for n in names if is_cli(n) or n.split(".")[0] in ("typer", "rich"))
        if bad:
            broken.append(f"{name} imports {bad}")
    assert broken == []


def test_the_root_never_imports_evaluation():
    root = [n for n in MODULES if n.count(".") == 1 and not is_cli(n)]
    assert "fastpadim.evaluation" in MODULES
    broken = [f"{n} imports {sorted(t for t in GRAPH[n] if t.startswith('fastpadim.evaluation'))}" for n in root
              if any(t.startswith("fastpadim.evaluation") for t in GRAPH[n])]
    assert broken == []


def test_the_torch_free_set_imports_no_torch_when_loaded():
    """Module-level imports only, followed through the package: importing these never loads torch."""
    broken = []
    for short in sorted(TORCH_FREE):
        start = f"fastpadim.{short}"
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name in seen or name not in MODULES:
                continue
            seen.add(name)
            names = imports_of(MODULES[name], module_level_only=True)
            if any(n.split(".")[0] in ("torch", "torchvision", "timm") for n in names):
                broken.append(f"{start} loads torch through {name}")
            todo.extend(internal(names, name))
    assert broken == []


def test_no_module_calls_a_private_method_of_padim():
    tree = ast.parse((PACKAGE / "model.py").read_text())
    padim = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Padim")
    private = sorted({f.name for f in padim.body if isinstance(f, ast.FunctionDef) and f.name.startswith("_")
                      and not f.name.startswith("__")})
    pattern = re.compile(r"(?<!self)(?<!super\(\))\.(" + "|".join(private) + r")\(")
    broken = [f"{path.relative_to(SRC)}:{n}: {line.strip()}" for name, path in MODULES.items() if name != "fastpadim.model"
              for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert broken == []


def test_every_command_is_registered_in_one_list():
    from fastpadim.cli.app import COMMANDS, app

    registered = sorted(c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands)
    assert registered == sorted(name for name, _ in COMMANDS)


def test_padim_follows_scikit_learn_conventions():
    sklearn_base = pytest.importorskip("sklearn.base")
    from fastpadim import Padim

    model = Padim(backbone="resnet18", n_features=7, seed=3)
    copy = sklearn_base.clone(model)
    assert copy is not model and copy.get_params() == model.get_params()
    assert copy.set_params(seed=4).seed == 4
    assert not any(name.endswith("_") for name in vars(Padim(seed=1)))  # __init__ stores parameters only
