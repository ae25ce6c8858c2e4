"""systemd socket activation: the shipped units, and the handler as ostiary@.service runs it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, project_tool, require_tool
from kit.procs import wait_for
from kit.servers import unused_port
from kit.wire import knock

UNITS = ROOT / "service" / "systemd"
KILL = b"systemd-kill-passphrase"
ACTION = b"systemd-action-passphrase"


def test_units_pass_systemd_analyze_verify(tmp_path):
    """The units as shipped, but for ExecStart: here the handler is this installation's."""
    analyze = require_tool("systemd-analyze")
    handler = project_tool("ostiary-handle")
    for name in ("ostiary.socket", "ostiary@.service"):
        text = (UNITS / name).read_text()
        (tmp_path / name).write_text(
            text.replace("ExecStart=/usr/bin/ostiary-handle", f"ExecStart={handler}")
        )
    assert f"ExecStart={handler}" in (tmp_path / "ostiary@.service").read_text()
    r = subprocess.run(
        [
            analyze,
            "verify",
            "--man=no",
            str(tmp_path / "ostiary.socket"),
            str(tmp_path / "ostiary@.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "ostiary" not in r.stderr, r.stderr


def test_units_say_what_the_issue_asks():
    socket_unit = (UNITS / "ostiary.socket").read_text()
    service = (UNITS / "ostiary@.service").read_text()
    for line in ("Accept=yes", "MaxConnections=", "MaxConnectionsPerSource="):
        assert re.search(rf"^{line}", socket_unit, re.M), line
    for line in (
        "StandardInput=socket",
        "StandardOutput=socket",
        "StandardError=journal",
        "KillMode=process",
    ):
        assert re.search(rf"^{line}$", service, re.M), line


class Activated:
    """The handler under ``systemd-socket-activate --accept --inetd``, its stderr in a file."""

    def __init__(self, tmp: Path, config: str, env: dict[str, str]) -> None:
        self.port = unused_port()
        self.log = tmp / "log"
        cfg = tmp / "ostiary.cfg"
        cfg.write_text(config)
        cfg.chmod(0o600)
        cmd = [
            require_tool("systemd-socket-activate"),
            "-l",
            f"127.0.0.1:{self.port}",
            "--accept",
            "--inetd",
        ]
        for key, value in env.items():
            cmd += ["-E", f"{key}={value}"]
        cmd += [project_tool("ostiary-handle"), "-c", str(cfg)]
        with open(self.log, "wb") as sink:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                start_new_session=True,
                env={"PATH": os.environ["PATH"]},
            )
        wait_for(
            lambda: f"Listening on 127.0.0.1:{self.port}" in self.text(),
            10,
            "systemd-socket-activate to listen",
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)


@pytest.fixture
def activated(tmp_path):
    """Start one Activated rig per call; stop them all at the end."""
    started: list[Activated] = []

    def start(env: dict[str, str]) -> Activated:
        out = tmp_path / "seen"
        action = tmp_path / "action"
        action.write_text(f'#!/bin/sh\necho "$#:$1" >> {out}\n')
        action.chmod(0o755)
        state = tmp_path / "state"
        state.mkdir(mode=0o700, exist_ok=True)
        config = (
            f'KILL="{KILL.decode()}"\nACTION="{ACTION.decode()}","{action}",{os.getuid()},{os.getgid()}\n'
            f'LOCKOUT_DB="{state}/lockout.cdb"\nDELAY=0\nCOMM_TIMEOUT=5\n'
            "MAX_BAD_CONNS=2\nMIN_LOGLEVEL=LOG_INFO\n"
        )
        rig = Activated(tmp_path, config, env)
        started.append(rig)
        return rig

    yield start
    for rig in started:
        rig.stop()


def test_full_exchange_takes_the_address_from_remote_addr(activated, tmp_path):
    """REMOTE_ADDR (what systemd sets for Accept=yes) comes before getpeername(0)."""
    rig = activated({"REMOTE_ADDR": "192.0.2.5"})
    got = knock(rig.port, ACTION)
    assert len(got) == 32
    seen = tmp_path / "seen"
    wait_for(seen.exists, 10, "the action")
    wait_for(lambda: seen.read_text() == "1:192.0.2.5\n", 10, "the action's one argument")
    wait_for(lambda: "192.0.2.5 action 1" in rig.text(), 10, "the action's log line")
    handler = [line for line in rig.text().splitlines() if line.startswith("ostiary-handle")]
    assert handler and not [line for line in handler if "127.0.0.1" in line], handler


def test_lockout_and_only_the_salt_without_remote_addr(activated, tmp_path):
    """getpeername(0) names the client; two misses lock it out; only 32 bytes ever come back."""
    rig = activated({})
    assert len(knock(rig.port, response_bytes=bytes(32))) == 32
    # More than a response: the handler reads 32 bytes, sends nothing but the salt.
    assert len(knock(rig.port, response_bytes=os.urandom(32) * 4)) == 32
    wait_for(
        lambda: "127.0.0.1 locked out after 2 bad connections" in rig.text(), 10, "the lockout"
    )
    assert knock(rig.port, ACTION) == b""  # locked: closed at once, nothing sent
    wait_for(
        lambda: "127.0.0.1 closed at once: locked out" in rig.text(), 10, "the refusal's log line"
    )
    assert not (tmp_path / "seen").exists()


def test_a_silent_client_gets_the_salt_and_a_close(activated):
    rig = activated({"REMOTE_ADDR": "198.51.100.9"})
    with socket.create_connection(("127.0.0.1", rig.port), timeout=15) as s:
        s.settimeout(15)
        got = b""
        while True:
            chunk = s.recv(64)
            if not chunk:
                break
            got += chunk
    assert len(got) == 32
    wait_for(
        lambda: "198.51.100.9 failed: timeout after 0 bytes" in rig.text(),
        10,
        "the timeout's log line",
    )
