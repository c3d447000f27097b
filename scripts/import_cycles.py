"""The import graph of lofit_ray, read from the source (every `import`, at module level or inside a function,
relative ones resolved), and its cycles: strongly connected components of more than one module. Imports under
`if TYPE_CHECKING:` are left out (they never run). An import of a.b.c is an edge to a.b.c alone: Python also
runs a/__init__.py and a/b/__init__.py first, but counting those would make every module depend on
lofit_ray/__init__.py and hide the knots this is for.
Run: python scripts/import_cycles.py  (prints each cycle's modules and the import lines that close it)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lofit_ray"


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import node, skipping the bodies of `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                yield from _imports_in(child)
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _imports(node)


def graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported module: line number of the first such import}, within the package only."""
    mods = modules(root, package)
    edges: dict[str, dict[str, int]] = {name: {} for name in mods}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                    base = ".".join([*up, *([base] if base else [])])
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in mods else base)
            for target in targets:
                while target and target not in mods:  # `import a.b.c.name` or a name inside a module
                    target = target.rpartition(".")[0]
                if target and target.split(".")[0] == package and target != name:
                    edges[name].setdefault(target, node.lineno)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found, key=lambda c: (-len(c), c))


def describe(edges: dict[str, dict[str, int]], component: list[str]) -> str:
    members = set(component)
    mods = modules()
    lines = [" <-> ".join(component)]
    for a in component:
        for b, lineno in sorted(edges[a].items()):
            if b in members:
                lines.append(f"    {mods[a].relative_to(ROOT)}:{lineno} imports {b}")
    return "\n".join(lines)


def main() -> int:
    edges = graph()
    found = cycles(edges)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports within {PACKAGE}, {len(found)} cycles")
    for component in found:
        print(describe(edges, component))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
