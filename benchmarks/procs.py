"""Child processes for benchmarks: start, wait until they answer, read their CPU time."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

#: Ports :func:`free_port` handed out in this process: never handed out twice.
_ISSUED: set[int] = set()


def free_port() -> int:
    """A loopback port that was free a moment ago, and that this process was not given
    before: two calls in a row could otherwise get the same port (the kernel may reuse a
    port as soon as the probe closes), and the second server would fail to bind while the
    first answered its readiness check."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _ISSUED:
            _ISSUED.add(port)
            return port


def wait_http(url: str, proc: subprocess.Popen[bytes], within: float = 30.0) -> None:
    """Poll ``url`` until it answers (any status); fail fast if ``proc`` exits."""
    deadline = time.monotonic() + within
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {within} s") from None
            time.sleep(0.05)


@contextlib.contextmanager
def python_process(args: Sequence[str], ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m ...`` in a child process, stopped (SIGTERM, then SIGKILL) on exit."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        wait_http(ready_url, proc)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:  # closed at once: no ResourceWarning
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    return _children_map().get(pid, [])


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        out.setdefault(ppid, []).append(int(entry))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and of its live descendants (a supervisor and its workers)."""
    kids = _children_map()
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
        todo += kids.get(p, [])
    return total
