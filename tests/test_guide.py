"""The deployment guide on a real box: the four places it broke (issue 16, section 4)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import project_tool, require_tool
from kit.servers import unused_port

from ostiary_ucspi import supervise

IS_ROOT = os.geteuid() == 0
ME = pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture
def base():
    """A directory another account can reach (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="ostiary-guide-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# Run as another account by dropping root inside this interpreter once the
# program's modules are loaded: the interpreter itself may be out of that
# account's reach (pyenv under /root).
AS_USER = """
import os, sys, importlib
module = importlib.import_module(sys.argv[1])
import ostiary_ucspi.check, grp, pwd, select, array, mmap, cdblib  # what the store loads when it needs
pw = pwd.getpwnam(sys.argv[2])
os.setgroups([]); os.setgid(pw.pw_gid); os.setuid(pw.pw_uid)
sys.argv = sys.argv[3:]
sys.exit(module.main())
"""


def run_as(module: str, user: str | None, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``module.main(argv)``, as ``user`` (root only) or, for None, as the installed program."""
    if user is None:
        cmd = [project_tool(argv[0]), *argv[1:]]
    else:
        cmd = [sys.executable, "-c", AS_USER, module, user, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def conf(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    """Run ostiary-conf, as ``user`` when given (root only)."""
    return run_as("ostiary_ucspi.admin.conf", user, ["ostiary-conf", *args])


def check(cfg: Path, user: str | None = None) -> subprocess.CompletedProcess:
    """Run ``ostiary-handle --check -c cfg``, as ``user`` when given (root only)."""
    return run_as("ostiary_ucspi.handle", user, ["ostiary-handle", "--check", "-c", str(cfg)])


# ------------------------------------------------ run backs off an unbindable address


def test_run_backs_off_when_the_address_cannot_be_bound(base):
    """192.0.2.1 (the guide's own example) cannot be bound here: one short line every 5 s."""
    require_tool("supervise")
    target = base / "svc"
    r = conf(ME, ME, str(target), str(base / "ostiary.cfg"), "192.0.2.1", str(unused_port()))
    assert r.returncode == 0, r.stderr
    out = base / "out"
    with open(out, "wb") as sink:
        sup = subprocess.Popen(
            ["supervise", str(target)], stdout=sink, stderr=sink, start_new_session=True
        )
    try:
        time.sleep(7)  # without the back-off: seven restarts
    finally:
        os.killpg(sup.pid, signal.SIGKILL)
        sup.wait()
    lines = out.read_text().splitlines()
    fatal = [line for line in lines if "unable to bind 192.0.2.1:" in line]
    assert 1 <= len(fatal) <= 2, lines
    assert fatal[0].startswith("run: fatal: unable to bind 192.0.2.1:")
    assert fatal[0].endswith("not serving (next try in 5 seconds)")
    assert not [line for line in lines if line.startswith(("config ", "lockout store", "ok"))]


# ------------------------------------------ --check opens the store as the account


def store_config(base: Path, owner: str) -> tuple[Path, Path]:
    """Write a valid config (owned by ``owner``) whose store is base/state."""
    state = base / "state"
    state.mkdir(mode=0o700)
    cfg = base / "ostiary.cfg"
    cfg.write_text(
        'KILL="kill-passphrase-long"\nACTION="action-passphrase-1","/bin/true"\n'
        f'LOCKOUT_DB="{state}/lockout.cdb"\n'
    )
    cfg.chmod(0o600)
    pw = pwd.getpwnam(owner)
    os.chown(cfg, pw.pw_uid, pw.pw_gid)
    return cfg, state


def test_check_fails_when_the_account_cannot_use_the_store(base):
    if IS_ROOT:
        user = "nobody"
        cfg, state = store_config(base, user)  # state stays root's: nobody cannot write it
        r = check(cfg, user)
    else:
        user = None
        cfg, state = store_config(base, ME)
        state.chmod(0o500)
        r = check(cfg)
    assert r.returncode == 111, r.stdout
    # nobody cannot enter root's directory; we (not root) can, but not write in it
    where = f"state directory {state}" if IS_ROOT else f"{state}/lockout.cdb.lock"
    assert f"ostiary-handle: fatal: lockout store: unable to open {where}: Permission denied" in (
        r.stderr
    )
    assert "ok" not in r.stdout.split()
    # Once the account owns its state directory the same check passes.
    if IS_ROOT:
        pw = pwd.getpwnam(user)
        os.chown(state, pw.pw_uid, pw.pw_gid)
    else:
        state.chmod(0o700)
    r = check(cfg, user)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("ok\n")


def test_check_fails_on_a_store_file_the_account_cannot_write(base):
    """A journal root restored (root's), or one the account may read but not write."""
    if not IS_ROOT:
        pytest.skip("needs root: the file must belong to another account")
    cfg, state = store_config(base, "nobody")
    os.chown(state, pwd.getpwnam("nobody").pw_uid, -1)
    assert check(cfg, "nobody").returncode == 0  # creates the lock and the snapshot
    journal = state / "lockout.cdb.journal"
    if not journal.exists():
        pytest.fail(f"the store has no journal file: {sorted(os.listdir(state))}")
    os.chown(journal, 0, 0)
    r = check(cfg, "nobody")
    assert r.returncode == 111
    assert f"lockout store: unable to read {journal}: Permission denied" in r.stderr
    # Readable but not writable: a connection could look, and not charge.
    os.chown(journal, pwd.getpwnam("nobody").pw_uid, -1)
    journal.chmod(0o400)
    r = check(cfg, "nobody")
    assert r.returncode == 111
    assert f"lockout store: unable to open {journal}: Permission denied" in r.stderr


# ------------------------------------------------- revive's advice fits the machine


def machine(root: Path, files: dict[str, str]) -> None:
    """Lay out ``files`` (relative path: text) under ``root``."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    "layout, expected, absent",
    [
        (
            {
                "etc/service/ostiary/env/CONFIG": "/etc/ostiary.cfg\n# comment\n",
                "etc/service/other/env/CONFIG": "/etc/other.cfg\n",
            },
            [
                "{root}/etc/service/ostiary was also taken down; bring it up: "
                "rm {root}/etc/service/ostiary/down; svc -u {root}/etc/service/ostiary"
            ],
            ["other", "SERVICEDIR", "systemd"],
        ),
        (
            {"lib/systemd/system/ostiary.socket": "[Socket]\n"},
            [
                "systemd: ostiary.socket kept accepting; serving again now "
                "(if you stopped it: systemctl start ostiary.socket)"
            ],
            ["SERVICEDIR", "svc -u"],
        ),
        (
            {"etc/xinetd.d/ostiary": "service ostiary\n"},
            ["xinetd: it kept accepting; serving again now"],
            ["SERVICEDIR", "systemd"],
        ),
        (
            {"etc/inetd.conf": "#7050 stream tcp nowait root /usr/bin/ostiary-handle x\n"},
            ["rm SERVICEDIR/down; svc -u SERVICEDIR", "under inetd, xinetd or systemd"],
            ["inetd: it"],
        ),
        (
            {"etc/inetd.conf": "7050 stream tcp nowait root /usr/bin/ostiary-handle x\n"},
            ["inetd: it kept accepting; serving again now"],
            ["SERVICEDIR"],
        ),
    ],
)
def test_revive_advice_names_what_runs_the_handler(tmp_path, monkeypatch, layout, expected, absent):
    monkeypatch.delenv(supervise.ENV, raising=False)
    monkeypatch.setattr(supervise, "ROOT", str(tmp_path))
    machine(tmp_path, layout)
    monkeypatch.chdir(tmp_path)
    advice = supervise.bring_up_advice("/etc/ostiary.cfg")
    for text in expected:
        assert text.format(root=tmp_path) in advice
    for text in absent:
        assert text not in advice


# ----------------------------------------- ostiary-conf refuses before creating anything


def test_conf_without_root_for_other_accounts_creates_nothing(base):
    target, cfg = base / "svc", base / "ostiary.cfg"
    if IS_ROOT:
        base.chmod(0o777)  # nobody could create it: only the refusal stops it
        r = conf("root", "root", str(target), str(cfg), user="nobody")
    else:
        r = conf("root", ME, str(target), str(cfg))
    assert r.returncode == 111
    assert (
        r.stderr
        == "ostiary-conf: fatal: must be run as root to give files to root: nothing created\n"
    )
    assert not target.exists() and not cfg.exists()
