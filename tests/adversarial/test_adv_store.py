"""Adversarial: broken lockout store files.

For every way a store file can be broken (truncated, garbage, zero-length,
not a regular file, wrong owner, unreadable) the handler fails closed: the
client gets nothing (not even a salt), the handler exits 111 within a second
or two, and it logs exactly one alert or fatal line naming the file. The
operator's tool, ``ostiary-lockout list``, exits 111 and says on one line which
file is wrong and how. Random damage (hypothesis) never yields a traceback, a
hang, or an action for a wrong answer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import IN_CI, project_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.damage import BROKEN_FILES as DAMAGE
from kit.procs import wait_quiet
from kit.servers import TRACEBACK
from kit.site import SECRETS, Site
from kit.wire import SALT_LEN, read_to_eof, response

from ostiary_ucspi.policy import ERRORS, Entry
from ostiary_ucspi.store import Store

NOBODY = 65534


def seed(site: Site) -> None:
    """A store with a snapshot of a few records and a journal with one more."""
    now = int(time.time())
    store = Store(str(site.db))
    with store.lock() as tx:
        for i in range(1, 40):
            tx.put(f"10.0.0.{i}".encode(), Entry(b"1 1 0 %d" % now).encode())
        tx.put(b"10.9.9.9", Entry(b"3 3 %d %d" % (now, now)).encode())
        tx.put(ERRORS, b"42")
    store.compact()
    with store.lock() as tx:
        tx.put(b"10.0.0.77", Entry(b"2 2 0 %d" % now).encode())


def journal(site: Site) -> Path:
    return site.journal()


def counting(site: Site, tally) -> Site:
    """Give ``site`` this module's figures (``site.TALLY``) and the run's totals (``site.TOTALS``)."""
    site.TALLY = tally.section(
        "store damage",
        cases=0,
        **{"handler runs": 0, "tool runs": 0},
        crashes=0,
        salts=0,
        refused=0,
        render=lambda t: (
            f"store damage: {t['cases']} damaged stores ({t['refused']} of 40 "
            f"random ones refused, the rest harmless), {t['handler runs']} handler runs, "
            f"{t['tool runs']} tool runs, {t['crashes']} crashes"
        ),
    )
    site.TOTALS = tally.totals
    return site


def case(site: Site) -> None:
    """Count one damaged store, an input of the run."""
    site.TALLY["cases"] += 1
    site.TOTALS["inputs"] += 1


# The interpreter lives under /root (mode 700) here, so a program cannot simply be exec'd as
# nobody: it starts as root, imports everything it will need, then drops to the user given
# as its first argument for good, as `tcpserver -u` would have done before it started.
AS_USER = """
import grp, hashlib, hmac, ipaddress, json, os, pwd, select, sys, syslog, _signal, _socket
import ostiary_ucspi.{module} as m
from ostiary_ucspi import actions, address, check, config, cpython, log, policy, protocol, store
uid = int(sys.argv.pop(1))
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
sys.exit(m.main(sys.argv))
"""


def command(module: str, user: int | None, *args: str) -> list[str]:
    """Run ``ostiary_ucspi.module.main`` as ``user`` (None: as we are)."""
    return [
        sys.executable,
        "-c",
        AS_USER.format(module=module),
        str(-1 if user is None else user),
        *args,
    ]


def handle(site: Site, user: int | None = None) -> tuple[bytes, int, list[str], float]:
    """One connection to the handler (as ``user``): (bytes the client got, exit, log lines, seconds).

    If a salt comes, the client answers right: a handler that failed open would run the action.
    """
    TALLY, TOTALS = site.TALLY, site.TOTALS
    TALLY["handler runs"] += 1
    TOTALS["connections"] += 1
    ours, theirs = socket.socketpair()
    t0 = time.monotonic()
    with ours, theirs:
        argv = (
            [project_tool("ostiary-handle"), "-c", str(site.cfg)]
            if user is None
            else command("handle", user, "-c", str(site.cfg))
        )
        proc = subprocess.Popen(
            argv,
            stdin=theirs,
            stdout=theirs,
            stderr=subprocess.PIPE,
            env={"PATH": os.environ["PATH"], "TCPREMOTEIP": "127.0.0.1"},
        )
        theirs.close()
        ours.settimeout(5)
        got = b""
        try:
            while len(got) < SALT_LEN:
                chunk = ours.recv(SALT_LEN - len(got))
                if not chunk:
                    break
                got += chunk
            if len(got) == SALT_LEN:
                TALLY["salts"] += 1
                ours.sendall(response(SECRETS["open"], got))
            ours.shutdown(socket.SHUT_WR)
            got += read_to_eof(ours)
        except (TimeoutError, OSError):
            pass
        try:
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            TALLY["crashes"] += 1
            TOTALS["crashes"] += 1
            pytest.fail("the handler hung on a broken store")
    lines = err.decode(errors="replace").splitlines()
    if proc.returncode not in (0, 111) or any(TRACEBACK.search(x) for x in lines):
        TALLY["crashes"] += 1
        TOTALS["crashes"] += 1
    return got, proc.returncode, lines, time.monotonic() - t0


def tool(site: Site, user: int | None = None) -> subprocess.CompletedProcess:
    """``ostiary-lockout -c CFG list`` (as ``user``)."""
    TALLY, TOTALS = site.TALLY, site.TOTALS
    TALLY["tool runs"] += 1
    argv = (
        [project_tool("ostiary-lockout"), "-c", str(site.cfg), "list"]
        if user is None
        else command("admin.lockout", user, "-c", str(site.cfg), "list")
    )
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]}
    )
    if "Traceback" in proc.stderr:
        TALLY["crashes"] += 1
        TOTALS["crashes"] += 1
    return proc


def fails_closed(site: Site, user: int | None = None, *names: str) -> list[str]:
    """Assert the handler failed closed on the broken store; return its one complaint."""
    got, rc, lines, took = handle(site, user)
    assert (got, rc) == (b"", 111), lines
    assert took < 5
    bad = [x for x in lines if x.startswith(("ostiary-handle: alert: ", "ostiary-handle: fatal: "))]
    assert len(bad) == 1 and not any(TRACEBACK.search(x) for x in lines), lines
    assert any(n in bad[0] for n in names), (names, bad[0])
    return bad[0]


def tool_says(site: Site, user: int | None, *what: str) -> str:
    """Assert the operator's tool exits 111 with one line naming the file and the problem."""
    proc = tool(site, user)
    assert proc.returncode == 111, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ostiary-lockout: fatal: "), proc.stderr
    assert all(w in lines[0] for w in what), (what, lines[0])
    return lines[0]


@pytest.fixture
def site(tally):
    s = counting(Site(), tally)
    s.config(COMM_TIMEOUT="1")
    seed(s)
    yield s
    s.remove()


@pytest.mark.parametrize("how", DAMAGE)
def test_a_broken_store_file_fails_closed_and_the_tool_says_which(site, how):
    """The complaint names the file (``PATH: reason``), handler and tool alike."""
    case(site)
    which, damage = DAMAGE[how]
    path = site.db if which == "cdb" else journal(site)
    damage(path)
    fails_closed(site, None, f"{path}: ")
    tool_says(site, None, f"{path}: ")
    wait_quiet(site.cfg)
    assert site.runs("open") == []


@pytest.fixture
def nobody_site(site):
    """The recommended deployment: the handler runs as its own user (here nobody), who owns the state."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("CI runs as root")
        pytest.skip("needs root to switch to nobody")
    for p in (site.state, *site.state.iterdir(), site.cfg):
        os.chown(p, NOBODY, NOBODY)
    got, rc, lines, _ = handle(site, NOBODY)  # the control: nobody can use its store
    assert len(got) == SALT_LEN and rc == 0, lines
    return site


def test_a_store_file_of_the_wrong_owner_fails_closed(nobody_site):
    site = nobody_site
    case(site)
    os.chown(site.db, 0, 0)  # e.g. copied back in by root from a backup
    site.db.chmod(0o640)
    fails_closed(site, NOBODY, f"unable to read {site.db}: Permission denied")
    for user in (NOBODY, None):  # the operator may run the tool as the handler's user, or as root
        tool_says(site, user, f"{site.db}: ", "owner")


def test_an_unreadable_store_file_fails_closed(nobody_site):
    site = nobody_site
    case(site)
    journal(site).chmod(0)
    fails_closed(site, NOBODY, f"{journal(site)}: Permission denied")
    tool_says(site, NOBODY, f"{journal(site)}: Permission denied")
    tool_says(site, None, f"{journal(site)}: ")  # root can read it, and still names it


def test_an_unwritable_state_directory_fails_closed(nobody_site):
    site = nobody_site
    case(site)
    os.chown(site.state, 0, 0)
    fails_closed(site, NOBODY, f"state directory {site.state}: Permission denied")
    # the config is nobody's, the directory root's: root will not write where nobody points it
    tool_says(site, None, f"state directory {site.state}: root will not work in it")


# -- random damage ------------------------------------------------------------------

edits = st.lists(
    st.tuples(
        st.sampled_from(("cdb", "journal")),
        st.sampled_from(("flip", "truncate", "garbage", "append", "zero")),
        st.integers(0, 1 << 16),
        st.binary(min_size=1, max_size=64),
    ),
    min_size=1,
    max_size=3,
)


@pytest.fixture(scope="module")
def fuzz_site(tally):
    s = counting(Site(), tally)
    s.config(COMM_TIMEOUT="1")
    yield s
    s.remove()


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(edits)
def test_random_store_damage_never_crashes_or_fails_open(fuzz_site, edits):
    """Random damage: the handler fails closed or still works; never a traceback or a hang."""
    site = fuzz_site
    for p in site.state.iterdir():
        p.unlink()
    seed(site)
    for which, op, at, data in edits:
        p = site.db if which == "cdb" else journal(site)
        raw = bytearray(p.read_bytes())
        i = at % (len(raw) + 1)
        if op == "flip" and raw:
            raw[i % len(raw)] ^= data[0] or 1
        elif op == "truncate":
            raw = raw[:i]
        elif op == "garbage":
            raw[i : i + len(data)] = data
        elif op == "append":
            raw += data
        elif op == "zero":
            raw = bytearray()
        p.write_bytes(bytes(raw))
    got, rc, lines, took = handle(site)
    assert not any(TRACEBACK.search(x) for x in lines), lines
    assert took < 5
    if rc == 111:
        site.TALLY["refused"] += 1
        assert got == b""
        bad = [
            x for x in lines if x.startswith(("ostiary-handle: alert: ", "ostiary-handle: fatal: "))
        ]
        assert len(bad) == 1 and "lockout.cdb" in bad[0], lines
        proc = tool(site)
        assert proc.returncode == 111 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("ostiary-lockout: fatal: ") and proc.stderr.count("\n") == 1
    else:
        assert rc == 0 and len(got) == SALT_LEN, lines  # damage the store's checks cannot see
    case(site)
