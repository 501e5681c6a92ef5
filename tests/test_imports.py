"""Package boundaries: no import cycle between the project's modules (lazy imports inside functions count too),
and the one-way rules between packages. The graph is read from the source (ast), so nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf", "reward_models")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (a `from pkg import mod` names pkg.mod);
    imports under `if TYPE_CHECKING:` are annotations only and do not count."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a module a.b.c, or the nearest package that exists
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as a path that returns to its first node), or None."""
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if color.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in color and (found := visit(m)):
                return found
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(graph):
        if n not in color and (found := visit(n)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_the_projects_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _edges_from(graph, prefix: str):
    return {(a, b) for a, deps in graph.items() if a == prefix or a.startswith(prefix + ".") for b in deps}


@pytest.mark.parametrize("source, forbidden", [
    ("rlhf", "reward_models"),  # reward_models is a client of rlhf, registered through entry points
    ("rlhf.config", "rlhf.algos"),
    ("rlhf.config", "rlhf.engine"),
    ("rlhf.models", "rlhf.trainers"),
    ("rlhf.algos", "rlhf.trainers"),
    ("rlhf.algos", "rlhf.models"),
    ("rlhf.engine", "rlhf.trainers"),
    ("rlhf.rewards", "rlhf.trainers"),
    ("rlhf.rollout", "rlhf.trainers"),
])
def test_dependencies_go_one_way(source, forbidden):
    bad = sorted((a, b) for a, b in _edges_from(import_graph(), source)
                 if b == forbidden or b.startswith(forbidden + "."))
    assert not bad, f"{source} must not import {forbidden}: " + ", ".join(f"{a} -> {b}" for a, b in bad)


def test_reward_models_uses_only_public_rlhf_names():
    private = []
    for path in sorted((ROOT / "reward_models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_no_helper_takes_the_trainer():
    """Below the trainer only rlhf/trainers/trainer.py knows it: the step's helpers take explicit arguments.
    (rlhf/run.py and rlhf/bench.py are clients that drive a Trainer, as a user's script does.)"""
    clients = {ROOT / "rlhf/trainers/trainer.py", ROOT / "rlhf/run.py", ROOT / "rlhf/bench.py"}
    offenders = []
    for path in sorted(ROOT.glob("rlhf/**/*.py")):
        if path in clients:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.args + node.args.kwonlyargs]
                offenders += [f"{path.relative_to(ROOT)}:{node.name}({n})" for n in names if n in ("trainer", "tr")]
    graph = import_graph()
    importers = [a for a, deps in graph.items() if "rlhf.trainers.trainer" in deps
                 and a.startswith(("rlhf.trainers.", "rlhf.rollout", "rlhf.algos", "rlhf.models", "rlhf.engine"))]
    assert not offenders and not importers, (offenders, importers)
