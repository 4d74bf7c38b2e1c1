"""Server subprocesses: start on a free loopback port, watch through /proc, stop within a bound.

Every figure about a server comes from outside it: CPU seconds are ``utime +
stime`` of ``/proc/<pid>/stat`` (all threads of the process, in clock ticks),
memory is ``VmRSS`` and ``VmHWM`` of ``/proc/<pid>/status``. Each server runs
alone in its process (nginx with ``master_process off``), so one pid is the
whole server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

__all__ = ["Server", "ServerFailed", "Usage", "free_port", "read_usage", "running"]

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
_STOP_GRACE = 5.0  # seconds a server gets between SIGTERM and SIGKILL


class ServerFailed(Exception):
    """A server did not start listening in time, or exited early."""


@dataclass(frozen=True, slots=True)
class Usage:
    """One reading of a process: CPU seconds so far, current and peak resident memory."""

    cpu_s: float
    rss: int
    peak_rss: int


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's choice for port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def read_usage(pid: int) -> Usage:
    """Read ``pid``'s CPU seconds and memory from /proc. Not a checkpoint."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name, in parentheses, may hold spaces: split after its closing one.
    fields = stat.rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15
    memory = {"VmRSS": 0, "VmHWM": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in memory:
            memory[key] = int(value.split()[0]) * 1024
    return Usage(ticks / _TICKS_PER_SECOND, memory["VmRSS"], memory["VmHWM"])


class Server:
    """A running server subprocess listening on ``127.0.0.1:port``."""

    def __init__(self, name: str, process: trio.Process, port: int, log: Path) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.log = log

    def usage(self) -> Usage:
        """The process's usage now. Not a checkpoint."""
        return read_usage(self.process.pid)


@asynccontextmanager
async def running(
    name: str,
    argv: Sequence[str],
    port: int,
    workdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 30.0,
    stdout: int | None = None,
) -> AsyncIterator[Server]:
    """Start ``argv``, wait until it accepts on ``port``, and stop it on exit.

    A checkpoint. Output goes to ``workdir/<name>.log`` (standard output too,
    unless ``stdout`` is ``subprocess.PIPE``). Raises :class:`ServerFailed` if
    the server exits or does not listen within ``ready_timeout`` seconds. On
    exit, cancellation included, the server gets SIGTERM, then SIGKILL after
    5 s; the exit is awaited under a shield, so no process outlives the block.
    """
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log if stdout is None else stdout,
            stderr=log,
            env={**os.environ, **(env or {})},
            cwd=workdir,
        )
        try:
            with trio.move_on_after(ready_timeout) as waiting:
                await _wait_listening(name, process, port, log_path)
            if waiting.cancelled_caught:
                raise ServerFailed(
                    f"{name} did not listen on port {port} within {ready_timeout:g} s;"
                    f" see {log_path}"
                )
            yield Server(name, process, port, log_path)
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process)


async def _wait_listening(name: str, process: trio.Process, port: int, log: Path) -> None:
    """Return once ``port`` accepts a connection. A checkpoint; raises ServerFailed if it exits."""
    while process.poll() is None:
        with trio.socket.socket() as probe:
            try:
                await probe.connect(("127.0.0.1", port))
            except OSError:
                await trio.sleep(0.02)
            else:
                return
    raise ServerFailed(f"{name} exited with status {process.returncode}; see {log}")


async def _stop(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL after the grace period; return once it has exited. A checkpoint."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(_STOP_GRACE):
            await process.wait()
            return
        process.kill()
    await process.wait()
