"""Sites: a config, a lockout store directory and recording actions in a scratch directory.

Three kinds, one layout (:class:`Scratch`: ``bin/``, ``out/``, ``state/lockout.cdb``,
``ostiary.cfg``, under /tmp with mode 755 so actions running as nobody reach them):

- :class:`Rig` runs the handler itself on one end of a real TCP connection (the
  inetd path included); its actions record everything about how they were started.
- :class:`Site`, for the adversarial suite, has several actions, each appending one
  line per run (``ARGV0 ADDRESS TOKEN``), and is served by :class:`kit.servers.Server`.
- :class:`StoreRig` is a config and its store, used in-process by operator-tool tests.

Rig's recording actions (:meth:`Rig.action`) write, for their last run, ``NAME.argv``
(NUL-separated), ``NAME.env`` (their /proc environ, NUL-separated), ``NAME.status``
(/proc status: Uid, Gid, Groups, SigIgn), ``NAME.stdin`` (what fd 0 is), ``NAME.fds``
(their open descriptors) into ``rig.out``, print one line on stdout and one on
stderr, and append ``ADDRESS TIME`` to ``NAME.runs`` as their very last step (so a
line there means the run is complete).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import project_tool

from kit.procs import wait_for
from kit.servers import Handler
from kit.wire import tcp_pair

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

ADV_KILL = b"adv-kill-passphrase-0"
SECRETS = {
    "open": b"adv-open-passphrase-1",
    "ssh": b"adv-ssh-passphrase-22",
    "web": b"adv-web-passphrase-333",
}
ADV_DEFAULTS = {
    "DELAY": "0",
    "COMM_TIMEOUT": "1",
    "MAX_BAD_CONNS": "3",
    "MIN_LOGLEVEL": "LOG_DEBUG",
}
LINE_RECORDER = """#!/bin/sh
# Adversarial-suite action: one line per run, appended (O_APPEND) in one write.
read -r token < /proc/sys/kernel/random/uuid
echo "$0 $1 $token" >> '{runs}'
"""


class Scratch:
    """The common layout: ``bin`` (755), ``out`` (``out_mode``), ``state`` (700), db, cfg."""

    def __init__(self, root: Path, out_mode: int) -> None:
        self.root = root
        root.chmod(0o755)
        self.bin, self.out, self.state = root / "bin", root / "out", root / "state"
        for d, mode in ((self.bin, 0o755), (self.out, out_mode), (self.state, 0o700)):
            d.mkdir()
            d.chmod(mode)
        self.db = self.state / "lockout.cdb"
        self.cfg = root / "ostiary.cfg"

    def view(self):
        """The lockout store as the handler sees it (None before the first write)."""
        from ostiary_ucspi.store import Store

        return Store(str(self.db)).view()

    store_view = view

    def entry(self, key: bytes | str = b"127.0.0.1"):
        """The lockout record of ``key`` (zeros when absent)."""
        from ostiary_ucspi.policy import Entry

        view = self.view()
        key = key.encode() if isinstance(key, str) else key
        return Entry(None if view is None else view.get(key))

    def journal(self) -> Path:
        """The store's journal file."""
        return self.db.with_name(self.db.name + ".journal")

    def remove(self) -> None:
        """Delete the directory."""
        shutil.rmtree(self.root, ignore_errors=True)


class Rig(Scratch):
    """A :class:`Scratch` with recording actions, a log file, and the handler run by hand."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, 0o777)
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
        path.write_text(
            RECORDER.format(
                out=self.out, name=name, code=code, sleep=f"sleep {sleep}" if sleep else ""
            )
        )
        path.chmod(mode)
        return str(path)

    def write_config(
        self,
        *lines: str,
        kill: bytes | None = KILL,
        open_action: bool = True,
        db: Path | None = None,
        path: Path | None = None,
        mode: int = 0o600,
        **settings: str | None,
    ) -> Path:
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

    def argv(
        self,
        *args: str,
        salt: bytes | None = None,
        fake_syslog: bool = False,
        cfg: Path | None = None,
    ) -> list[str]:
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
            prelude += [
                "import ostiary_ucspi.protocol as p",
                f"p.new_salt = lambda: bytes.fromhex({salt.hex()!r})",
            ]
        if fake_syslog:
            (self.root / "fakesyslog.py").write_text(FAKE_SYSLOG.format(path=str(self.syslog)))
            prelude += [
                f"sys.path.insert(0, {str(self.root)!r})",
                "import fakesyslog",
                "sys.modules['syslog'] = fakesyslog",
            ]
        prelude.append(f"runpy.run_path({tool!r}, run_name='__main__')")
        return [sys.executable, "-c", "; ".join(prelude), *cfg_args]

    def start(
        self,
        *args: str,
        remote_ip: str | None = "127.0.0.1",
        inetd: bool = False,
        listen_host: str = "127.0.0.1",
        connect_host: str | None = None,
        env: dict[str, str] | None = None,
        salt: bytes | None = None,
        fake_syslog: bool = False,
        cfg: Path | None = None,
        wrap: tuple[str, ...] = (),
    ) -> Handler:
        """Run the handler on a fresh TCP connection (ours is ``Handler.client``).

        Like tcpserver it gets the socket as fds 0 and 1 and ``TCPREMOTEIP``
        (unless ``remote_ip`` is None); ``inetd=True`` puts the socket on fd 2
        too and sets no TCPREMOTEIP, as inetd does. Its stderr otherwise
        appends to ``self.log``. ``salt``, ``fake_syslog``: see :meth:`argv`;
        ``wrap``: a command that runs it (``fiu-run -x ...``, ``setpriv ...``).
        """
        client, server = tcp_pair(listen_host, connect_host)
        extra = dict(env or {})
        if remote_ip is not None and not inetd:
            extra.setdefault("TCPREMOTEIP", remote_ip)
        with open(self.log, "ab") as log:
            argv = [*wrap, *self.argv(*args, salt=salt, fake_syslog=fake_syslog, cfg=cfg)]
            proc = subprocess.Popen(
                argv,
                stdin=server,
                stdout=server,
                stderr=server if inetd else log,
                env=self.env(extra),
            )
        server.close()
        self.procs.append(proc)
        return Handler(proc, client)

    def handle(
        self, secret: bytes | None = None, *, talk_kw: dict | None = None, **start_kw
    ) -> tuple[bytes, int]:
        """Start a handler, :func:`kit.wire.talk` to it; return (bytes received, exit status)."""
        h = self.start(**start_kw)
        got = h.talk(secret, **(talk_kw or {}))
        return got, h.wait()

    def check(self, *args: str, cfg: Path | None = None) -> subprocess.CompletedProcess:
        """Run ``ostiary-handle --check``; return the completed process (text output)."""
        return subprocess.run(
            self.argv("--check", *args, cfg=cfg),
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=30,
        )

    # -- looking --------------------------------------------------------------

    def lines(self, prog: str = "ostiary-handle") -> list[str]:
        """The log's lines written by ``prog`` (tcpserver's own are left out)."""
        return [
            x for x in self.log.read_text(errors="replace").splitlines() if x.startswith(prog + ":")
        ]

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
        return wait_for(
            lambda: len(self.runs(name)) >= count and self.runs(name),
            timeout,
            f"{count} run(s) of action {name}",
        )

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

    def cleanup(self) -> None:
        """Kill handlers we started that are still running; close the fake control FIFO."""
        if self.control >= 0:
            os.close(self.control)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def rig() -> Iterator[Rig]:
    """A fresh :class:`Rig` with its default config written."""
    r = Rig(Path(tempfile.mkdtemp(prefix="ostiary-test-", dir="/tmp")))
    r.write_config()
    try:
        yield r
    finally:
        r.cleanup()
        r.remove()


class Site(Scratch):
    """A :class:`Scratch` with line-recording actions (the lockout action's included).

    ``out`` is sticky and world-writable so actions running as nobody can record.
    """

    def __init__(self, actions: tuple[str, ...] = tuple(SECRETS)) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="ostiary-adv-", dir="/tmp")), 0o1777)
        self.actions = actions
        for name in (*actions, "lockout"):
            self.action(name)

    def action(self, name: str) -> Path:
        """Write recording action ``name`` (mode 755, root's when we are root)."""
        path = self.bin / name
        path.write_text(LINE_RECORDER.format(runs=self.out / f"{name}.runs"))
        path.chmod(0o755)
        return path

    def config(self, *lines: str, **settings: str) -> Path:
        """Write the config: KILL, one ACTION per action, LOCKOUT_ACTION, DEFAULTS, ``lines``."""
        text = [f'KILL="{ADV_KILL.decode()}"']
        text += [f'ACTION="{SECRETS[a].decode()}","{self.bin / a}"' for a in self.actions]
        text.append(f'LOCKOUT_ACTION="","{self.bin / "lockout"}"')
        text.append(f"LOCKOUT_DB={self.db}")
        text += [f"{k}={v}" for k, v in {**ADV_DEFAULTS, **settings}.items()]
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


NOW = int(time.time())


class StoreRig:
    """A config and its store directory, for tools run in-process (no actions, no log)."""

    def __init__(self, tmp_path: Path, extra: str = "") -> None:
        from ostiary_ucspi.config import load
        from ostiary_ucspi.store import Store

        self.state = tmp_path / "state"
        self.state.mkdir()
        self.db = str(self.state / "lockout.cdb")
        self.cfg_path = str(tmp_path / "ostiary.cfg")
        with open(self.cfg_path, "w") as f:
            f.write(
                f'KILL="kill-passphrase"\nACTION="open-passphrase","/bin/true"\n'
                f"LOCKOUT_DB={self.db}\n{extra}"
            )
        self.cfg = load(self.cfg_path)
        self.store = Store(self.db)

    def fails(self, ip: str, times: int, now: int = NOW) -> bytes:
        """Make ``times`` failed attempts from ``ip`` as handlers do; return its key."""
        from ostiary_ucspi.address import key as address_key
        from ostiary_ucspi.policy import charge, fail

        key = address_key(ip, self.cfg.ipv6_prefix)
        for _ in range(times):
            charge(self.store, key, self.cfg, now)
            fail(self.store, key, self.cfg, now)
        return key

    def refused(self, ip: str) -> str | None:
        """Why a handler would refuse ``ip`` now (None: it would serve it)."""
        from ostiary_ucspi.address import key as address_key
        from ostiary_ucspi.policy import refusal

        return refusal(
            self.store.view(), address_key(ip, self.cfg.ipv6_prefix), self.cfg.max_bad_conns
        )
