"""The import graph of the s3xfer package, read from its source with `ast` (nothing imported).

tests/unit/test_layers.py checks it: no import circle, no import from a lower layer to a
higher one, no module over MAX_LINES lines, no exception class outside errors.py.
`python -m tests.import_graph` prints the diagram drawn in docs/architecture.md.

What counts as an import: every `import` / `from ... import` statement of the package's
modules, at module level or inside a function (a lazy import runs too, only later). Imports
under `if TYPE_CHECKING:` never run: they are kept apart (`Graph.type_only`), left out of the
circle check, and an upward one must be listed in TYPE_ONLY_UPWARD with its reason. The root
package's lazy public names (`importlib` in s3xfer/__init__.py) are not import statements and
are not edges: at run time the root imports nothing, so it is ranked with the base modules.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "s3xfer"
ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 800

# Lowest first; a module may import modules of its own layer and of the layers below it.
# localfs is not a base module as the data-flow picture has it: it reads shard members by
# their tar layout (dataset/tarpack.py) and takes the survey's FileEntry, so it sits above
# planning, with destination.py, its writing half (restored modes checked by
# dataset/validate.py); only write/ and read/ use them.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "s3xfer",
            "errors",
            "config",
            "limits",
            "checksums",
            "budget",
            "malloc",
            "runner",
            "locals3",
        ),
    ),
    ("dataset", ("dataset",)),
    ("planning", ("planning",)),
    ("localfs/destination", ("localfs", "destination")),
    ("transport", ("transport",)),
    ("write/read", ("write", "read")),
    ("distributed/bench", ("distributed", "bench")),
    ("cli", ("cli", "__main__")),
)

# Upward imports that exist only for type annotations, each with why it is not a real one.
TYPE_ONLY_UPWARD: dict[tuple[str, str], str] = {
    (
        "s3xfer.dataset.manifest",
        "s3xfer.planning.plan",
    ): "Manifest.select_changed / shard_unchanged take the plan's units and read their fields",
}


@dataclass
class Graph:
    modules: dict[str, Path]  # dotted name -> file
    lines: dict[str, int]
    imports: dict[str, set[str]] = field(default_factory=dict)  # run-time edges
    type_only: dict[str, set[str]] = field(default_factory=dict)  # under TYPE_CHECKING


def layer_of(module: str) -> int:
    """The rank of a module of the package in LAYERS (0 is the lowest)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else PACKAGE
    for rank, (_, members) in enumerate(LAYERS):
        if top in members:
            return rank
    raise KeyError(f"{module}: in no layer of tests/import_graph.py LAYERS")


def _module_names(root: Path) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:
                inside.update(id(n) for n in ast.walk(statement))
    return inside


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names an import statement of `module` may refer to, most specific first."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    for alias in node.names:
        yield f"{source}.{alias.name}"  # `from pkg import module`
        yield source


def build(root: Path = ROOT) -> Graph:
    modules = _module_names(root)
    graph = Graph(
        modules=modules,
        lines={name: len(path.read_text().splitlines()) for name, path in modules.items()},
    )
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        hidden = _type_checking_nodes(tree)
        is_package = path.name == "__init__.py"
        runtime: set[str] = set()
        typing_only: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            found: set[str] = set()
            for target in _targets(node, name, is_package):
                if target.split(".")[0] != PACKAGE:
                    continue
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                found.add(target)
            # `from .pkg import module` names both pkg and pkg.module: keep the module
            found = {t for t in found if not any(o.startswith(t + ".") for o in found)}
            (typing_only if id(node) in hidden else runtime).update(found - {name})
        graph.imports[name] = runtime
        graph.type_only[name] = typing_only - runtime
    return graph


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return sorted(found)


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a module to one of a higher layer."""
    return sorted(
        (source, target)
        for source, targets in edges.items()
        for target in targets
        if layer_of(target) > layer_of(source)
    )


def long_modules(graph: Graph, limit: int = MAX_LINES) -> dict[str, int]:
    return {name: n for name, n in sorted(graph.lines.items()) if n > limit}


def _is_exception_base(base: ast.expr, known: set[str]) -> bool:
    name = ast.unparse(base).rsplit(".", 1)[-1]
    return name in known or name.endswith(("Error", "Exception")) or name == "BaseException"


def exception_classes(graph: Graph) -> dict[str, list[str]]:
    """Exception classes defined outside errors.py, per module, except private ones whose
    definition is preceded by a comment saying why they stay (STYLE.md rule 13)."""
    known = {"Exception", "BaseException", "ValueError", "ConnectionError"}
    errors = ast.parse(graph.modules[f"{PACKAGE}.errors"].read_text())
    known.update(n.name for n in errors.body if isinstance(n, ast.ClassDef))
    found: dict[str, list[str]] = {}
    for name, path in graph.modules.items():
        if name == f"{PACKAGE}.errors":
            continue
        text = path.read_text()
        source_lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.ClassDef):
                continue
            if not any(_is_exception_base(base, known) for base in node.bases):
                continue
            above = source_lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if node.name.startswith("_") and above.startswith("#"):
                continue  # private, and says why it is not in errors.py
            found.setdefault(name, []).append(node.name)
    return found


def _short(module: str) -> str:
    return module.removeprefix(f"{PACKAGE}.") if module != PACKAGE else f"{PACKAGE}/__init__"


def diagram(graph: Graph) -> str:
    """The layers, highest first: each module with its line count and what it imports from
    other modules (run time; `(types: ...)` for TYPE_CHECKING-only imports)."""
    out: list[str] = []
    for rank in reversed(range(len(LAYERS))):
        label = LAYERS[rank][0]
        members = [m for m in graph.modules if layer_of(m) == rank]
        below = sorted(
            {LAYERS[layer_of(t)][0] for m in members for t in graph.imports[m]} - {label},
            key=lambda name: -[n for n, _ in LAYERS].index(name),
        )
        out.append(f"{label}" + (f"  ──▶ {', '.join(below)}" if below else ""))
        for module in members:
            if module != PACKAGE and graph.modules[module].name == "__init__.py":
                continue  # a sub-package's docstring
            uses = ", ".join(_short(t) for t in sorted(graph.imports[module]))
            types = ", ".join(_short(t) for t in sorted(graph.type_only[module]))
            line = f"  {_short(module):<24} {graph.lines[module]:>5}"
            if uses:
                line += f"  → {uses}"
            if types:
                line += f"  (types: {types})"
            out.append(line)
    return "\n".join(out)


if __name__ == "__main__":
    graph = build()
    print(diagram(graph))
    problems = [
        *(f"circle: {' ↔ '.join(group)}" for group in circles(graph.imports)),
        *(f"upward: {a} → {b}" for a, b in upward(graph.imports)),
        *(f"over {MAX_LINES} lines: {m} ({n})" for m, n in long_modules(graph).items()),
    ]
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.exit(1 if problems else 0)
