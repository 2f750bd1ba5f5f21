"""README.md says what the code does: set-up commands, options, and the quickstart."""

from __future__ import annotations

import argparse
import asyncio
import os
import re

from promptcache.cli import parser
from promptcache.server.config import OPTIONS
from promptcache.testing import FakeUpstream
from tests.support.paths import ROOT
from tests.support.sidecars import RunningSidecar

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_setup_is_two_commands_and_ci_runs_the_test_one() -> None:
    serve_cmd, test_cmd = bash_blocks(section("Set up"))
    assert "\n" not in serve_cmd and "\n" not in test_cmd
    assert "pip install" in serve_cmd and "promptcache serve --upstream" in serve_cmd
    assert "pip install" in test_cmd and "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, ".ci/run must run exactly the README's test command"


def test_every_option_is_documented_and_every_documented_flag_exists() -> None:
    table = section("Configuration")
    flags = {"--" + o.name.replace("_", "-") for o in OPTIONS}
    for flag in flags:
        assert f"`{flag}" in table or f"{flag}`" in table or f" {flag}" in table, flag
    mentioned = set(re.findall(r"--[a-z][a-z-]+", README))
    unknown = mentioned - all_flags(parser())
    assert not unknown, f"README mentions flags that no promptcache command has: {unknown}"


def all_flags(p: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and of all its subcommands."""
    out: set[str] = set()
    for action in p._actions:
        out.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= all_flags(sub)
    return out


async def test_quickstart_commands_work_as_written(sidecar: RunningSidecar,
                                                   fake: FakeUpstream) -> None:
    commands = [c for b in bash_blocks(section("Quickstart")) for c in b.splitlines()]
    assert len(commands) == 3 and all(c.startswith("curl ") for c in commands)
    outputs = []
    for command in commands:
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", command.replace("http://127.0.0.1:8080", sidecar.url),
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "OPENAI_API_KEY": "sk-readme"},
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        outputs.append(out.decode())
    assert re.search(r"(?i)^x-cache: miss", outputs[0], re.M)
    assert re.search(r"(?i)^x-cache: hit", outputs[1], re.M)
    assert re.search(r"(?i)^age: \d+", outputs[1], re.M)
    assert outputs[2].rstrip().endswith("data: [DONE]") and outputs[2].count("data: ") >= 4
    assert fake.calls["/v1/chat/completions"] == 1
    assert fake.requests[0].headers["Authorization"] == "Bearer sk-readme"


def test_the_layout_map_names_every_module_of_the_engine_sidecar_and_clients() -> None:
    """README's map of the layout has a line for each module, and names no module that is
    not there."""
    match = re.search(r"\*\*The layout\.\*\*.*?```\n(.*?)```", README, re.S)
    assert match, "README has no map of the layout"
    named = set(re.findall(r"([a-z_]+\.py)", match.group(1)))
    for package in ("cache", "server", "clients"):
        modules = {p.name for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py"}
        missing = modules - named
        assert not missing, f"README's layout map does not name {sorted(missing)}"
    every = {p.name for d in ("cache", "server", "clients", "benchmarks", "promptcache")
             for p in (ROOT / d).rglob("*.py")}
    assert named <= every, f"README's layout map names {sorted(named - every)}, not found"
