"""The project's shape: no import cycles, dependencies that point the way the house style
draws them (the front ends and the harness depend on the engine, never the reverse), and a
command line whose ``--help`` loads no heavy code.

The import graph is read from the source with :mod:`ast`, so it holds every import statement,
those inside functions included (a cycle hides there as easily as at the top of a module), and
the modules a module loads by name with :mod:`importlib`.
"""

from __future__ import annotations

import ast
import gc
import graphlib
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from promptcache.benchmarks.registry import BENCHMARKS
from promptcache.cli import COMMANDS
from tests.support.paths import ROOT

#: What may not import what (a package stands for itself and everything in it). The CLI is
#: the top: only ``python -m promptcache`` imports it.
FORBIDDEN = {
    "promptcache.cache": ("promptcache.server", "promptcache.clients", "promptcache.benchmarks",
                          "promptcache.testing", "promptcache.cli"),
    "promptcache.server": ("promptcache.benchmarks", "promptcache.cli"),
    "promptcache.clients": ("promptcache.benchmarks", "promptcache.cli"),
    "promptcache.testing": ("promptcache.benchmarks", "promptcache.cli"),
    "promptcache.benchmarks": ("promptcache.cli",),
}

#: What ``promptcache --help`` and ``serve --help`` must not load: heavy libraries and the
#: harness's plotting, progress bars and training (any benchmark module but the registry).
HEAVY = ("matplotlib", "tqdm", "torch", "sentence_transformers", "transformers")
LIGHT_BENCHMARK_MODULES = {"promptcache.benchmarks", "promptcache.benchmarks.registry"}

#: The fake upstream's old home; it is :mod:`promptcache.testing` now.
OLD_FAKE_UPSTREAM = "promptcache.benchmarks.fake_upstream"


def parse(path: Path) -> ast.Module:
    """``ast.parse`` with the garbage collector held off.

    On Python 3.11 a collection during ``ast.parse`` can run pytest's unraisable-exception
    hook (a Redis connection left in a cycle by an earlier test, see the README's Development
    section), which formats a traceback, which calls ``ast.parse`` itself for its carets. The
    nested call resets the interpreter-wide depth counter of the outer one, and the outer
    one fails with ``SystemError: AST constructor recursion depth mismatch`` (CPython
    gh-106905; seen once in CI on 2026-11-30).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text(), str(path))
    finally:
        if enabled:
            gc.enable()


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def project_modules() -> dict[str, Path]:
    """Import name -> file of each of the project's modules, by pyproject's package-dir."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules: dict[str, Path] = {}
    for package, directory in setuptools["package-dir"].items():
        for path in sorted((ROOT / directory).rglob("*.py")):
            parts = path.relative_to(ROOT / directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def modules_of_tests() -> dict[str, Path]:
    tests = ROOT / "tests"
    return {"tests." + ".".join(p.relative_to(tests).with_suffix("").parts): p
            for p in sorted(tests.rglob("*.py"))}


def imports(module: str, path: Path, *, type_checking: bool = True) -> Iterator[list[str]]:
    """For each import statement anywhere in ``path`` (in functions too): the absolute names
    it may import, most specific first (``from X import Y`` may import X.Y, else X). Those
    under ``if TYPE_CHECKING:`` only if ``type_checking``."""
    is_package = path.name == "__init__.py"

    def walk(nodes: Iterable[ast.AST]) -> Iterator[list[str]]:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from walk(node.body if type_checking else ())
                yield from walk(node.orelse)
                continue
            if isinstance(node, ast.Import):
                yield from ([alias.name] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node.module, node.level)
                yield from ([f"{base}.{alias.name}", base] for alias in node.names)
            yield from walk(ast.iter_child_nodes(node))

    yield from walk(parse(path).body)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(module: str, is_package: bool, name: str | None, level: int) -> str:
    if level == 0:
        return name or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{name}" if name else package


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports at run time (not under TYPE_CHECKING).
    Importing ``a.b.c`` is an edge to ``a.b.c`` only, not to the packages ``a`` and ``a.b``
    it runs first: a package's ``__init__`` importing its own submodules is no cycle. A module
    that imports :mod:`importlib` also imports each of the project's modules its strings name
    (``promptcache.cli`` loads ``"promptcache.benchmarks.fit"`` lazily)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        statements = list(imports(module, path, type_checking=False))
        targets = {next((n for n in names if n in modules), None) for names in statements}
        if any(within(n, "importlib") for names in statements for n in names):
            targets |= {node.value for node in ast.walk(parse(path))
                        if isinstance(node, ast.Constant) and node.value in modules}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def test_the_import_reader_sees_imports_in_functions_and_skips_type_checking_ones(
        tmp_path: Path) -> None:
    path = tmp_path / "mod.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..other import name\n"
        "if TYPE_CHECKING:\n"
        "    import typed.only\n"
        "else:\n"
        "    import at.run_time\n"
        "def f():\n"
        "    import in_function\n"
    )
    run_time = [["typing.TYPE_CHECKING", "typing"], ["top.pkg.sibling", "top.pkg"],
                ["top.other.name", "top.other"], ["at.run_time"], ["in_function"]]
    assert list(imports("top.pkg.mod", path, type_checking=False)) == run_time
    assert ["typed.only"] in imports("top.pkg.mod", path)
    graph = import_graph()
    assert "promptcache.benchmarks.registry" in graph["promptcache.cli"]
    assert "promptcache.server.app" in graph["promptcache.cli"]  # imported in _serve()
    assert "promptcache.benchmarks.fit" in graph["promptcache.cli"]  # by importlib


def test_the_project_has_no_import_cycle_not_even_through_imports_inside_functions() -> None:
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as exc:
        cycle = list(reversed(exc.args[1]))  # graphlib lists each importer after what it imports
        pytest.fail("import cycle: " + " imports ".join(cycle))


def test_dependencies_point_to_the_engine_and_away_from_the_harness() -> None:
    """Nothing in the engine imports the sidecar, the clients, the harness, the test double
    or the CLI; the sidecar, the clients and the test double import nothing from the harness.
    Type-only imports count: they are dependencies too."""
    wrong = []
    for module, path in project_modules().items():
        banned = [b for low, bs in FORBIDDEN.items() if within(module, low) for b in bs]
        for names in imports(module, path):
            if any(within(n, b) for n in names for b in banned):
                wrong.append(f"{module} imports {names[0]}")
    assert not wrong, "\n".join(wrong)


def test_the_engine_does_not_use_argparse() -> None:
    """Command lines are the front ends' business; the engine takes typed options."""
    users = sorted(
        module for module, path in project_modules().items()
        if within(module, "promptcache.cache")
        and any(within(n, "argparse") for names in imports(module, path) for n in names)
    )
    assert not users, f"these engine modules import argparse: {users}"


def test_tests_and_benchmarks_take_the_fake_upstream_from_promptcache_testing() -> None:
    """No test and no benchmark imports (or runs with ``-m``) the old
    ``promptcache.benchmarks.fake_upstream``."""
    benchmarks = {m: p for m, p in project_modules().items()
                  if within(m, "promptcache.benchmarks")}
    offenders = []
    for module, path in (modules_of_tests() | benchmarks).items():
        names = [n for ns in imports(module, path) for n in ns]
        if path != Path(__file__).resolve():  # this file names the module, to look for it
            names += [node.value for node in ast.walk(parse(path))
                      if isinstance(node, ast.Constant) and isinstance(node.value, str)]
        if any(within(n, OLD_FAKE_UPSTREAM) for n in names):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"{offenders} use {OLD_FAKE_UPSTREAM}; use promptcache.testing"


CHILD = """
import contextlib, io, json, sys
from promptcache.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(sys.argv[1:])
        code = None
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "help": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def help_in_fresh_process(*argv: str) -> tuple[str, list[str]]:
    """``promptcache ARGV --help``'s output, and what it imported that it should not."""
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["code"] == 0, proc.stderr
    loaded = result["modules"]
    heavy = [h for h in HEAVY if any(within(m, h) for m in loaded)] + [
        m for m in loaded
        if within(m, "promptcache.benchmarks") and m not in LIGHT_BENCHMARK_MODULES]
    return " ".join(result["help"].split()), heavy


@pytest.mark.parametrize(
    ("argv", "listed"),
    [
        ((), [f"{name} {c.help}" for name, c in COMMANDS.items()]),
        (("serve",), ["Run the caching sidecar", "--upstream", "--redis-url"]),
        (("bench",), [f"{name} {help_line}" for name, (_, help_line) in BENCHMARKS.items()]),
    ],
    ids=["promptcache", "serve", "bench"],
)
def test_help_lists_the_commands_and_loads_no_heavy_library_or_benchmark_code(
        argv: tuple[str, ...], listed: list[str]) -> None:
    """``promptcache --help``, ``serve --help`` and ``bench --help`` import no matplotlib,
    tqdm, torch, transformers, fitting, plotting or progress bars (each in a fresh process),
    yet list every command (or benchmark) with its help line."""
    command = " ".join(("promptcache", *argv, "--help"))
    help_text, heavy = help_in_fresh_process(*argv)
    assert not heavy, f"{command} imported {heavy}"
    missing = [entry for entry in listed if entry not in help_text]
    assert not missing, f"{command} does not list {missing}"


def test_every_public_class_has_a_docstring() -> None:
    """A one-line docstring says what each public class of the packages is for."""
    missing = []
    for directory in ("cache", "server", "clients", "benchmarks", "promptcache"):
        for path in sorted((ROOT / directory).rglob("*.py")):
            for node in ast.walk(parse(path)):
                if (isinstance(node, ast.ClassDef) and not node.name.startswith("_")
                        and not ast.get_docstring(node)):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not missing, "public classes without a docstring:\n" + "\n".join(missing)


def test_what_serve_runs_loads_no_heavy_library_or_benchmark_code() -> None:
    """The sidecar's app and the engine it opens (``promptcache serve``) import no plotting,
    progress bars, fitting or torch: torch and sentence-transformers come in only when the
    semantic tier loads its model."""
    code = ("import json, sys\nimport promptcache.cli, promptcache.server.app\n"
            "print(json.dumps(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert "promptcache.cache.engine" in loaded  # the check looks at what serve runs
    heavy = [h for h in HEAVY if any(within(m, h) for m in loaded)] + [
        m for m in loaded
        if within(m, "promptcache.benchmarks") and m not in LIGHT_BENCHMARK_MODULES]
    assert not heavy, f"serve imports {heavy}"
