"""Waiting for conditions, and reading the process table.

"Nothing else happened" checks call :func:`wait_quiet`: it returns once no
``ostiary-handle`` process (handler or detached action runner) of a config is
left, so every action the test could have caused has finished.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Proc:
    """One line of the process table."""

    def __init__(self, pid: int) -> None:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            self.cmdline = f.read().decode(errors="replace").split("\0")
        fields = stat[stat.rindex(b")") + 2 :].split()
        self.pid = pid
        self.state = fields[0].decode()
        self.ppid = int(fields[1])
        self.sid = int(fields[3])


def processes() -> list[Proc]:
    """Every process still there by the time we read it."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                out.append(Proc(int(name)))
            except (OSError, ValueError):
                pass
    return out


def zombies(parent: int) -> list[int]:
    """Zombie children of ``parent``."""
    return [p.pid for p in processes() if p.ppid == parent and p.state == "Z"]


def descriptors(pid: int) -> list[str]:
    """What ``pid``'s descriptors point to, sorted, socket and pipe inode numbers blanked."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        out.append(fd + " " + re.sub(r":\[\d+\]", ":[]", target))
    return sorted(out)


def handlers_alive(cfg: Path) -> tuple[list[int], list[int]]:
    """(handlers, detached action runners) running with config ``cfg``.

    Both are ``ostiary-handle`` processes (run directly or under a test's Python
    prelude, which names the script in its code); a runner leads its own session.
    Zombies are gone as far as the work is concerned.
    """
    handlers, runners = [], []
    for p in processes():
        if (
            p.state != "Z"
            and str(cfg) in p.cmdline
            and any("ostiary-handle" in a for a in p.cmdline[:3])
        ):
            (runners if p.sid == p.pid else handlers).append(p.pid)
    return handlers, runners


def wait_quiet(cfg: Path, timeout: float = 15.0) -> None:
    """Wait until every handler and action runner of config ``cfg`` has exited."""
    wait_for(
        lambda: handlers_alive(cfg) == ([], []),
        timeout,
        f"every handler and action runner of {cfg} to exit",
    )


def exec_done(pid: int, program: str, timeout: float = 10.0) -> None:
    """Wait until process ``pid`` runs ``program`` (its exec is over)."""

    def running() -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().split(b"\0")[0].endswith(program.encode())
        except OSError:
            return False

    wait_for(running, timeout, f"process {pid} to exec {program}")
