"""Shared by the adversarial suite (tests/test_adv_*.py).

A :class:`Site` is a scratch directory: a config, a lockout store directory and
recording actions that append one line per run (``ARGV0 ADDRESS TOKEN``, one
``write`` with O_APPEND, a fresh token each run). A :class:`Server` runs
``ostiary-handle`` under real ``tcpserver -1 -v -HRl0`` (or the
``ostiary-tcpserver`` shim) on an ephemeral port, reading its stderr line by line
with a time stamp, so a test knows when each handler ended and with what
status. The /proc helpers find zombies, open descriptors and leftover handlers;
:func:`figure` prints a summary line past pytest's capture; ``TOTALS`` adds up
the whole run for the last line, which ``test_adv_wire.py`` prints.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import project_tool, require_tool, wait_for

SALT_LEN = 32
KILL = b"adv-kill-passphrase-0"
SECRETS = {"open": b"adv-open-passphrase-1", "ssh": b"adv-ssh-passphrase-22",
           "web": b"adv-web-passphrase-333"}
DEFAULTS = {"DELAY": "0", "COMM_TIMEOUT": "1", "MAX_BAD_CONNS": "3", "MIN_LOGLEVEL": "LOG_DEBUG"}
RECORDER = """#!/bin/sh
# Adversarial-suite action: one line per run, appended (O_APPEND) in one write.
read -r token < /proc/sys/kernel/random/uuid
echo "$0 $1 $token" >> '{runs}'
"""
TRACEBACK = re.compile(r"Traceback|internal error", re.I)
END = re.compile(r"^\S+: end \d+ status (\d+)$")  # tcpserver -v: a handler has exited
# Figures of the whole run, for the summary line test_adv_wire.py prints last.
TOTALS = {"inputs": 0, "connections": 0, "crashes": 0, "false positives": 0}


def response(secret: bytes, salt: bytes) -> bytes:
    """HMAC-SHA256(secret, salt): the only answer that may ever run anything."""
    return hmac.new(secret, salt, hashlib.sha256).digest()


class Site:
    """A config, a store directory and recording actions, in a fresh directory under /tmp.

    ``out`` is sticky and world-writable so actions running as nobody can record.
    """

    def __init__(self, actions: tuple[str, ...] = tuple(SECRETS)) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ostiary-adv-", dir="/tmp"))
        self.root.chmod(0o755)
        self.bin, self.out, self.state = self.root / "bin", self.root / "out", self.root / "state"
        for d, mode in ((self.bin, 0o755), (self.out, 0o1777), (self.state, 0o700)):
            d.mkdir()
            d.chmod(mode)
        self.db = self.state / "lockout.cdb"
        self.cfg = self.root / "ostiary.cfg"
        self.actions = actions
        for name in (*actions, "lockout"):
            self.action(name)

    def action(self, name: str) -> Path:
        """Write recording action ``name`` (mode 755, root's when we are root)."""
        path = self.bin / name
        path.write_text(RECORDER.format(runs=self.out / f"{name}.runs"))
        path.chmod(0o755)
        return path

    def config(self, *lines: str, **settings: str) -> Path:
        """Write the config: KILL, one ACTION per action, LOCKOUT_ACTION, DEFAULTS, ``lines``."""
        text = [f'KILL="{KILL.decode()}"']
        text += [f'ACTION="{SECRETS[a].decode()}","{self.bin / a}"' for a in self.actions]
        text.append(f'LOCKOUT_ACTION="","{self.bin / "lockout"}"')
        text.append(f"LOCKOUT_DB={self.db}")
        text += [f"{k}={v}" for k, v in {**DEFAULTS, **settings}.items()]
        text += lines
        self.cfg.write_text("\n".join(text) + "\n")
        self.cfg.chmod(0o600)
        return self.cfg

    def runs(self, name: str) -> list[tuple[str, str, str]]:
        """(argv0, address, token) of every completed run of action ``name``."""
        p = self.out / f"{name}.runs"
        if not p.exists():
            return []
        return [tuple(x.split(" ")) for x in p.read_text().splitlines()]

    def all_runs(self) -> dict[str, list[tuple[str, str, str]]]:
        """Runs of every action, the lockout action included."""
        return {name: self.runs(name) for name in (*self.actions, "lockout")}

    def handler_argv(self) -> list[str]:
        """The handler's command line."""
        return [project_tool("ostiary-handle"), "-c", str(self.cfg)]

    def view(self):
        """The lockout store as the handler sees it."""
        from ostiary_ucspi.store import Store
        return Store(str(self.db)).view()

    def remove(self) -> None:
        """Delete the directory."""
        shutil.rmtree(self.root, ignore_errors=True)


class Server:
    """A listening server (tcpserver or the shim) running the site's handler.

    ``lines`` collects (monotonic time, line) of its stderr: tcpserver's -v lines
    and every handler's log lines.
    """

    def __init__(self, site: Site, kind: str = "tcpserver", limit: int = 40,
                 backlog: int = 64, **popen_kw) -> None:
        """``popen_kw`` goes to subprocess.Popen (extra_groups=, user=, ...)."""
        self.site = site
        self.popen_kw = popen_kw
        self.kind = kind
        self.limit = limit
        self.backlog = backlog
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.reader: threading.Thread | None = None
        self.counted = False

    def command(self) -> list[str]:
        """The server's command line, listening on an ephemeral port of 127.0.0.1."""
        prog = require_tool("tcpserver") if self.kind == "tcpserver" else project_tool("ostiary-tcpserver")
        return [prog, "-1", "-v", "-HRl0", "-c", str(self.limit), "-b", str(self.backlog),
                "127.0.0.1", "0", *self.site.handler_argv()]

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                     **self.popen_kw)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        first = self.proc.stdout.readline() if ready else b""
        if not first.strip().isdigit():
            self.__exit__()
            pytest.fail(f"{self.kind} printed no port with -1: {first!r}; stderr: {self.text()[-500:]}")
        self.port = int(first)
        return self

    def _read(self) -> None:
        for raw in self.proc.stderr:
            with self.lock:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.reader is not None:
            self.reader.join(5)
        if self.counted:
            return
        self.counted = True
        for _, line in self.snapshot():
            end = END.match(line)
            TOTALS["connections"] += bool(end)
            TOTALS["crashes"] += bool(end and end.group(1) != "0") + bool(TRACEBACK.search(line))

    def snapshot(self) -> list[tuple[float, str]]:
        """A copy of the lines read so far."""
        with self.lock:
            return list(self.lines)

    def text(self) -> str:
        """Everything read so far."""
        return "\n".join(line for _, line in self.snapshot())

    def handler_lines(self, address: str | None = None) -> list[str]:
        """The handlers' (and runners') log lines, those naming ``address`` if given."""
        out = [x for _, x in self.snapshot() if x.startswith("ostiary-handle: ")]
        if address is not None:
            out = [x for x in out if f" {address} " in x]
        return out

    def handler_of(self, address: str, port: int) -> int | None:
        """The pid tcpserver started for the client at ``address``:``port``."""
        tail = f" :{address}::{port}"
        for _, x in self.snapshot():
            if x.startswith("tcpserver: ok ") and x.endswith(tail):
                return int(x.split()[2])
        return None

    def ends(self) -> dict[int, tuple[float, int]]:
        """{pid: (time tcpserver reported it ended, its exit status)}."""
        out = {}
        for t, x in self.snapshot():
            if x.startswith("tcpserver: end "):
                parts = x.split()
                out[int(parts[2])] = (t, int(parts[4]))
        return out

    def wait_end(self, address: str, port: int, timeout: float = 10.0) -> tuple[int, float, int]:
        """Wait for the handler of ``address``:``port`` to end; return (pid, when, status)."""
        def ended():
            pid = self.handler_of(address, port)
            if pid is None:
                return None
            end = self.ends().get(pid)
            return end and (pid, *end)
        return wait_for(ended, timeout, f"the handler of {address}:{port} to end")


# -- clients --------------------------------------------------------------------


def connect(port: int, source: str, timeout: float = 15.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from address ``source`` (any of 127/8)."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read up to ``n`` bytes, less if the peer closes or resets first."""
    got = b""
    while len(got) < n:
        try:
            chunk = sock.recv(n - len(got))
        except (ConnectionResetError, socket.timeout):
            return got
        if not chunk:
            return got
        got += chunk
    return got


def reset(sock: socket.socket) -> None:
    """Abort the connection: close with SO_LINGER 0, so the peer gets a RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()


class Addresses:
    """Hands out distinct loopback addresses (127.N.x.y), so each client is its own stranger."""

    def __init__(self, net: int) -> None:
        self.net = net
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self) -> str:
        with self.lock:
            n = self.n
            self.n += 1
        assert n < 250 * 250, "out of addresses"
        return f"127.{self.net}.{n // 250}.{n % 250 + 1}"


# -- /proc ----------------------------------------------------------------------


class Proc:
    """One line of the process table."""

    def __init__(self, pid: int) -> None:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            self.cmdline = f.read().decode(errors="replace").split("\0")
        fields = stat[stat.rindex(b")") + 2:].split()
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

    Both are ``ostiary-handle`` processes; a runner leads its own session.
    """
    handlers, runners = [], []
    for p in processes():
        if str(cfg) in p.cmdline and any(a.endswith("ostiary-handle") for a in p.cmdline[:2]):
            (runners if p.sid == p.pid else handlers).append(p.pid)
    return handlers, runners


def figure(config: pytest.Config, line: str) -> None:
    """Print one summary line of the suite's figures, past pytest's output capture."""
    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\nadversarial: {line}", flush=True)
