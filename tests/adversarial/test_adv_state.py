"""Adversarial: the state directory's owner plants traps for root.

ostiary-conf makes the state directory and the config the handler's account's
(here nobody's). That account, or an action running as it, can plant anything
there: a symbolic link (to a root-owned file, or dangling, at a path root
would create) under every name a writer uses, a hard link to a root-owned
file, a FIFO, a directory. Then root runs every writing command of
ostiary-lockout and a root handler serves a wrong and a right knock. Whatever
each does (it may well refuse), the victims outside the directory are
untouched: same bytes, owner and mode, and no file appears at a dangling
link's target. The config, being nobody's, cannot send root elsewhere either.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from kit.site import OPEN, Rig

from ostiary_ucspi.admin.lockout import PROG
from ostiary_ucspi.admin.lockout import main as lockout_main
from ostiary_ucspi.policy import Entry, stop
from ostiary_ucspi.store import Store

NOBODY = 65534
NAMES = (
    "lockout.cdb",
    "lockout.cdb.journal",
    "lockout.cdb.lock",
    "lockout.cdb.tmp",
    "lockout.cdb.journal.tmp",
)
TRICKS = ("symlink", "dangling symlink", "hard link", "fifo", "directory")
TOOL = {
    "lock": ["lock", "198.51.100.9"],
    "unlock": ["unlock", "192.0.2.7"],
    "prune": ["prune"],
    "revive": ["revive"],
    "reset": ["reset", "--force"],
}
PROGRAMS = (*TOOL, "handler, wrong answer", "handler, right answer")
SECRET = b"root's own file\n"


@pytest.fixture(autouse=True)
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the attack is on root")


def as_nobody(fn) -> None:
    """Run ``fn()`` in a child that has become nobody for good (the account planting)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


class Victims:
    """A root-owned directory with a root-owned file, and a path where nothing may appear."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "victims"
        self.dir.mkdir(mode=0o755)
        self.file = self.dir / "passwd"
        self.file.write_bytes(SECRET)
        self.file.chmod(0o644)
        self.absent = self.dir / "ld.so.preload"

    def untouched(self) -> None:
        st = os.stat(self.file)
        assert self.file.read_bytes() == SECRET
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
        assert sorted(os.listdir(self.dir)) == ["passwd"]


def nobodys(rig: Rig) -> None:
    """Deploy as ostiary-conf does for a non-root ACCOUNT: state and config are nobody's."""
    for p in (rig.state, *rig.state.iterdir(), rig.cfg):
        os.chown(p, NOBODY, NOBODY)


def seed(rig: Rig, stopped: bool) -> None:
    """A store with a record to unlock (and the stopped state, for revive)."""
    store = Store(str(rig.db))  # root writes it as the directory's owner
    with store.lock() as tx:
        tx.put(b"192.0.2.7", Entry(b"3 3 1 1").encode())
        if stopped:
            stop(tx, 1, "KILL from 192.0.2.1")


def plant(rig: Rig, victims: Victims, name: str, trick: str) -> None:
    """Put ``trick`` in the state directory under ``name``, as its owner would."""
    target = rig.state / name

    def clear() -> None:
        if target.exists() or target.is_symlink():
            target.unlink()

    as_nobody(clear)
    if trick == "hard link":  # nobody cannot make this one where fs.protected_hardlinks=1
        os.link(victims.file, target)
        return

    def make() -> None:
        if trick == "symlink":
            os.symlink(victims.file, target)
        elif trick == "dangling symlink":
            os.symlink(victims.absent, target)
        elif trick == "fifo":
            os.mkfifo(target, 0o600)
        else:
            os.mkdir(target, 0o700)

    as_nobody(make)


def run_program(rig: Rig, program: str, capsys) -> None:
    if program in TOOL:
        code = lockout_main([PROG, "-c", str(rig.cfg), *TOOL[program]])
        capsys.readouterr()
        assert code in (0, 111)
        return
    secret = OPEN if program.endswith("right answer") else b"wrong"
    got, code = rig.handle(secret)
    assert code in (0, 111), rig.log_text()


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("trick", TRICKS)
@pytest.mark.parametrize("name", NAMES)
def test_nothing_planted_in_the_state_directory_reaches_roots_files(
    rig, capsys, program, trick, name
):
    victims = Victims(rig.root)
    seed(rig, stopped=program == "revive")
    nobodys(rig)
    plant(rig, victims, name, trick)
    run_program(rig, program, capsys)
    victims.untouched()
    for entry in os.scandir(rig.state):  # whatever root created there is nobody's
        if not entry.is_symlink() and entry.inode() != os.stat(victims.file).st_ino:
            assert entry.stat(follow_symlinks=False).st_uid == NOBODY, entry.name


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_config_the_account_can_edit_cannot_send_root_elsewhere(rig, capsys, program):
    victims = Victims(rig.root)
    seed(rig, stopped=program == "revive")
    nobodys(rig)
    for db in (victims.file, victims.absent):
        rig.write_config(db=db)
        os.chown(rig.cfg, NOBODY, NOBODY)
        run_program(rig, program, capsys)
        victims.untouched()


@pytest.mark.parametrize("program", PROGRAMS)
def test_root_follows_no_link_on_the_way_to_the_state_directory(rig, capsys, program):
    victims = Victims(rig.root)
    (victims.dir / "lockout.cdb").write_bytes(SECRET)  # what a link would lead root to
    seed(rig, stopped=program == "revive")
    rig.write_config(db=rig.state / "sub" / "lockout.cdb")  # root's own config
    nobodys(rig)
    os.chown(rig.cfg, 0, 0)
    as_nobody(lambda: os.symlink(victims.dir, rig.state / "sub"))
    run_program(rig, program, capsys)
    assert (victims.dir / "lockout.cdb").read_bytes() == SECRET
    assert sorted(os.listdir(victims.dir)) == ["lockout.cdb", "passwd"]


def test_root_refuses_a_state_directory_others_may_write(rig, capsys):
    seed(rig, stopped=False)
    os.chmod(rig.state, 0o777)
    assert lockout_main([PROG, "-c", str(rig.cfg), "lock", "198.51.100.9"]) == 111
    assert (
        f"state directory {rig.state}: root will not work in it: others than its owner "
        f"may write it (mode 777): chmod go-w {rig.state}" in capsys.readouterr().err
    )
    got, code = rig.handle(OPEN)
    assert (got, code) == (b"", 111)
    assert rig.runs("open") == []
