"""Run ostiary-handle for real: a rig in a temporary directory, a client, tcpserver.

A :class:`Rig` is a directory holding a config, a lockout store directory,
recording action scripts and a log file. The handler runs either on one end of
a real TCP connection (:meth:`Rig.start`, the inetd path included) or behind a
real ``tcpserver -HRl0`` (:class:`TcpServer`); :func:`knock` and :func:`talk`
play the client. Everything a handler logs lands in ``rig.log``.

Recording actions (:meth:`Rig.action`) write, for their last run, ``NAME.argv``
(NUL-separated), ``NAME.env`` (their /proc environ, NUL-separated),
``NAME.status`` (/proc status: Uid, Gid, Groups, SigIgn), ``NAME.stdin`` (what fd 0
is), ``NAME.fds`` (their open descriptors) into ``rig.out``, print one line on
stdout and one on stderr, and append ``ADDRESS TIME`` to ``NAME.runs`` as their
very last step (so a line there means the run is complete).
"""
from __future__ import annotations

import hashlib
import hmac
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import free_port, project_tool, read_to_eof, require_tool, wait_for

SALT_LEN = 32
KILL = b"kill-passphrase-for-tests"
OPEN = b"open-passphrase-for-tests"
DEFAULTS = {"DELAY": "0", "COMM_TIMEOUT": "2", "MAX_BAD_CONNS": "3", "MIN_LOGLEVEL": "LOG_INFO"}

RECORDER = """#!/bin/sh
# Test action {name}: records how it was started, talks, sleeps, exits.
o='{out}/{name}'
printf '%s\\0' "$0" "$@" > "$o.argv"
cat /proc/$$/environ > "$o.env"
cat /proc/$$/status > "$o.status"
readlink /proc/$$/fd/0 > "$o.stdin"
ls -l /proc/$$/fd/ > "$o.fds"
echo "$$" > "$o.pid"
pwd > "$o.cwd"
umask > "$o.umask"
echo "{name} says hello to $1"
echo "{name} complains on stderr" >&2
{sleep}
echo "$1 $(date +%s.%N)" >> "$o.runs"
exit {code}
"""


FAKE_SYSLOG = '''"""Stands in for the syslog module: each call becomes a line in {path}."""
import os
import syslog as real

LOG_PID, LOG_AUTH = real.LOG_PID, real.LOG_AUTH


def record(text):
    fd = os.open({path!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, text.encode("utf-8", "replace") + b"\\n")
    os.close(fd)


def openlog(ident="", logoption=0, facility=0):
    record(f"openlog {{ident}} {{logoption}} {{facility}}")


def syslog(priority, message):
    record(f"{{priority}} {{message}}")
'''


def response(secret: bytes, salt: bytes) -> bytes:
    """Return what an Ostiary 4.0 client answers: HMAC-SHA256(secret, salt)."""
    return hmac.new(secret, salt, hashlib.sha256).digest()


def talk(sock: socket.socket, secret: bytes | None = None, *, response_bytes: bytes | None = None,
         answer: Callable[[bytes], bytes] | None = None, hold: bool = False,
         timeout: float = 15.0) -> bytes:
    """Play the client on a connected socket; return every byte the server sent.

    Reads the salt (up to 32 bytes, or less if the server closes), then sends
    ``response_bytes``, or ``answer(salt)``, or HMAC(``secret``, salt); with none
    of them it sends nothing. Unless ``hold``, it then shuts its sending side.
    Finally it reads until the server closes.
    """
    sock.settimeout(timeout)
    got = b""
    while len(got) < SALT_LEN:
        try:
            chunk = sock.recv(SALT_LEN - len(got))
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    if response_bytes is None and answer is not None:
        response_bytes = answer(got)
    if response_bytes is None and secret is not None:
        response_bytes = response(secret, got)
    try:
        if response_bytes:
            sock.sendall(response_bytes)
        if not hold:
            sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass
    except OSError as e:  # the handler closed with our surplus unread: the kernel reset
        if e.errno != errno.ENOTCONN:
            raise
    return got + read_to_eof(sock)


def knock(port: int, secret: bytes | None = None, *, host: str = "127.0.0.1",
          source: str | None = None, **kw) -> bytes:
    """Connect to host:port (from ``source``, if given) and :func:`talk`; return what came back."""
    src = (source, 0) if source else None
    with socket.create_connection((host, port), timeout=kw.get("timeout", 15.0),
                                  source_address=src) as s:
        return talk(s, secret, **kw)


def tcp_pair(listen_host: str = "127.0.0.1", connect_host: str | None = None
             ) -> tuple[socket.socket, socket.socket]:
    """Return (client, server), the two ends of a real loopback TCP connection.

    ``listen_host`` "::" listens dual-stack, so an IPv4 ``connect_host`` gives the
    server an IPv4-mapped peer address (::ffff:127.0.0.1).
    """
    family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as lst:
        if listen_host == "::":
            lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lst.bind((listen_host, 0))
        lst.listen(1)
        port = lst.getsockname()[1]
        client = socket.create_connection((connect_host or listen_host, port), timeout=10)
        server, _ = lst.accept()
    return client, server


class Handler:
    """One ostiary-handle process serving one connection; ``client`` is our end."""

    def __init__(self, proc: subprocess.Popen, client: socket.socket) -> None:
        self.proc = proc
        self.client = client

    def talk(self, secret: bytes | None = None, **kw) -> bytes:
        """:func:`talk` on this connection, then close our end."""
        try:
            return talk(self.client, secret, **kw)
        finally:
            self.client.close()

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the handler to exit; return its exit status."""
        return self.proc.wait(timeout)


class Rig:
    """A config, store directory, recording actions and a log file in one directory.

    The directory is mode 755 (under /tmp, not pytest's private tree) so actions
    running as nobody can reach their scripts and their ``out`` directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.chmod(0o755)
        self.bin = root / "bin"
        self.out = root / "out"
        self.state = root / "state"
        for d, mode in ((self.bin, 0o755), (self.out, 0o777), (self.state, 0o700)):
            d.mkdir()
            d.chmod(mode)
        self.db = self.state / "lockout.cdb"
        self.cfg = root / "ostiary.cfg"
        self.log = root / "log"
        self.log.touch()
        self.syslog = root / "syslog"
        self.secrets: list[bytes] = [KILL, OPEN]
        self.procs: list[subprocess.Popen] = []
        self.control = -1
        self.action("open")

    # -- set-up ---------------------------------------------------------------

    def action(self, name: str, *, code: int = 0, sleep: float = 0, mode: int = 0o755) -> str:
        """Write recording action ``name`` into ``bin``; return its path."""
        path = self.bin / name
        path.write_text(RECORDER.format(out=self.out, name=name, code=code,
                                        sleep=f"sleep {sleep}" if sleep else ""))
        path.chmod(mode)
        return str(path)

    def write_config(self, *lines: str, kill: bytes | None = KILL, open_action: bool = True,
                     db: Path | None = None, path: Path | None = None, mode: int = 0o600,
                     **settings: str | None) -> Path:
        """Write a config: KILL, the ``open`` ACTION, LOCKOUT_DB, DEFAULTS, then ``lines``.

        ``settings`` override DEFAULTS (None drops a key); ``kill=None`` and
        ``open_action=False`` leave those lines out; ``db`` replaces ``self.db``.
        """
        text = []
        if kill is not None:
            text.append(f'KILL="{kill.decode()}"')
        if open_action:
            text.append(f'ACTION="{OPEN.decode()}","{self.bin}/open"')
        text.append(f"LOCKOUT_DB={db or self.db}")
        merged = {**DEFAULTS, **settings}
        text += [f"{k}={v}" for k, v in merged.items() if v is not None]
        text += lines
        path = path or self.cfg
        path.write_text("\n".join(text) + "\n")
        path.chmod(mode)
        return path

    def fake_supervise(self) -> tuple[Path, dict[str, str]]:
        """Make a service directory whose supervise/control FIFO we hold open, as supervise does.

        Returns (service dir, environment to add: OSTIARY_SERVICE). What the
        handler writes there is in :meth:`control_commands`; :meth:`stop_supervise`
        closes our end, as when supervise is not running.
        """
        service = self.root / "service"
        (service / "supervise").mkdir(parents=True)
        os.mkfifo(service / "supervise" / "control", 0o600)
        self.control = os.open(service / "supervise" / "control", os.O_RDONLY | os.O_NONBLOCK)
        return service, {"OSTIARY_SERVICE": str(service)}

    def control_commands(self) -> bytes:
        """What was written to the fake supervise's control FIFO so far."""
        try:
            return os.read(self.control, 64)
        except BlockingIOError:
            return b""

    def stop_supervise(self) -> None:
        """Close our end of the control FIFO: nobody reads it any more."""
        os.close(self.control)
        self.control = -1

    # -- running --------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A clean environment for the handler: PATH (and PYTHONPATH, if set) plus ``extra``."""
        keep = {k: os.environ[k] for k in ("PATH", "PYTHONPATH") if k in os.environ}
        return {"PATH": "/usr/bin:/bin", **keep, **(extra or {})}

    def argv(self, *args: str, salt: bytes | None = None, fake_syslog: bool = False,
             cfg: Path | None = None) -> list[str]:
        """The handler's command line.

        ``salt`` makes it send that salt (for test vectors); ``fake_syslog``
        makes its syslog calls append to ``self.syslog`` instead. Either way the
        installed script itself runs, under a short Python prelude.
        """
        tool = project_tool("ostiary-handle")
        cfg_args = ["-c", str(cfg or self.cfg), *args]
        if salt is None and not fake_syslog:
            return [tool, *cfg_args]
        prelude = ["import sys, runpy"]
        if salt is not None:
            prelude += ["import ostiary_ucspi.protocol as p",
                        f"p.new_salt = lambda: bytes.fromhex({salt.hex()!r})"]
        if fake_syslog:
            (self.root / "fakesyslog.py").write_text(FAKE_SYSLOG.format(path=str(self.syslog)))
            prelude += [f"sys.path.insert(0, {str(self.root)!r})",
                        "import fakesyslog", "sys.modules['syslog'] = fakesyslog"]
        prelude.append(f"runpy.run_path({tool!r}, run_name='__main__')")
        return [sys.executable, "-c", "; ".join(prelude), *cfg_args]

    def start(self, *args: str, remote_ip: str | None = "127.0.0.1", inetd: bool = False,
              listen_host: str = "127.0.0.1", connect_host: str | None = None,
              env: dict[str, str] | None = None, salt: bytes | None = None,
              fake_syslog: bool = False, cfg: Path | None = None) -> Handler:
        """Run the handler on a fresh TCP connection (ours is ``Handler.client``).

        Like tcpserver it gets the socket as fds 0 and 1 and ``TCPREMOTEIP``
        (unless ``remote_ip`` is None); ``inetd=True`` puts the socket on fd 2
        too and sets no TCPREMOTEIP, as inetd does. Its stderr otherwise
        appends to ``self.log``. ``salt``, ``fake_syslog``: see :meth:`argv`.
        """
        client, server = tcp_pair(listen_host, connect_host)
        extra = dict(env or {})
        if remote_ip is not None and not inetd:
            extra.setdefault("TCPREMOTEIP", remote_ip)
        with open(self.log, "ab") as log:
            argv = self.argv(*args, salt=salt, fake_syslog=fake_syslog, cfg=cfg)
            proc = subprocess.Popen(argv, stdin=server, stdout=server,
                                    stderr=server if inetd else log, env=self.env(extra))
        server.close()
        self.procs.append(proc)
        return Handler(proc, client)

    def handle(self, secret: bytes | None = None, *, talk_kw: dict | None = None,
               **start_kw) -> tuple[bytes, int]:
        """Start a handler, :func:`talk` to it; return (bytes received, exit status)."""
        h = self.start(**start_kw)
        got = h.talk(secret, **(talk_kw or {}))
        return got, h.wait()

    def check(self, *args: str, cfg: Path | None = None) -> subprocess.CompletedProcess:
        """Run ``ostiary-handle --check``; return the completed process (text output)."""
        return subprocess.run(self.argv("--check", *args, cfg=cfg), capture_output=True,
                              text=True, env=self.env(), timeout=30)

    # -- looking --------------------------------------------------------------

    def lines(self, prog: str = "ostiary-handle") -> list[str]:
        """The log's lines written by ``prog`` (tcpserver's own are left out)."""
        return [x for x in self.log.read_text(errors="replace").splitlines()
                if x.startswith(prog + ":")]

    def log_text(self) -> str:
        """The whole log."""
        return self.log.read_text(errors="replace")

    def wait_log(self, text: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """Wait until ``count`` handler log lines contain ``text``; return those lines."""
        def found():
            hits = [x for x in self.lines() if text in x]
            return hits if len(hits) >= count else None
        return wait_for(found, timeout, f"{count} log line(s) with {text!r}")

    def runs(self, name: str) -> list[str]:
        """Addresses action ``name`` completed runs for, oldest first."""
        p = self.out / f"{name}.runs"
        return [x.split()[0] for x in p.read_text().splitlines()] if p.exists() else []

    def wait_runs(self, name: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """Wait until action ``name`` has completed ``count`` runs; return the addresses."""
        return wait_for(lambda: len(self.runs(name)) >= count and self.runs(name),
                        timeout, f"{count} run(s) of action {name}")

    def record(self, name: str) -> dict:
        """What action ``name`` recorded about its last run."""
        o = self.out / name
        status = {}
        for line in (o.with_suffix(".status")).read_text().splitlines():
            key, _, value = line.partition(":")
            status[key] = value.split()
        env = (o.with_suffix(".env")).read_bytes().split(b"\0")
        return {
            "argv": (o.with_suffix(".argv")).read_bytes().split(b"\0")[:-1],
            "env": dict(e.decode().split("=", 1) for e in env if e),
            "uid": [int(x) for x in status["Uid"]],
            "gid": [int(x) for x in status["Gid"]],
            "groups": [int(x) for x in status["Groups"]],
            "sigign": int(status["SigIgn"][0], 16),
            "stdin": (o.with_suffix(".stdin")).read_text().strip(),
            "fds": (o.with_suffix(".fds")).read_text(),
            "pid": int((o.with_suffix(".pid")).read_text()),
        }

    def store_view(self):
        """The lockout store as the handler sees it (None before the first write)."""
        from ostiary_ucspi.store import Store
        return Store(str(self.db)).view()

    def entry(self, key: bytes = b"127.0.0.1"):
        """The lockout record of ``key`` (zeros when absent)."""
        from ostiary_ucspi.policy import Entry
        view = self.store_view()
        return Entry(None if view is None else view.get(key))

    def cleanup(self) -> None:
        """Kill handlers we started that are still running; close the fake control FIFO."""
        if self.control >= 0:
            os.close(self.control)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


class TcpServer:
    """``tcpserver -v -HRl0 HOST PORT ostiary-handle -c CFG`` with its stderr in the rig's log."""

    def __init__(self, rig: Rig, *args: str, limit: int = 40, backlog: int = 64,
                 env: dict[str, str] | None = None, salt: bytes | None = None,
                 host: str = "127.0.0.1") -> None:
        self.rig = rig
        self.args = args
        self.limit = limit
        self.backlog = backlog
        self.extra = env
        self.salt = salt
        self.host = host
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> TcpServer:
        tcpserver = require_tool("tcpserver")
        for _ in range(5):
            self.port = free_port()
            mark = len(self.rig.log_text())
            with open(self.rig.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [tcpserver, "-v", "-HRl0", "-c", str(self.limit), "-b", str(self.backlog),
                     self.host, str(self.port), *self.rig.argv(*self.args, salt=self.salt)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    env=self.rig.env(self.extra))
            status = wait_for(lambda: "tcpserver: status: 0/" in self.rig.log_text()[mark:]
                              or self.proc.poll() is not None, 10, "tcpserver to listen")
            if self.proc.poll() is None and status:
                return self
        pytest.fail("tcpserver did not start: " + self.rig.log_text()[-500:])

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def knock(self, secret: bytes | None = None, **kw) -> bytes:
        """:func:`knock` this server."""
        return knock(self.port, secret, host=self.host, **kw)

    def ended(self) -> int:
        """How many handlers tcpserver has seen exit."""
        return sum(1 for x in self.rig.log_text().splitlines() if x.startswith("tcpserver: end "))


@pytest.fixture
def rig() -> Iterator[Rig]:
    """A fresh :class:`Rig` with its default config written."""
    root = Path(tempfile.mkdtemp(prefix="ostiary-test-", dir="/tmp"))
    r = Rig(root)
    r.write_config()
    try:
        yield r
    finally:
        r.cleanup()
        shutil.rmtree(root, ignore_errors=True)
