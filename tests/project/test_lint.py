"""The code passes the project's linters: ruff (pyproject's rule set) and mypy."""

from __future__ import annotations

import subprocess
import sys

from tests.support.paths import ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_ruff_finds_nothing() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing_in_the_packages() -> None:
    result = run("mypy", "cache", "server", "clients", "benchmarks", "promptcache")
    assert result.returncode == 0, result.stdout + result.stderr
