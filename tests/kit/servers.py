"""Servers started one way: ``tcpserver -1`` (or ``ostiary-tcpserver -1``) on port 0.

:func:`listen` starts a server told to bind port 0 and print the port it bound
(``-1``), and reads that port from it: no port is ever guessed. On top of it:

- :class:`TcpServer`: ``tcpserver -v -HRl0`` running a :class:`kit.site.Rig`'s
  handler, its stderr appended to the rig's log;
- :class:`Server`: the same (or the shim) for a :class:`kit.site.Site`, its stderr
  read line by line with a time stamp, so a test knows when each handler ended
  and with what status.

:class:`Handler` is one ``ostiary-handle`` a test started by hand on one connection.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from typing import IO, Any

import pytest
from conftest import project_tool, require_tool

from kit.procs import wait_for
from kit.wire import knock, talk

TRACEBACK = re.compile(r"Traceback|internal error", re.I)
END = re.compile(r"^\S+: end \d+ status (\d+)$")  # tcpserver -v: a handler has exited


def listen(argv: list[str], stderr: int | IO[Any], **popen_kw) -> tuple[subprocess.Popen, int]:
    """Start ``argv`` (a server run with ``-1`` on port 0); return (process, the port it bound).

    Fails the test, after stopping the server, if the first line on its stdout
    within 10 seconds is not a port number.
    """
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, **popen_kw
    )
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    first = proc.stdout.readline() if ready else b""
    if not first.strip().isdigit():
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)
        pytest.fail(f"{argv[0]} printed no port with -1: {first!r}")
    return proc, int(first)


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM a server if it still runs; return its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    code = proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()
    return code


def unused_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` that was free a moment ago.

    Only for programs that must be told their port before they start (a
    daemontools service's run script, an xinetd stanza); servers we start
    ourselves learn theirs from ``-1`` (:func:`listen`).
    """
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class closed_port:
    """A port of 127.0.0.1 held bound but not listening: a connection to it is refused.

    ``with closed_port() as port: ...``; the port stays refused until the block ends.
    """

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


class Handler:
    """One ostiary-handle process serving one connection; ``client`` is our end."""

    def __init__(self, proc: subprocess.Popen, client: socket.socket) -> None:
        self.proc = proc
        self.client = client

    def talk(self, secret: bytes | None = None, **kw) -> bytes:
        """:func:`kit.wire.talk` on this connection, then close our end."""
        try:
            return talk(self.client, secret, **kw)
        finally:
            self.client.close()

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the handler to exit; return its exit status."""
        return self.proc.wait(timeout)


class TcpServer:
    """``tcpserver -1 -v -HRl0 HOST 0 ostiary-handle -c CFG`` with its stderr in the rig's log."""

    def __init__(
        self,
        rig,
        *args: str,
        limit: int = 40,
        backlog: int = 64,
        env: dict[str, str] | None = None,
        salt: bytes | None = None,
        host: str = "127.0.0.1",
    ) -> None:
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
        with open(self.rig.log, "ab") as log:
            self.proc, self.port = listen(
                [
                    tcpserver,
                    "-1",
                    "-v",
                    "-HRl0",
                    "-c",
                    str(self.limit),
                    "-b",
                    str(self.backlog),
                    self.host,
                    "0",
                    *self.rig.argv(*self.args, salt=self.salt),
                ],
                log,
                env=self.rig.env(self.extra),
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop(self.proc)

    def knock(self, secret: bytes | None = None, **kw) -> bytes:
        """:func:`kit.wire.knock` this server."""
        return knock(self.port, secret, host=self.host, **kw)

    def ended(self) -> int:
        """How many handlers tcpserver has seen exit."""
        return sum(1 for x in self.rig.log_text().splitlines() if x.startswith("tcpserver: end "))


class Server:
    """A listening server (tcpserver, the shim, or the shim forking) running a site's handler.

    ``kind``: ``tcpserver``, ``ostiary-tcpserver`` or ``ostiary-tcpserver -F``
    (its forking mode, the handler imported once).

    ``lines`` collects (monotonic time, line) of its stderr: tcpserver's -v lines
    and every handler's log lines. Given a ``tally`` (the adversarial suite's),
    it adds the connections it served and the crashes it saw when it stops.
    """

    def __init__(
        self,
        site,
        kind: str = "tcpserver",
        limit: int = 40,
        backlog: int = 64,
        tally=None,
        **popen_kw,
    ) -> None:
        """``popen_kw`` goes to subprocess.Popen (extra_groups=, user=, ...)."""
        self.site = site
        self.popen_kw = popen_kw
        self.kind = kind
        self.limit = limit
        self.backlog = backlog
        self.tally = tally
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.reader: threading.Thread | None = None
        self.counted = False

    def command(self) -> list[str]:
        """The server's command line, listening on an ephemeral port of 127.0.0.1."""
        prog = (
            require_tool("tcpserver")
            if self.kind == "tcpserver"
            else project_tool("ostiary-tcpserver")
        )
        fork = ["-F", "ostiary_ucspi.handle"] if self.kind == "ostiary-tcpserver -F" else []
        return [
            prog,
            *fork,
            "-1",
            "-v",
            "-HRl0",
            "-c",
            str(self.limit),
            "-b",
            str(self.backlog),
            "127.0.0.1",
            "0",
            *self.site.handler_argv(),
        ]

    def __enter__(self) -> Server:
        read, write = os.pipe()
        try:
            self.proc, self.port = listen(
                self.command(),
                write,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                **self.popen_kw,
            )
        finally:
            os.close(write)
            self.stderr = os.fdopen(read, "rb")
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        for raw in self.stderr:
            with self.lock:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop(self.proc)
        if self.reader is not None:
            self.reader.join(5)
        if self.counted or self.tally is None:
            return
        self.counted = True
        self.tally.servers += 1
        for _, line in self.snapshot():
            end = END.match(line)
            self.tally.totals["connections"] += bool(end)
            self.tally.totals["crashes"] += bool(end and end.group(1) != "0") + bool(
                TRACEBACK.search(line)
            )

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
