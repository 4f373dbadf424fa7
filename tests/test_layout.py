"""The source layout: the algorithm below the glue, no import circle, small files and functions, read from the code.

The import graph is read with ``ast`` (top-level and function-local imports alike: a local import is still a
dependency), so a circle cannot hide behind a deferred import.
"""

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "paca"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: pathlib.Path) -> set[str]:
    """Every absolute module name ``path`` imports, relative imports resolved (``from . import x`` gives ``pkg.x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return names_imported_by(path.read_text(), package)


def names_imported_by(source: str, package: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from pkg import mod` depends on pkg.mod; `from mod import name` on mod
                names.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
    return names


def paca_imports(path: pathlib.Path) -> set[str]:
    """The modules of src/paca that ``path`` imports (a package's ``__init__`` for ``import paca.x``'s ``paca``)."""
    return {m for m in imported_names(path) if m in MODULES and m != module_name(path)}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_checker_sees_local_and_relative_imports_and_finds_circles():
    source = "import torch\nfrom .. import selection\ndef f():\n    from .layer import PacaLayer\n"
    names = names_imported_by(source, "paca.tuner")
    assert {"torch", "paca.selection", "paca.tuner.layer"} <= names
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_src_paca():
    graph = {name: paca_imports(path) for name, path in MODULES.items()}
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_algorithm_imports_neither_peft_nor_transformers():
    """ops/ is pure torch (and bitsandbytes for the 4-bit operator); the glue above it is the tuner."""
    for name, path in MODULES.items():
        if name.startswith("paca.ops"):
            outside = {m.split(".")[0] for m in imported_names(path)} - {"torch", "bitsandbytes", "paca"}
            outside -= {"__future__", "collections", "itertools", "weakref", "math", "typing"}
            assert not outside & {"peft", "transformers", "trl", "accelerate"}, (name, outside)
            assert not {m for m in paca_imports(path) if not m.startswith("paca.ops")}, name


def test_column_selection_is_a_leaf():
    """selection.py computes indices from tensors and shapes; the tuner's layers call it, never the reverse."""
    assert paca_imports(PACKAGE / "selection.py") == set()


ROOT = SRC.parent
PYTHON_FILES = sorted(
    [
        *PACKAGE.rglob("*.py"),
        *(p for folder in ("tests", "benchmarks", "tools", "examples") for p in (ROOT / folder).glob("*.py")),
    ]
)


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_and_functions_stay_small(path):
    """Every Python file of the repository: source, tests, measurement scripts, tools and examples."""
    text = path.read_text()
    assert text.count("\n") <= MAX_FILE_LINES, f"{path}: {text.count(chr(10))} lines; split it by what it does"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name} is {length} lines"
