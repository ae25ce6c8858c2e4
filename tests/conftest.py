"""Shared test helpers: real-tool gating, free ports, project paths."""
from __future__ import annotations

import os
import shutil
import socket
import sysconfig
import time
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))


def require_tool(name: str) -> str:
    """Return the path of system tool ``name``; skip without it, fail under CI."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (apt-get install ucspi-tcp daemontools xinetd ipsvd)"
        if IN_CI:
            pytest.fail(msg + "; CI must have it")
        pytest.skip(msg)
    return path


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago on ``host``."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def project_tool(name: str) -> str:
    """Return the path of one of this project's installed commands.

    The interpreter's own scripts directory comes first, so a version manager's
    shell-script shims (slow, and not what users run) are not measured.
    """
    scripts = Path(sysconfig.get_path("scripts")) / name
    path = str(scripts) if scripts.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: install the project first (pip install -e '.[test]')")
    return path


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def read_to_eof(sock: socket.socket) -> bytes:
    """Read until the peer closes; a reset counts as a close."""
    got = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
