"""The package's layers, read from source with ``ast``: no module here is imported.

===========  ================================================  ===========================
rank         modules                                           may import (trio_gateway)
===========  ================================================  ===========================
0            ``_version``, ``sse``, ``_core/*``                rank 0
1            ``_rewrite/*``                                    ranks 0-1
2            ``_accounting/*``                                 ranks 0-2
3            ``_proxy/*``                                      ranks 0-3
4            ``_server/*``                                     ranks 0-4
testing      ``testing/*`` (the mock provider)                 rank 0 and ``testing``
top          ``__init__``, ``__main__``, ``_cli``, ``_demo``   anything
===========  ================================================  ===========================

Three rules, each over every ``.py`` file under ``trio_gateway/`` (found recursively):

1. Ranks 0 and 1 are sans-IO: they import none of :data:`IO_MODULES`, in any
   form, at any depth (inside functions, ``try``, ``if TYPE_CHECKING:`` too).
2. Imports point only downwards, per the table. A module the table does not
   place fails, so a new folder is added to :data:`RANKS` deliberately.
3. No import cycles among the package's modules.

Rules 2 and 3 ignore imports under ``if TYPE_CHECKING:`` (they never run).
Rule 3 counts the explicit import statements, wherever they are (an import
inside a function still ties the two modules together), but not the implicit
import of a parent package's ``__init__``. ``from pkg import name`` means
``pkg.name`` when that is a module, else ``pkg``. ``importlib.import_module``
and ``__import__`` with a literal name count as imports.

The ``test_checker_*`` tests feed each rule a small made-up package that
breaks it, so that every rule is seen to fail.
"""

from __future__ import annotations

import ast
import itertools
import os
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "trio_gateway"
ROOT = Path(__file__).parent.parent / PACKAGE

RANKS: dict[str, int] = {
    "trio_gateway._version": 0,
    "trio_gateway.sse": 0,
    "trio_gateway._core": 0,
    "trio_gateway._rewrite": 1,
    "trio_gateway._accounting": 2,
    "trio_gateway._proxy": 3,
    "trio_gateway._server": 4,
}
TESTING = "trio_gateway.testing"
TOP = frozenset(
    {"trio_gateway", "trio_gateway.__main__", "trio_gateway._cli", "trio_gateway._demo"}
)
SANS_IO_RANK = 1  # ranks 0 and 1
# Event loops, networking, HTTP, threads, processes, databases: any of these in a
# sans-IO module ties it to I/O. Top-level names; ``trio.lowlevel`` is ``trio``.
IO_MODULES = frozenset(
    {
        "trio",
        "httpx",
        "httpcore",
        "hypercorn",
        "h11",
        "sqlite3",
        "threading",
        "queue",
        "socket",
        "asyncio",
        "anyio",
        "sniffio",
        "select",
        "selectors",
        "ssl",
        "subprocess",
        "multiprocessing",
        "concurrent",
    }
)
Place = int | str | None  # a rank, "testing", "top", or None: not in the table


# --- reading the package ------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str  # dotted: trio_gateway._core.config; a package's __init__ is the package
    path: str  # as written in messages: trio_gateway/_core/config.py
    source: str
    is_package: bool


@dataclass(frozen=True)
class Import:
    target: str  # the absolute module imported
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:``


def module_at(path: str, source: str) -> Module:
    """The module in the file at ``path`` (relative to the repository, ``/``-separated)."""
    parts = path.removesuffix(".py").split("/")
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return Module(".".join(parts), path, source, is_package)


def load_package(root: Path = ROOT) -> dict[str, Module]:
    """Every module under ``root``, recursively."""
    modules = {}
    for file in sorted(root.rglob("*.py")):
        module = module_at(file.relative_to(root.parent).as_posix(), file.read_text("utf-8"))
        modules[module.name] = module
    return modules


def listed_files(folder: Path) -> list[str]:
    """The ``.py`` files under ``folder`` as ``os.walk`` lists them: a check on ``rglob``."""
    return [
        os.path.join(where, name)
        for where, _, names in os.walk(folder)
        for name in names
        if name.endswith(".py")
    ]


def is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class _Imports(ast.NodeVisitor):
    def __init__(self, module: Module, known: Collection[str]) -> None:
        self.module = module
        self.known = known
        self.type_checking = False
        self.found: list[Import] = []

    def add(self, target: str, node: ast.stmt | ast.expr) -> None:
        self.found.append(Import(target, node.lineno, self.type_checking))

    def visit_If(self, node: ast.If) -> None:
        if not is_type_checking(node.test):
            self.generic_visit(node)
            return
        outer, self.type_checking = self.type_checking, True
        for statement in node.body:
            self.visit(statement)
        self.type_checking = outer
        for statement in node.orelse:
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self.absolute(node)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self.add(submodule if submodule in self.known else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        if (
            (isinstance(function, ast.Name) and function.id in {"__import__", "import_module"})
            or (isinstance(function, ast.Attribute) and function.attr == "import_module")
        ) and node.args:
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                self.add(name.value, node)
        self.generic_visit(node)

    def absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = self.module.name.split(".")
        if not self.module.is_package:
            package.pop()
        if node.level - 1 >= len(package):
            raise AssertionError(f"{self.module.path}:{node.lineno}: relative import above the top")
        base = package[: len(package) - (node.level - 1)]
        return ".".join([*base, node.module] if node.module else base)


def imports_of(module: Module, known: Collection[str]) -> list[Import]:
    """Every import in ``module``, at any depth; ``known``: the package's module names."""
    collector = _Imports(module, known)
    collector.visit(ast.parse(module.source, module.path))
    return collector.found


# --- the table ----------------------------------------------------------------------------


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def place(name: str) -> Place:
    if name in TOP:
        return "top"
    if within(name, TESTING):
        return "testing"
    for prefix, rank in RANKS.items():
        if within(name, prefix):
            return rank
    return None


def describe(where: Place) -> str:
    if where is None:
        return "not in the table"
    return f"rank {where}" if isinstance(where, int) else where


def may_import(importer: str, imported: str) -> bool:
    source, target = place(importer), place(imported)
    if source == "top":
        return True
    if source == "testing":
        return target == "testing" or target == 0
    return isinstance(source, int) and isinstance(target, int) and target <= source


# --- the three rules ----------------------------------------------------------------------


def is_sans_io(name: str) -> bool:
    where = place(name)
    return isinstance(where, int) and where <= SANS_IO_RANK


def io_imports(modules: Mapping[str, Module]) -> list[str]:
    """Rule 1: every import of an I/O library by a sans-IO module."""
    return [
        f"{module.path}:{found.line} imports {found.target}"
        for module in modules.values()
        if is_sans_io(module.name)
        for found in imports_of(module, modules)
        if found.target.partition(".")[0] in IO_MODULES
    ]


def unplaced(modules: Mapping[str, Module]) -> list[str]:
    """Rule 2, first half: the modules the table does not place."""
    return [module.path for module in modules.values() if place(module.name) is None]


def upward_imports(modules: Mapping[str, Module]) -> list[str]:
    """Rule 2: every import of a package module that the importer's rank does not allow."""
    return [
        f"{module.path}:{found.line}: {module.name} ({describe(place(module.name))}) "
        f"imports {found.target} ({describe(place(found.target))})"
        for module in modules.values()
        for found in imports_of(module, modules)
        if not found.type_checking
        and within(found.target, PACKAGE)
        and not may_import(module.name, found.target)
    ]


def import_graph(modules: Mapping[str, Module]) -> dict[str, dict[str, int]]:
    """Module -> the package modules it imports -> the line of the first such import."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for module in modules.values():
        for found in imports_of(module, modules):
            if not found.type_checking and found.target in modules:
                graph[module.name].setdefault(found.target, found.line)
    return graph


def import_cycles(graph: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """Rule 3: one shortest cycle per strongly connected group, as a path back to its start."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []
    counter = itertools.count()

    def connect(node: str) -> None:  # Tarjan's algorithm; the graph is small
        order[node] = low[node] = next(counter)
        stack.append(node)
        for after in sorted(graph[node]):
            if after not in order:
                connect(after)
                low[node] = min(low[node], low[after])
            elif after in stack:
                low[node] = min(low[node], order[after])
        if low[node] == order[node]:
            group: set[str] = set()
            while not group or node not in group:
                group.add(stack.pop())
            groups.append(group)

    for node in sorted(graph):
        if node not in order:
            connect(node)
    cycles = []
    for group in groups:
        start = min(group)
        if len(group) > 1 or start in graph[start]:
            cycles.append(shortest_cycle(graph, start, group))
    return sorted(cycles)


def shortest_cycle(
    graph: Mapping[str, Mapping[str, int]], start: str, group: Collection[str]
) -> list[str]:
    came_from = {start: start}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for after in sorted(graph[node]):
            if after == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if after in group and after not in came_from:
                came_from[after] = node
                queue.append(after)
    raise AssertionError(f"{start} is in a cycle, yet no path leads back to it")


def describe_cycle(graph: Mapping[str, Mapping[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> " for a, b in itertools.pairwise(cycle)]
    return "".join(steps) + cycle[-1]


# --- the package --------------------------------------------------------------------------


def test_the_walk_finds_every_module_and_the_table_places_each():
    modules = load_package()
    assert len(modules) == len(listed_files(ROOT)) >= 20
    assert unplaced(modules) == [], "add the new place to RANKS (or TOP) in tests/test_layout.py"
    places = {place(name) for name in modules}
    assert places == {0, 1, 2, 3, 4, "testing", "top"}, "every row of the table has modules"


def test_sans_io_modules_import_no_io_library():
    modules = load_package()
    folders = [ROOT / "_core", ROOT / "_rewrite"]
    for folder in folders:
        assert listed_files(folder), f"{folder} holds no module: the check would be empty"
    checked = [name for name in modules if is_sans_io(name)]
    assert {"trio_gateway.sse", "trio_gateway._version"} <= set(checked)
    assert len(checked) == sum(len(listed_files(folder)) for folder in folders) + 2
    assert io_imports(modules) == []


def test_imports_point_only_downwards():
    modules = load_package()
    assert len(modules) == len(listed_files(ROOT))
    internal = [
        found
        for module in modules.values()
        for found in imports_of(module, modules)
        if within(found.target, PACKAGE)
    ]
    assert len(internal) >= len(modules), "the package's own imports were not found"
    assert upward_imports(modules) == []


def test_no_import_cycles():
    modules = load_package()
    graph = import_graph(modules)
    assert sum(map(len, graph.values())) >= len(modules), "the import graph is nearly empty"
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(graph, c) for c in cycles)


# --- each rule can fail -------------------------------------------------------------------


def fake_package(files: Mapping[str, str]) -> dict[str, Module]:
    modules = (module_at(path, source) for path, source in files.items())
    return {module.name: module for module in modules}


IO_EVERY_FORM = """\
from __future__ import annotations
import os, trio
import httpx._client
from hypercorn.config import Config
import sqlite3 as db
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import anyio
try:
    import asyncio
except ImportError:
    pass
def f():
    import threading
    from queue import Queue
    class Inner:
        import socket
importlib.import_module("h11.x")
from trio_gateway._core import config
"""


def test_checker_finds_io_imports_in_every_form():
    modules = fake_package(
        {
            "trio_gateway/_core/bad.py": IO_EVERY_FORM,
            "trio_gateway/_rewrite/__init__.py": "from trio import lowlevel\n",
            "trio_gateway/sse.py": "def decode():\n    import httpcore\n",
            "trio_gateway/_proxy/fine.py": IO_EVERY_FORM,  # I/O is allowed here
            "trio_gateway/testing/fine.py": IO_EVERY_FORM,
        }
    )
    assert io_imports(modules) == [
        "trio_gateway/_core/bad.py:2 imports trio",
        "trio_gateway/_core/bad.py:3 imports httpx._client",
        "trio_gateway/_core/bad.py:4 imports hypercorn.config",
        "trio_gateway/_core/bad.py:5 imports sqlite3",
        "trio_gateway/_core/bad.py:8 imports anyio",
        "trio_gateway/_core/bad.py:10 imports asyncio",
        "trio_gateway/_core/bad.py:14 imports threading",
        "trio_gateway/_core/bad.py:15 imports queue",
        "trio_gateway/_core/bad.py:17 imports socket",
        "trio_gateway/_core/bad.py:18 imports h11.x",
        "trio_gateway/_rewrite/__init__.py:1 imports trio",
        "trio_gateway/sse.py:2 imports httpcore",
    ]


def test_checker_finds_upward_imports_absolute_relative_and_nested():
    modules = fake_package(
        {
            "trio_gateway/__init__.py": "from trio_gateway._server import serve\n",
            "trio_gateway/_cli.py": "import trio_gateway._demo\nfrom .testing import mock\n",
            "trio_gateway/sse.py": "",
            "trio_gateway/_core/__init__.py": "",
            "trio_gateway/_core/config.py": "from . import kinds\nfrom .. import sse\n",
            "trio_gateway/_core/kinds.py": "from trio_gateway._proxy.app import Gateway\n",
            "trio_gateway/_core/up.py": "from .._rewrite import chat\n",
            "trio_gateway/_rewrite/chat.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from trio_gateway._proxy import app\n"
                "else:\n    from trio_gateway._accounting import limiter\n"
            ),
            "trio_gateway/_proxy/app.py": (
                "from trio_gateway import Gateway\n"
                "from trio_gateway.testing import mock\n"
                "def late():\n    from trio_gateway._server.serve import serve\n"
                "from trio_gateway._server import serve\n"
            ),
            "trio_gateway/_server/serve.py": "from trio_gateway._proxy import app\n",
            "trio_gateway/testing/__init__.py": "from trio_gateway.testing.mock import Mock\n",
            "trio_gateway/testing/mock.py": (
                "from . import other\nfrom trio_gateway._core.config import x\n"
                "from trio_gateway._rewrite.chat import y\n"
                "from trio_gateway import sse\n"
            ),
        }
    )
    assert upward_imports(modules) == [
        "trio_gateway/_core/kinds.py:1: trio_gateway._core.kinds (rank 0) "
        "imports trio_gateway._proxy.app (rank 3)",
        "trio_gateway/_core/up.py:1: trio_gateway._core.up (rank 0) "
        "imports trio_gateway._rewrite.chat (rank 1)",
        "trio_gateway/_rewrite/chat.py:5: trio_gateway._rewrite.chat (rank 1) "
        "imports trio_gateway._accounting (rank 2)",
        "trio_gateway/_proxy/app.py:1: trio_gateway._proxy.app (rank 3) imports trio_gateway (top)",
        "trio_gateway/_proxy/app.py:2: trio_gateway._proxy.app (rank 3) "
        "imports trio_gateway.testing.mock (testing)",
        "trio_gateway/_proxy/app.py:4: trio_gateway._proxy.app (rank 3) "
        "imports trio_gateway._server.serve (rank 4)",
        "trio_gateway/_proxy/app.py:5: trio_gateway._proxy.app (rank 3) "
        "imports trio_gateway._server.serve (rank 4)",
        "trio_gateway/testing/mock.py:3: trio_gateway.testing.mock (testing) "
        "imports trio_gateway._rewrite.chat (rank 1)",
    ]


def test_checker_refuses_a_module_outside_the_table():
    modules = fake_package(
        {
            "trio_gateway/_core/config.py": "from trio_gateway._plugins import hook\n",
            "trio_gateway/_plugins/hook.py": "",
            "trio_gateway/extra.py": "",
        }
    )
    assert unplaced(modules) == ["trio_gateway/_plugins/hook.py", "trio_gateway/extra.py"]
    assert upward_imports(modules) == [
        "trio_gateway/_core/config.py:1: trio_gateway._core.config (rank 0) "
        "imports trio_gateway._plugins.hook (not in the table)"
    ]


def test_checker_finds_import_cycles_and_names_them():
    modules = fake_package(
        {
            # a -> b -> c -> a, written three ways
            "trio_gateway/_proxy/a.py": "from trio_gateway._proxy import b\n",
            "trio_gateway/_proxy/b.py": "x = 1\nfrom .c import helper\n",
            "trio_gateway/_proxy/c.py": "def f():\n    import trio_gateway._proxy.a\n",
            # A package's __init__ and a module that takes a name from it.
            "trio_gateway/_rewrite/__init__.py": "from trio_gateway._rewrite.chat import Chat\n",
            "trio_gateway/_rewrite/chat.py": "from trio_gateway._rewrite import Policy\n",
            # A module importing itself.
            "trio_gateway/_core/self.py": "from . import self\n",
            # Not cycles: a TYPE_CHECKING import back, and the implicit parent import.
            "trio_gateway/_server/d.py": "from trio_gateway._server import e\n",
            "trio_gateway/_server/e.py": (
                "if TYPE_CHECKING:\n    from trio_gateway._server import d\n"
            ),
            "trio_gateway/_accounting/__init__.py": "from .m import M\n",
            "trio_gateway/_accounting/m.py": "M = 1\n",
        }
    )
    graph = import_graph(modules)
    cycles = import_cycles(graph)
    assert cycles == [
        ["trio_gateway._core.self", "trio_gateway._core.self"],
        [
            "trio_gateway._proxy.a",
            "trio_gateway._proxy.b",
            "trio_gateway._proxy.c",
            "trio_gateway._proxy.a",
        ],
        ["trio_gateway._rewrite", "trio_gateway._rewrite.chat", "trio_gateway._rewrite"],
    ]
    assert describe_cycle(graph, cycles[1]) == (
        "trio_gateway._proxy.a (line 1) -> trio_gateway._proxy.b (line 2) -> "
        "trio_gateway._proxy.c (line 2) -> trio_gateway._proxy.a"
    )
