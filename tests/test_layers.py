"""The layering of docs/layers.md, at every import depth: no import climbs a layer, the
core imports no Dagster, and no modules import each other in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("selfimprove_dagster", "assets", "resources")


def layer_table() -> list[tuple[int, str, list[str]]]:
    """(number, name, module prefixes) per row of docs/layers.md's table."""
    rows = []
    for line in (REPO / "docs/layers.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1], re.findall(r"`([\w.]+)`", cells[2])))
    return rows


def project_modules() -> dict[str, Path]:
    """Module name -> file; the Dagster layers under their import names
    (`selfimprove_dagster.assets...`, `selfimprove_dagster.resources...`)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package != "selfimprove_dagster":
                parts = ["selfimprove_dagster", *parts]
            found[".".join(parts)] = path
    return found


def imported_names(path: Path, module: str) -> list[tuple[str, int]]:
    """Every module name an import node in the file may refer to (with its line),
    function-level imports included: `from a.b import c` gives a.b and a.b.c."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.append((target, node.lineno))
            names += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return names


def layer_of(module: str, table) -> tuple[int, str]:
    """The layer whose longest module prefix matches `module`."""
    best = None
    for number, name, prefixes in table:
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), number, name)
    assert best is not None, f"{module} is in no layer of docs/layers.md: add it to the table"
    return best[1], best[2]


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` refers to (an attribute import resolves to its module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_edges():
    modules = project_modules()
    for module, path in modules.items():
        for name, line in imported_names(path, module):
            target = resolve(name, modules) if name.split(".")[0] == "selfimprove_dagster" else None
            # A package importing its own submodules (re-exports) is not an edge upward;
            # nor is a module's import of the root package (it only names a subpackage).
            own = target is not None and (target == module or target.startswith(module + "."))
            if target and not own and target != "selfimprove_dagster":
                yield module, target, f"{path.relative_to(REPO)}:{line}"


def test_every_module_has_a_layer():
    table = layer_table()
    assert [n for n, _, _ in table] == list(range(len(table)))
    for module in project_modules():
        layer_of(module, table)


def test_no_import_climbs_a_layer():
    table = layer_table()
    climbing = sorted(
        f"{where}: {source} (layer {layer_of(source, table)[1]}) imports {target} "
        f"(layer {layer_of(target, table)[1]})"
        for source, target, where in import_edges()
        if layer_of(target, table)[0] > layer_of(source, table)[0]
    )
    assert not climbing, "imports that climb a layer:\n" + "\n".join(climbing)


def test_the_core_imports_no_dagster():
    table = layer_table()
    core_top = next(n for n, name, _ in table if name == "rounds")
    modules = project_modules()
    found = []
    for module, path in modules.items():
        if not module.startswith("selfimprove_dagster") or layer_of(module, table)[0] > core_top:
            continue
        for name, line in imported_names(path, module):
            top = name.split(".")[0]
            layer = name.split(".")[1] if top == "selfimprove_dagster" and "." in name else ""
            if top == "dagster" or top.startswith("dagster_") or layer in ("assets", "resources"):
                found.append(f"{path.relative_to(REPO)}:{line}: {module} imports {name}")
    assert not found, "core modules importing the Dagster layers:\n" + "\n".join(found)


def test_no_import_circles():
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for source, target, line in import_edges():
        graph.setdefault(source, set()).add(target)
        where.setdefault((source, target), line)
    circles = []
    for cycle in _cycles(graph):
        edges = [
            f"{a} -> {b} ({where[(a, b)]})"
            for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)
        ]
        circles.append("; ".join(edges))
    assert not circles, "import circles:\n" + "\n".join(circles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules) per strongly connected component with > 1 module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_a_cycle(sorted(component), graph))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def _a_cycle(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A concrete cycle through the component's first module (breadth-first)."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph.get(v, set()) & members):
            if w == start:
                return paths[v]
            if w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    return component
