"""The package's layers point down: each part imports only the parts below it, Lightning stays
in ``lightning_compress/lightning/`` and the command line, and no two modules import each other.

Imports are read from the source (every ``import`` statement, function-level and
``TYPE_CHECKING`` ones included), so a dependency hidden inside a function counts as much as one
at the top of a file.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "lightning_compress"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# What each part of the package may import from the others, bottom layer first. A part is a
# subpackage, or a module at the top of the package ("" is the package's own __init__).
ALLOWED: dict[str, set[str]] = {
    # Parsing and validating recipes; built-in modifier classes are found through the registry
    # (recipe/registry.py imports the modifiers package by name, so recipes stay below them).
    "recipe": set(),
    # Layer adapters (Conv1D, fused experts seen as nn.Linear layers): torch and transformers.
    "layers": set(),
    # Sessions, lifecycle, events, state and the tensor helpers shared by everything above.
    "core": {"recipe", "layers"},
    # The bundled model, byte tokenizer, text and perplexity.
    "bundled": set(),
    # The algorithms, and the pipelines that drive calibration: siblings that never import
    # each other (what both need lives in core).
    "modifiers": {"core", "recipe", "layers"},
    "pipelines": {"core", "recipe", "layers"},
    # compressed-tensors checkpoints: reads the modifiers' quantization and sparsity state.
    "export": {"core", "recipe", "layers", "modifiers"},
    # The run's report (compressed, ignored and left-out weights, size, time): it reads the
    # schemes and masks the modifiers leave on the model and the pipelines' coverage.
    "summary": {"core", "recipe", "layers", "modifiers", "pipelines"},
    # Lightning: the callback, one-shot calibration, LightningCLI and the commands it runs.
    "lightning": {
        "core",
        "recipe",
        "layers",
        "modifiers",
        "pipelines",
        "summary",
        "export",
        "bundled",
        "pretrained",
        "cli_options",
        "evaluate",
    },
    # The application: loading models, evaluation and the command line.
    "pretrained": {"bundled", "core", "export"},
    "evaluate": {"bundled", "pipelines"},
    "cli_options": {"core", "pretrained"},
    "evaluate_command": {"bundled", "cli_options", "evaluate", "pretrained"},
    "cli": {"cli_options", "evaluate_command", "lightning"},
    "__main__": {"cli"},
    "": {"core", "modifiers", "recipe"},
}

# The third-party Lightning packages, and the parts allowed to import them.
LIGHTNING_PACKAGES = {"lightning", "pytorch_lightning", "lightning_fabric"}
LIGHTNING_PARTS = {"lightning", "cli", "__main__", "cli_options", "evaluate_command"}


@dataclass(frozen=True)
class Import:
    """One imported module, where it is imported and whether only for type checking."""

    importer: str
    target: str
    line: int
    type_checking: bool

    def __str__(self) -> str:
        path = self.importer.replace(".", "/")
        return f"{path}.py:{self.line} imports {self.target}"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str) -> str:
    """The most specific project module ``module`` names (``pkg.mod.Name`` → ``pkg.mod``)."""
    while module not in MODULES and "." in module:
        module = module.rpartition(".")[0]
    return module


def _imports_of(module: str, path: Path) -> Iterator[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, type_checking: bool) -> Iterator[Import]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, type_checking)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno, type_checking)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}" if base.startswith(PACKAGE) else base
                yield Import(module, target, node.lineno, type_checking)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, type_checking)

    yield from visit(ast.parse(path.read_text(), filename=str(path)), False)


IMPORTS = [found for module, path in MODULES.items() for found in _imports_of(module, path)]
PROJECT_IMPORTS = [
    Import(found.importer, _resolve(found.target), found.line, found.type_checking)
    for found in IMPORTS
    if found.target.split(".")[0] == PACKAGE
]


def part_of(module: str) -> str:
    """The part of the package (a key of ``ALLOWED``) that ``module`` belongs to.

    Args:
        module: a dotted module name inside the package.

    Returns:
        The longest key of ``ALLOWED`` that ``module`` is or is inside.
    """
    inner = module.removeprefix(PACKAGE).removeprefix(".")
    parts = [key for key in ALLOWED if key and (inner == key or inner.startswith(key + "."))]
    return max(parts, key=len, default=inner)


def test_the_allowed_imports_form_layers_without_a_circle():
    def reaches(start: str, seen: tuple[str, ...]) -> None:
        for below in ALLOWED[start]:
            assert below in ALLOWED, f"ALLOWED[{start!r}] names {below!r}, which is no part"
            assert below not in seen, f"the allowed imports go round: {' -> '.join(seen)}"
            reaches(below, (*seen, below))

    for part in ALLOWED:
        reaches(part, (part,))


def test_every_module_belongs_to_a_part_of_the_table():
    homeless = [name for name in MODULES if part_of(name) not in ALLOWED]
    if homeless:
        pytest.fail(f"modules in no part of ALLOWED (add their part): {homeless}")


def test_each_part_imports_only_the_parts_below_it():
    wrong = {}
    for found in PROJECT_IMPORTS:
        importer, target = part_of(found.importer), part_of(found.target)
        if target != importer and target not in ALLOWED[importer]:
            allowed = sorted(ALLOWED[importer]) or "no other part"
            wrong[f"{found} (part {target!r}); {importer!r} may import {allowed}"] = None
    if wrong:
        pytest.fail("imports against the layers:\n" + "\n".join(wrong), pytrace=False)


def test_lightning_is_imported_only_by_the_lightning_package_and_the_command_line():
    wrong = {
        str(found): None
        for found in IMPORTS
        if found.target.split(".")[0] in LIGHTNING_PACKAGES
        and part_of(found.importer) not in LIGHTNING_PARTS
    }
    if wrong:
        pytest.fail(
            "Lightning imported outside lightning_compress/lightning/ and the command line:\n"
            + "\n".join(wrong),
            pytrace=False,
        )


def test_no_modules_import_each_other_even_through_others():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    where: dict[tuple[str, str], Import] = {}
    for found in PROJECT_IMPORTS:
        if not found.type_checking and found.target != found.importer:
            graph[found.importer].add(found.target)
            where.setdefault((found.importer, found.target), found)
    circles = [
        " -> ".join(circle) + "\n  " + "\n  ".join(str(where[edge]) for edge in pairs(circle))
        for circle in _circles(graph)
    ]
    if circles:
        pytest.fail("modules that import each other:\n" + "\n".join(circles), pytrace=False)


def pairs(circle: list[str]) -> list[tuple[str, str]]:
    """The import edges of ``circle`` (its last module imports its first).

    Args:
        circle: modules, each importing the next.

    Returns:
        ``(importer, imported)`` pairs.
    """
    return list(zip(circle, [*circle[1:], circle[0]], strict=True))


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle inside each group of modules that reach one another (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_one_circle(graph, group) for group in groups]


def _one_circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(graph[node] & group):
            if nxt == start:
                return paths[node]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                frontier.append(nxt)
    raise AssertionError(f"no circle through {start}")  # a strongly connected group has one


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from lightning_compress.pipelines.capture import x", "lightning_compress.pipelines"),
        ("def f():\n    from ..pipelines import capture", "lightning_compress.pipelines"),
        ("if TYPE_CHECKING:\n    import lightning_compress.export", "lightning_compress.export"),
    ],
)
def test_the_reader_finds_top_level_function_level_and_relative_imports(source, expected, tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(source)
    found = list(_imports_of("lightning_compress.modifiers.probe", path))
    assert [_resolve(item.target).startswith(expected) for item in found] == [True]
