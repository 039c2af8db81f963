"""The package's layout shows its architecture (issue 24): the import graph of ``metabench``, read from the source
files with ``ast`` (nothing is imported), has no cycle, and its layers depend downwards only:

    root (metabench/__init__)  <  core  <  datasets  <  models  <  run  <  report, perf  <  cli

``core`` imports nothing else from metabench; ``datasets`` only ``core``; ``models`` only ``core`` and ``datasets``;
``report`` and ``perf`` never import each other. An import placed inside a function (or a lambda, or ``__import__``
/ ``importlib.import_module`` of a literal name) counts in the graph like any other; it must say why it is there
with a ``# lazy: ...`` comment (on its line or the comment lines just above its block of imports), which is for
keeping a command such as ``metabench --help`` from importing what it does not use, never for dodging a cycle.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS = {"root": 0, "core": 1, "datasets": 2, "models": 3, "run": 4, "report": 5, "perf": 5, "cli": 6}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool
    marked: bool  # a "# lazy:" comment says why it is inside a function


def package_dirs() -> dict[str, Path]:
    """``{package: folder}`` of every package pyproject.toml lists (its ``package-dir`` mapping)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = setuptools["package-dir"]
    out = {}
    for package in setuptools["packages"]:
        base = max((name for name in roots if package == name or package.startswith(name + ".")), key=len)
        out[package] = REPO / roots[base] / Path(*package[len(base):].lstrip(".").split(".") if package != base
                                                else ())
    return out


def modules() -> dict[str, Path]:
    """``{module name: file}`` of every module of the listed packages (a package as its ``__init__.py``)."""
    out = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _marked(lines: list[str], node: ast.stmt) -> bool:
    """A "# lazy:" comment on the import's lines, or on the comment / import lines just above it."""
    if any("# lazy:" in line for line in lines[node.lineno - 1:node.end_lineno]):
        return True
    i = node.lineno - 2
    while i >= 0 and lines[i].strip().startswith(("#", "from ", "import ")):
        if "# lazy:" in lines[i]:
            return True
        i -= 1
    return False


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's package
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[:len(parts) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:  # `from package import module` names the module
            yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
    elif isinstance(node, ast.Call):  # __import__("metabench.x") / importlib.import_module("metabench.x")
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name in ("__import__", "import_module") and node.args and isinstance(node.args[0], ast.Constant):
            yield str(node.args[0].value)


def import_graph() -> list[Edge]:
    known = modules()
    edges = []
    for module, path in known.items():
        text = path.read_text()
        lines = text.splitlines()

        def visit(node: ast.AST, in_function: bool, module: str = module, path: Path = path,
                  lines: list[str] = lines) -> None:
            for target in _targets(node, module, path.stem == "__init__", set(known)):
                if target == "metabench" or target.startswith("metabench."):
                    stmt = node if isinstance(node, ast.stmt) else None
                    marked = stmt is not None and _marked(lines, stmt)
                    edges.append(Edge(module, target, node.lineno, in_function, marked))
            inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            for child in ast.iter_child_nodes(node):
                visit(child, inner)

        visit(ast.parse(text, str(path)), False)
    return edges


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "metabench":
        return "root"
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1]


def test_every_package_is_listed_and_every_module_is_known() -> None:
    listed = package_dirs()
    for package, folder in listed.items():
        assert (folder / "__init__.py").is_file(), f"{package}: {folder} has no __init__.py"
    for base in ("metabench", "metabench.datasets", "metabench.models"):
        for init in listed[base].rglob("__init__.py"):
            package = ".".join([base, *init.parent.relative_to(listed[base]).parts])
            if "splits" not in init.parts:
                assert package in listed, f"{init.parent} is a package that pyproject.toml does not list"
    known = modules()
    unknown = sorted({e.target for e in import_graph() if e.target not in known})
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    assert {layer(m) for m in known} <= set(LAYERS), sorted({layer(m) for m in known} - set(LAYERS))


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for edge in import_graph():
        if edge.source != edge.target:
            graph.setdefault(edge.source, set()).add(edge.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                walk(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layers_depend_downwards_only() -> None:
    wrong = [f"{e.source}:{e.line} ({layer(e.source)}) imports {e.target} ({layer(e.target)})"
             for e in import_graph()
             if layer(e.target) != layer(e.source) and LAYERS[layer(e.target)] >= LAYERS[layer(e.source)]]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_imports_inside_functions_say_why() -> None:
    unmarked = [f"{e.source}:{e.line} imports {e.target}" for e in import_graph()
                if e.in_function and not e.marked]
    assert not unmarked, ("imports inside a function without a '# lazy: <why>' comment (never to dodge a cycle):\n"
                          + "\n".join(unmarked))
