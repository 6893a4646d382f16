"""lineclip's import graph, read from the code with `ast`: one direction for every import.

The layers, bottom to top (LAYERS, the one place they are listed; README "Layout" states them):
- the domain: what a line, a manifest, a shard dir, an image, a batch, a model, a loss, a metric and a bundle are;
- the run: the config schema and what executes it (data, trainer, checkpoint, validation, tracking, corpus, encoder);
- the commands: `cli` (what every command shares: hydra_command, one-line errors) below the commands themselves.
A module imports only from its own layer or those below, never upward, and no modules import each other in a circle.
Imports inside functions count (a lazy import hides a circle, it does not remove it); only imports under
`if TYPE_CHECKING:` are left out (they never run). Every function is at most MAX_FUNCTION_LINES long.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lineclip"

LAYERS: list[tuple[str, frozenset[str]]] = [
    ("domain", frozenset({
        "errors", "files", "progress", "lines", "manifest", "shards", "sizes", "preprocess", "phrases", "metrics",
        "galleries", "transcripts", "ocr", "batch", "patches", "reading", "towers", "loss", "bundle", "artifacts",
        "panels"})),
    ("run", frozenset({"config", "data", "encoder", "corpus", "tracking", "checkpoint", "validation", "trainer"})),
    ("command plumbing", frozenset({"cli"})),
    ("commands", frozenset({"train", "evaluate", "index", "search", "serve", "synth", "shard"})),
]
MAX_FUNCTION_LINES = 120


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(tree: ast.AST, modules: set[str]) -> list[tuple[str, int]]:
    """(lineclip module, line) for every import of one in `tree`, however it is spelt (`import lineclip.x`,
    `from lineclip import x`, `from lineclip.x import y`, relative forms), except under `if TYPE_CHECKING:`."""
    found: list[tuple[str, int]] = []

    def add(name: str | None, line: int) -> None:
        if name and name.split(".")[0] in modules:
            found.append((name.split(".")[0], line))

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                visit(ast.Module(body=child.orelse, type_ignores=[]))  # the `else:` of it does run
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("lineclip."):
                        add(alias.name.removeprefix("lineclip."), child.lineno)
            elif isinstance(child, ast.ImportFrom):
                absolute = child.level == 0 and child.module is not None
                if absolute and child.module == "lineclip" or child.level == 1 and child.module is None:
                    for alias in child.names:  # `from lineclip import bundle`: a module, or a name of __init__
                        add(alias.name, child.lineno)
                elif absolute and child.module.startswith("lineclip."):
                    add(child.module.removeprefix("lineclip."), child.lineno)
                elif child.level == 1:
                    add(child.module, child.lineno)
            visit(child)

    visit(tree)
    return found


def read_package() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8"), str(path)) for path in sorted(PACKAGE.glob("*.py"))}


def import_graph(trees: dict[str, ast.Module]) -> dict[str, dict[str, int]]:
    """module -> {module it imports: the first line that does}."""
    graph: dict[str, dict[str, int]] = {}
    for name, tree in trees.items():
        graph[name] = {}
        for target, line in imported_modules(tree, set(trees)):
            if target != name:
                graph[name].setdefault(target, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One circle of imports (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)) is not None:
            return cycle
    return None


def layer_of() -> dict[str, int]:
    return {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}


def upward_edges(graph: dict[str, dict[str, int]]) -> list[str]:
    level = layer_of()
    return [f"lineclip/{source}.py:{line}: {source} ({LAYERS[level[source]][0]}) imports {target} "
            f"({LAYERS[level[target]][0]})"
            for source, targets in sorted(graph.items()) for target, line in sorted(targets.items())
            if level[target] > level[source]]


# ----------------------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(read_package())


def test_every_module_has_one_layer(graph):
    modules = set(graph) - {"__init__"}
    listed = [module for _, layer in LAYERS for module in layer]
    assert len(listed) == len(set(listed)), "a module is listed in two layers"
    assert modules - set(listed) == set(), "modules in no layer: add them to LAYERS"
    assert set(listed) - modules == set(), "LAYERS lists modules that do not exist"


def test_no_import_circle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_import_goes_up_a_layer(graph):
    del graph["__init__"]
    assert upward_edges(graph) == []


def test_cli_imports_no_command(graph):
    # cli is what the commands share: below every one of them, so it learns their errors by a base class
    # (lineclip.errors.LineclipError), never by importing the modules that raise them.
    commands = LAYERS[-1][1]
    assert set(graph["cli"]) & commands == set()


def test_functions_are_at_most_a_page(graph):
    long = [f"lineclip/{name}.py:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in read_package().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_trainer_train_reads_on_one_page():
    tree = read_package()["trainer"]
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_train")
    assert train.end_lineno - train.lineno + 1 <= 100


# ----------------------------------------------------------------------------- the checker checks itself


def _graph_of(sources: dict[str, str]) -> dict[str, dict[str, int]]:
    return import_graph({name: ast.parse(text) for name, text in sources.items()})


def test_the_reader_sees_every_spelling_and_skips_type_checking():
    graph = _graph_of({
        "a": "import lineclip.b\nfrom lineclip import c\nfrom lineclip.d import x\nfrom . import e\nfrom .f import y\n"
             "def g():\n    from lineclip.h import z\n"
             "if TYPE_CHECKING:\n    from lineclip.i import w\nelse:\n    import lineclip.j\n"
             "import numpy\nfrom lineclip import __version__\n",
        **{m: "" for m in "bcdefhij"},
    })
    assert graph["a"] == {"b": 1, "c": 2, "d": 3, "e": 4, "f": 5, "h": 7, "j": 11}


def test_a_circle_and_an_upward_import_are_named():
    graph = _graph_of({"x": "import lineclip.y\n", "y": "def f():\n    import lineclip.z\n",
                       "z": "import lineclip.x\n"})
    assert find_cycle(graph) == ["x", "y", "z", "x"]
    up = {"config": {"cli": 25}, "cli": {}}
    assert upward_edges(up) == ["lineclip/config.py:25: config (run) imports cli (command plumbing)"]
