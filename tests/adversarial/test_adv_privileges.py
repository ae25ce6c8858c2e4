"""Adversarial: who an action runs as, and which files root refuses to run.

Needs root (CI runs as root; on a laptop these skip, and fail under CI=true).
The server runs with supplementary groups of its own, so an action that kept
them would show it. Each identity action records its /proc status: real,
effective, saved and filesystem ids, and its supplementary groups.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import IN_CI, project_tool
from kit.procs import wait_for, wait_quiet
from kit.servers import Server
from kit.site import Site
from kit.wire import SALT_LEN, connect, read_to_eof, recv_exact, response

from adversarial.adv_tally import figure

NOBODY, NOGROUP = 65534, 65534
IDS = """#!/bin/sh
# Records who it runs as: /proc status Uid, Gid, Groups lines (of this shell: the action).
grep -E '^(Uid|Gid|Groups):' /proc/$$/status > '{out}/{name}.ids'
"""


@pytest.fixture(scope="module", autouse=True)
def need_root():
    if os.geteuid() != 0:
        msg = "privilege tests need root"
        if IN_CI:
            pytest.fail(msg + "; CI runs as root")
        pytest.skip(msg)


def script(path: Path, out: Path, name: str, owner: int = 0, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(IDS.format(out=out, name=name))
    os.chown(path, owner, 0)
    path.chmod(mode)
    return path


def directory(path: Path, owner: int = 0, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, owner, 0)
    path.chmod(mode)
    return path


def ids(out: Path, name: str) -> dict[str, list[int]]:
    text = (out / f"{name}.ids").read_text()
    return {
        k: [int(x) for x in v.split()] for k, _, v in (x.partition(":") for x in text.splitlines())
    }


class Case:
    """One ACTION: its passphrase, its script, and who it should run as (None: refused)."""

    def __init__(
        self,
        name: str,
        path: Path,
        ids: str = "",
        runs_as: tuple[int, int] | None = None,
        why: str = "",
    ) -> None:
        self.name, self.path, self.ids, self.runs_as, self.why = name, path, ids, runs_as, why
        self.secret = f"priv-{name}-passphrase".encode()


@pytest.fixture(scope="module")
def world():
    site = Site(actions=())
    r, out = site.root, site.out
    safe = directory(r / "safe")
    nobody_dir = directory(r / "nobody-dir", owner=NOBODY)
    group_dir = directory(r / "group-writable-dir", mode=0o775)
    nobody_top = directory(r / "nobody-top", owner=NOBODY)
    directory(nobody_top / "sub")
    script(nobody_dir / "target", out, "via-link")
    os.symlink(nobody_dir / "target", safe / "link-to-nobody-dir")
    os.symlink(nobody_top / "sub", r / "dir-link")
    cases = [
        Case("numeric", script(safe / "numeric", out, "numeric"), ",12345,23456", (12345, 23456)),
        Case("named", script(safe / "named", out, "named"), ',nobody,"nogroup"', (NOBODY, NOGROUP)),
        Case("default", script(safe / "default", out, "default"), "", (4242, 4343)),
        Case("as-root", script(safe / "as-root", out, "as-root"), ",0,0", (0, 0)),
        Case(
            "owned-by-nobody",
            script(safe / "owned-by-nobody", out, "owned-by-nobody", owner=NOBODY),
            ",0,0",
            why="owned-by-nobody is writable by someone other than root",
        ),
        Case(
            "group-writable",
            script(safe / "group-writable", out, "group-writable", mode=0o775),
            ",0,0",
            why="group-writable is writable by someone other than root",
        ),
        Case(
            "world-writable",
            script(safe / "world-writable", out, "world-writable", mode=0o757),
            ",12345,23456",
            why="world-writable is world-writable",
        ),
        Case(
            "in-nobody-dir",
            script(nobody_dir / "in-nobody-dir", out, "in-nobody-dir"),
            ",0,0",
            why="nobody-dir is writable by someone other than root",
        ),
        Case(
            "in-group-dir",
            script(group_dir / "in-group-dir", out, "in-group-dir"),
            ",0,0",
            why="group-writable-dir is writable by someone other than root",
        ),
        Case(
            "under-nobody-top",
            script(nobody_top / "sub" / "under-nobody-top", out, "under-nobody-top"),
            ",0,0",
            why="nobody-top is writable by someone other than root",
        ),
        Case(
            "via-link",
            safe / "link-to-nobody-dir",
            ",0,0",
            why="nobody-dir is writable by someone other than root",
        ),
        Case(
            "via-dir-link",
            r / "dir-link" / "under-nobody-top",
            ",0,0",
            why="nobody-top is writable by someone other than root",
        ),
    ]
    lines = [f'ACTION="{c.secret.decode()}","{c.path}"{c.ids}' for c in cases]
    site.config(*lines, "DEFAULT_UID=4242", "DEFAULT_GID=4343")
    yield site, cases
    site.remove()


def knock(port: int, ip: str, secret: bytes) -> bytes:
    with connect(port, ip) as sock:
        salt = recv_exact(sock, SALT_LEN)
        sock.sendall(response(secret, salt))
        sock.shutdown(socket.SHUT_WR)
        return salt + read_to_eof(sock)


def test_actions_run_as_configured_and_unsafe_root_actions_are_refused(world, pytestconfig, tally):
    site, cases = world
    with Server(site, tally=tally, extra_groups=[4, 24, 27, 100]) as srv:
        for n, c in enumerate(cases, 1):
            assert len(knock(srv.port, f"127.60.0.{n}", c.secret)) == SALT_LEN
        for n, c in enumerate(cases, 1):
            ip = f"127.60.0.{n}"
            if c.runs_as is None:
                line = wait_for(
                    lambda: [x for x in srv.handler_lines(ip) if " refused: " in x],
                    10,
                    f"{c.name} to be refused",
                )
                assert len(line) == 1 and line[0].startswith("ostiary-handle: error: ")
                assert c.why in line[0], (c.why, line[0])
            else:
                wait_for(
                    lambda: (
                        (site.out / f"{c.name}.ids").exists()
                        and (site.out / f"{c.name}.ids").read_text().count("\n") == 3
                    ),
                    10,
                    f"{c.name} to record its ids",
                )
        wait_quiet(site.cfg)
    for c in cases:
        if c.runs_as is None:
            assert not (site.out / f"{c.name}.ids").exists(), c.name
            continue
        got = ids(site.out, c.name)
        uid, gid = c.runs_as
        assert got["Uid"] == [uid] * 4, (c.name, got)  # real, effective, saved, filesystem
        assert got["Gid"] == [gid] * 4, (c.name, got)
        assert got["Groups"] == [], (c.name, got)
    refused = sum(c.runs_as is None for c in cases)
    figure(
        pytestconfig,
        f"privileges: {len(cases) - refused} actions ran with exactly their uid/gid "
        f"and no groups, {refused} unsafe root actions refused",
    )


def test_check_reports_every_unsafe_action(world):
    site, cases = world
    proc = subprocess.run(
        [project_tool("ostiary-handle"), "--check", "-c", str(site.cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 111
    text = site.cfg.read_text().splitlines()
    for c in cases:
        line = next(i for i, x in enumerate(text, 1) if c.secret.decode() in x)
        hits = [
            x
            for x in proc.stderr.splitlines()
            if x.startswith(f"ostiary-handle: fatal: {site.cfg}:{line}: ")
        ]  # as given
        assert len(hits) == (c.runs_as is None), (c.name, proc.stderr)
        assert all(c.why in x for x in hits), (c.name, hits)
