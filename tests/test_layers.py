"""The package's shape: no import cycle among sctune's modules, no private name imported across modules, no
module over 500 lines, and the layers of core/, service/ and present/. Read from the source (every import statement, at module level or inside a function,
counts as an arrow), so it holds for code paths the other tests do not run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sctune"
MAX_LINES = 500  # one concern a module: past this, a module is doing two things


def _modules() -> dict[str, Path]:
    """Dotted name inside the package -> file, for every module (sub-packages too)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name or "__init__"] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, str]]:
    """(imported module, imported name) for every sctune import in the file."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "sctune":
                target = ".".join(node.module.split(".")[1:])
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in known:  # ``from . import tensorboard``: the module itself
                    out.append((sub, ""))
                else:
                    out.append((target or "__init__", alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sctune":
                    out.append((".".join(alias.name.split(".")[1:]) or "__init__", ""))
    return [(t, n) for t, n in out if t in known]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t, _ in _imports(m, p, set(mods)) if t != m and t != "__init__"} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_sctune_modules():
    assert _cycles(_graph()) == []


def test_no_private_name_imported_across_modules():
    mods = _modules()
    private = [f"{m} imports {n} from {t}" for m, p in mods.items() for t, n in _imports(m, p, set(mods))
               if t != m and n.startswith("_") and not n.startswith("__")]
    assert private == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_at_most_500_lines(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"sctune/{name}: {lines} lines"


# The service's Ray wiring: what starts Ray, runs Tune's stages and trials, or reads Tune's state.
RAY_WIRING = {"service.stages", "service.trainables", "service.searchers", "service.ray_session",
              "service.pipeline", "service.tune_state", "service.storage", "service.cluster"}


def test_the_layers_in_the_tree():
    """core/ imports nothing from service/ or present/ (it runs without them: plain PyTorch, a Ray worker);
    present/ reads what the service writes but never its Ray wiring."""
    graph = _graph()
    assert {m: sorted(t for t in ts if not t.startswith("core")) for m, ts in graph.items()
            if m.startswith("core.") and any(not t.startswith("core") for t in ts)} == {}
    assert {m: sorted(ts & RAY_WIRING) for m, ts in graph.items() if m.startswith("present.") and ts & RAY_WIRING} == {}
    assert not [m for m in graph if "." not in m and m not in ("__init__", "core", "service", "present", "search", "api")]


def test_tests_and_benchmarks_import_no_private_sctune_name():
    """They use what the package offers: a name they need is public."""
    root = PACKAGE.parent
    found = []
    for path in sorted([*root.glob("tests/*.py"), *root.glob("benchmarks/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sctune":
                found += [f"{path.name}: {a.name} from {node.module}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def _level(graph: dict[str, set[str]], module: str, seen: dict[str, int]) -> int:
    """Layers below ``module``: the longest chain of imports under it (0: imports nothing of sctune)."""
    if module not in seen:
        seen[module] = 1 + max((_level(graph, m, seen) for m in graph[module]), default=-1)
    return seen[module]


def test_readme_walk_of_one_parameter_goes_down_the_layers():
    """README's "Follow one parameter": every hop names a function that exists, in a module lower than the one
    before, never returning to a module it has left."""
    import importlib
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    walk = readme[readme.index("**Follow one parameter.**"):readme.index("Choices worth knowing:")]
    hops = re.findall(r"^\d+\. `(\w+)\.([\w.]+)`", walk, flags=re.MULTILINE)
    assert len(hops) >= 8, hops
    dotted = {m.rsplit(".", 1)[-1]: m for m in _modules()}  # README names a module by its file's name
    for module, name in hops:
        obj = importlib.import_module(f"sctune.{dotted[module]}")
        for part in name.split("."):
            obj = getattr(obj, part)
    graph, seen = _graph(), {}
    levels = [_level(graph, dotted[module], seen) for module, _ in hops]
    assert levels == sorted(levels, reverse=True) and len(set(levels)) == len(levels), list(zip(hops, levels, strict=True))
