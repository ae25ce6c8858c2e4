"""Adversarial: system calls of the real handler fail, and it fails closed.

libfiu's POSIX preload (``fiu-run -x``) makes the C library's ``write``,
``fdatasync`` and ``fork`` fail with the errno we choose; libfiu has no
``setuid`` wrapper, so for that the handler runs without CAP_SETUID
(``setpriv``) and the kernel itself says EPERM. Every case ends the same
way: one log line says what failed (beside the notice that an action is
starting), the client gets the 32-byte salt or nothing, no action runs on a
store that could not record, the address keeps no charge it did not earn,
and the next connection is served as usual.

Which call fails: the journal's ``write`` is the handler's first (the store
exists beforehand), so failing it once (``onetime``) spares the salt's;
``fdatasync`` only the store calls; the refund, or the lock, written after
the salt is failed by ``fiu-ctrl`` while the handler waits for the response.
libfiu cannot fail only a function's second call, so strace fails the
salt's ``write``."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from conftest import IN_CI, require_tool
from kit.servers import TRACEBACK
from kit.site import OPEN, Rig
from kit.wire import SALT_LEN, response

from ostiary_ucspi.store import Store

WRITE = "posix/io/rw/write"
FDATASYNC = "posix/io/sync/fdatasync"
FORK = "posix/proc/fork"
STORE_ERRORS = [errno.ENOSPC, errno.EIO]


def fiu(rig: Rig, *commands: str) -> tuple[str, ...]:
    """``fiu-run -x`` running ``commands``, its control FIFOs in the rig's directory.

    The handler writes no bytecode cache: that would be a write before the journal's.
    """
    run = require_tool("fiu-run")
    fifos = str(rig.root / "fiu")
    commands = tuple(a for c in commands for a in ("-c", c))
    return ("/usr/bin/env", "PYTHONDONTWRITEBYTECODE=1", run, "-x", "-f", fifos, *commands)


def enable(name: str, err: int, once: bool = False) -> str:
    """libfiu's command failing ``name`` with ``err`` (``once``: the next call only)."""
    return f"enable name={name},failinfo={err}" + (",onetime=1" if once else "")


def existing_store(rig: Rig) -> None:
    """Create the rig's store, so a charge's first write is the journal's append."""
    with Store(str(rig.db)).lock():
        pass


def only_line(rig: Rig, *words: str) -> str:
    """The handler's one log line; it holds ``words``."""
    lines = rig.lines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert not TRACEBACK.search(rig.log_text()), rig.log_text()
    return lines[0]


def serves_on(rig: Rig, errors: int = 0) -> None:
    """A normal knock gets its salt and its action; the address keeps ``errors`` errors."""
    got, code = rig.handle(OPEN)
    assert len(got) == SALT_LEN and code == 0
    assert rig.wait_runs("open") == ["127.0.0.1"]
    entry = rig.entry()
    assert (entry.strikes, entry.errors, entry.locked_since) == (0, errors, 0)


@pytest.mark.parametrize("err", STORE_ERRORS, ids=errno.errorcode.get)
def test_a_journal_write_that_fails_sends_no_salt_and_charges_nothing(rig: Rig, err: int):
    existing_store(rig)
    got, code = rig.handle(OPEN, wrap=fiu(rig, enable(WRITE, err, once=True)))
    assert (got, code) == (b"", 111)
    only_line(rig, "fatal: 127.0.0.1 refused: lockout store: unable to append", os.strerror(err))
    assert rig.view().get(b"127.0.0.1") is None and rig.runs("open") == []
    serves_on(rig)


@pytest.mark.parametrize("err", STORE_ERRORS, ids=errno.errorcode.get)
def test_a_journal_sync_that_fails_sends_no_salt_and_charges_nothing(rig: Rig, err: int):
    existing_store(rig)
    got, code = rig.handle(OPEN, wrap=fiu(rig, enable(FDATASYNC, err)))
    assert (got, code) == (b"", 111)
    only_line(rig, "fatal: 127.0.0.1 refused: lockout store: unable to append", os.strerror(err))
    assert rig.view().get(b"127.0.0.1") is None and rig.runs("open") == []
    serves_on(rig)


def test_a_salt_that_cannot_be_sent_charges_nothing(rig: Rig):
    # libfiu counts no calls: strace fails the second write, the salt's (the first is the charge's)
    existing_store(rig)
    strace = require_tool("strace")
    second_write = (strace, "-qq", "-o", "/dev/null", "-e", "inject=write:error=EPIPE:when=2")
    got, code = rig.handle(OPEN, wrap=(*second_write, "/usr/bin/env", "PYTHONDONTWRITEBYTECODE=1"))
    assert (got, code) == (b"", 0)
    only_line(rig, "info: 127.0.0.1 closed: unable to send the salt:", os.strerror(errno.EPIPE))
    assert rig.view().get(b"127.0.0.1") is None and rig.runs("open") == []
    serves_on(rig)


def next_write_fails_after_the_salt(rig: Rig, secret: bytes) -> None:
    """Knock with ``secret``, the handler's next ``write`` failing (EIO) once the salt is sent.

    The handler fails closed: it exits 111 after one fatal line and the charge stands.
    """
    existing_store(rig)
    fiu_ctrl = require_tool("fiu-ctrl")
    h = rig.start(wrap=fiu(rig))

    def fail_the_next_write(salt: bytes) -> bytes:  # the handler waits for the response
        subprocess.run(
            [fiu_ctrl, "-f", str(rig.root / "fiu"), "-c", enable(WRITE, errno.EIO, once=True)]
            + [str(h.proc.pid)],
            check=True,
            timeout=10,
        )
        return response(secret, salt)

    assert len(h.talk(answer=fail_the_next_write)) == SALT_LEN
    assert h.wait() == 111
    only_line(
        rig, "fatal: 127.0.0.1 refused: lockout store: unable to append", os.strerror(errno.EIO)
    )
    entry = rig.entry()
    assert (entry.strikes, entry.errors, entry.locked_since) == (1, 1, 0)


def test_a_refund_that_cannot_be_written_starts_no_action(rig: Rig):
    next_write_fails_after_the_salt(rig, OPEN)
    assert rig.runs("open") == []  # the refund is lost with the action: a false negative
    serves_on(rig, errors=1)  # the next success clears the strike, refunds only its own error


def test_a_lock_that_cannot_be_written_still_locks_out(rig: Rig):
    rig.write_config(MAX_BAD_CONNS="1")
    next_write_fails_after_the_salt(rig, b"wrong")
    assert rig.handle(OPEN) == (b"", 0)  # the charge alone reaches MAX_BAD_CONNS
    assert rig.lines()[1] == "ostiary-handle: info: 127.0.0.1 closed at once: locked out"
    assert rig.runs("open") == []


def test_a_fork_that_fails_starts_no_action_and_charges_nothing(rig: Rig):
    existing_store(rig)
    got, code = rig.handle(OPEN, wrap=fiu(rig, enable(FORK, errno.EAGAIN)))
    assert len(got) == SALT_LEN and code == 0
    only_line(
        rig,
        f"error: 127.0.0.1 action 1 {rig.bin}/open not started: unable to fork:",
        os.strerror(errno.EAGAIN),
    )
    assert rig.runs("open") == [] and not (rig.out / "open.argv").exists()
    assert rig.view().get(b"127.0.0.1") is None
    serves_on(rig)


def test_a_setuid_that_fails_runs_no_action(rig: Rig):
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("CI runs as root")
        pytest.skip("needs root: only root switches an action's ids")
    setpriv = require_tool("setpriv")
    without_setuid = (setpriv, "--inh-caps=-setuid", "--bounding-set=-setuid")
    rig.write_config("DEFAULT_UID=2345", "DEFAULT_GID=5432")
    existing_store(rig)
    got, code = rig.handle(OPEN, wrap=without_setuid)
    assert len(got) == SALT_LEN and code == 0
    failed = rig.wait_log("not started")
    assert failed == [
        f"ostiary-handle: error: 127.0.0.1 action 1 {rig.bin}/open not started: "
        f"unable to switch to uid 2345 gid 5432: {os.strerror(errno.EPERM)}"
    ]
    assert [x for x in rig.lines() if x not in failed] == [
        f"ostiary-handle: notice: 127.0.0.1 action 1 {rig.bin}/open starting as uid 2345 gid 5432"
    ]
    assert not TRACEBACK.search(rig.log_text())
    assert rig.runs("open") == [] and not (rig.out / "open.argv").exists()
    assert rig.view().get(b"127.0.0.1") is None
    serves_on(rig)
