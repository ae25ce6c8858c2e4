"""Actions: argv, environment, ids, stdin, output, detachment, undo, refusals."""

from __future__ import annotations

import errno
import os
import pwd
import signal
import time

import pytest
from kit.procs import wait_for, wait_quiet
from kit.servers import TcpServer
from kit.site import OPEN, Rig
from kit.wire import SALT_LEN

ROOT_ONLY = pytest.mark.skipif(os.getuid() != 0, reason="only root can switch users")


def stop_action(rig: Rig, name: str) -> None:
    """End a still-running action and its runner (their own session, which our handler began)."""
    pid = rig.record(name)["pid"]
    try:
        os.killpg(os.getpgid(pid), signal.SIGTERM)
    except ProcessLookupError:
        pass


def test_argv_environment_stdin_and_descriptors(rig: Rig):
    with TcpServer(rig, env={"SECRET_LOOKING_VAR": "x", "LD_PRELOAD": "/nonexistent.so"}) as srv:
        assert len(srv.knock(OPEN)) == SALT_LEN
        rig.wait_runs("open")
    rec = rig.record("open")
    assert rec["argv"] == [str(rig.bin / "open").encode(), b"127.0.0.1"]
    assert set(rec["env"]) == {"PATH"}, rec["env"]  # no TCP*, no PROTO, nothing inherited
    dirs = rec["env"]["PATH"].split(":")
    assert dirs and all(d.startswith("/") for d in dirs)
    assert rec["stdin"] == "/dev/null"
    assert "socket:" not in rec["fds"]  # the client's connection is not passed on
    assert rec["sigign"] == 0  # Python ignores SIGPIPE and SIGXFSZ; actions must not


@ROOT_ONLY
def test_default_ids_are_nobody_without_supplementary_groups(rig: Rig):
    nobody = pwd.getpwnam("nobody")
    rig.handle(OPEN)
    rig.wait_runs("open")
    rec = rig.record("open")
    assert rec["uid"] == [nobody.pw_uid] * 4
    assert rec["gid"] == [nobody.pw_gid] * 4
    assert rec["groups"] == []


@ROOT_ONLY
@pytest.mark.parametrize(
    "ids, defaults, uid, gid",
    [
        (",1234,4321", (), 1234, 4321),
        (',"1234","4321"', (), 1234, 4321),
        (",0,0", (), 0, 0),
        ("", ("DEFAULT_UID=2345", "DEFAULT_GID=5432"), 2345, 5432),
        (",3456", ("DEFAULT_GID=5432",), 3456, 5432),
    ],
)
def test_configured_ids(rig: Rig, ids, defaults, uid, gid):
    rig.write_config(f'ACTION="ids-passphrase","{rig.bin}/ids"{ids}', *defaults)
    rig.action("ids")
    rig.handle(b"ids-passphrase")
    rig.wait_runs("ids")
    rec = rig.record("ids")
    assert (rec["uid"], rec["gid"], rec["groups"]) == ([uid] * 4, [gid] * 4, [])
    rig.wait_log(f"starting as uid {uid} gid {gid}")


def test_without_root_other_ids_are_refused(rig: Rig):
    if os.getuid() == 0:  # CI runs as root: the same decision, taken as uid 1000
        from ostiary_ucspi import actions

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(actions.os, "getuid", lambda: 1000)
            mp.setattr(actions.os, "getgid", lambda: 1000)
            assert actions.resolve_ids(None, None) == (1000, 1000)
            assert actions.resolve_ids(1000, 1000) == (1000, 1000)
            for ids in ((0, 0), (1000, 0), (0, 1000), (None, 0)):
                with pytest.raises(actions.ActionRefused, match="only root can"):
                    actions.resolve_ids(*ids)
        return
    rig.write_config(f'ACTION="ids-passphrase","{rig.bin}/open",0,0')
    rig.handle(b"ids-passphrase")
    rig.wait_log("only root can")
    assert rig.runs("open") == []


def test_actions_start_in_the_root_directory_with_umask_022(rig: Rig):
    old = os.umask(0o077)  # the handler inherits it, as it would from a careless run script
    try:
        rig.handle(OPEN)
    finally:
        os.umask(old)
    rig.wait_runs("open")
    assert (rig.out / "open.cwd").read_text() == "/\n"
    assert (rig.out / "open.umask").read_text() == "0022\n"


def test_output_and_exit_status_are_logged(rig: Rig):
    rig.action("fails", code=3)
    rig.write_config(f'ACTION="fails-passphrase","{rig.bin}/fails"')
    rig.handle(OPEN)
    rig.handle(b"fails-passphrase")
    ok = rig.wait_log(f"127.0.0.1 action 1 {rig.bin}/open finished: exit 0")
    bad = rig.wait_log(f"127.0.0.1 action 2 {rig.bin}/fails finished: exit 3")
    assert ok[0].startswith("ostiary-handle: notice: ")
    assert bad[0].startswith("ostiary-handle: error: ")
    rig.wait_log(f"127.0.0.1 {rig.bin}/open: open says hello to 127.0.0.1")
    rig.wait_log(f"127.0.0.1 {rig.bin}/fails: fails complains on stderr")


def test_an_action_that_cannot_be_executed_is_one_error_line(rig: Rig):
    (rig.bin / "open").write_text("#!/nonexistent/interpreter\n")
    assert len(rig.handle(OPEN)[0]) == SALT_LEN
    assert rig.wait_log("not started") == [
        f"ostiary-handle: error: 127.0.0.1 action 1 {rig.bin}/open not started: "
        f"unable to execute it: {os.strerror(errno.ENOENT)}"
    ]
    others = [x for x in rig.lines() if "not started" not in x]
    assert len(others) == 1 and "/open starting as uid " in others[0], others  # no exit 127


def test_a_runner_that_cannot_fork_refuses_with_nothing_left_open(monkeypatch):
    from ostiary_ucspi.actions import ActionRefused, run

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    before = sorted(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(ActionRefused, match=f"^unable to fork: {os.strerror(errno.EAGAIN)}$"):
        run("/bin/true", "192.0.2.1", os.getuid(), os.getgid(), print)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_long_action_is_detached_from_the_handler(rig: Rig):
    rig.action("slow", sleep=30)
    rig.write_config(f'ACTION="slow-passphrase","{rig.bin}/slow"')
    h = rig.start()
    t0 = time.monotonic()
    got = h.talk(b"slow-passphrase")
    assert len(got) == SALT_LEN  # EOF came while the action runs
    assert h.wait(20) == 0
    assert time.monotonic() - t0 < 15  # not the action's 30 s
    wait_for(lambda: (rig.out / "slow.pid").exists(), 10, "the action to start")
    try:
        os.kill(rig.record("slow")["pid"], 0)  # still running after the handler exited
        assert rig.runs("slow") == []
    finally:
        stop_action(rig, "slow")


def test_a_long_action_does_not_hold_the_tcpserver_slot(rig: Rig):
    rig.action("slow", sleep=30)
    rig.write_config(f'ACTION="slow-passphrase","{rig.bin}/slow"')
    try:
        with TcpServer(rig, limit=1) as srv:  # one connection at a time
            assert len(srv.knock(b"slow-passphrase")) == SALT_LEN
            wait_for(lambda: (rig.out / "slow.pid").exists(), 10, "the action to start")
            t0 = time.monotonic()
            assert len(srv.knock(OPEN, timeout=20)) == SALT_LEN
            assert time.monotonic() - t0 < 15  # not the action's 30 s
            assert rig.wait_runs("open") == ["127.0.0.1"]
            assert srv.ended() >= 1
    finally:
        stop_action(rig, "slow")


def test_action_starts_after_the_connection_is_closed(rig: Rig):
    rig.action("slow", sleep=30)
    rig.write_config(f'ACTION="slow-passphrase","{rig.bin}/slow"', DELAY="3")
    h = rig.start()
    got = h.talk(b"slow-passphrase")  # returns at EOF
    closed = time.monotonic()
    assert len(got) == SALT_LEN
    try:
        wait_for(lambda: (rig.out / "slow.pid").exists(), 10, "the action to start")
        assert h.proc.poll() is None  # EOF came before the DELAY was over
        assert time.monotonic() - closed < 2.8
    finally:
        stop_action(rig, "slow")
    assert h.wait() == 0


def test_undo_runs_after_its_delay(rig: Rig):
    rig.action("undo")
    rig.write_config(f'UNDO=1,"{rig.bin}/undo"', open_action=True)
    text = rig.cfg.read_text()  # UNDO belongs right after the ACTION it undoes
    lines = text.splitlines()
    undo = lines.pop()
    lines.insert(2, undo)
    rig.cfg.write_text("\n".join(lines) + "\n")
    h = rig.start()
    assert len(h.talk(OPEN)) == SALT_LEN
    assert h.wait() == 0
    assert rig.wait_runs("undo") == ["127.0.0.1"]
    opened = float((rig.out / "open.runs").read_text().split()[1])
    undone = float((rig.out / "undo.runs").read_text().split()[1])
    assert undone - opened >= 1.0
    assert rig.record("undo")["argv"] == [str(rig.bin / "undo").encode(), b"127.0.0.1"]
    assert rig.record("undo")["uid"] == rig.record("open")["uid"]
    rig.wait_log("undo in 1s")
    rig.wait_log(f"127.0.0.1 undo {rig.bin}/undo finished: exit 0")


@pytest.mark.parametrize(
    "problem", ["world-writable file", "world-writable directory", "not executable", "missing"]
)
def test_unsafe_actions_are_refused_and_logged(rig: Rig, problem):
    path = rig.bin / "open"
    if problem == "world-writable file":
        path.chmod(0o777)
    elif problem == "world-writable directory":
        rig.bin.chmod(0o777)
    elif problem == "not executable":
        path.chmod(0o644)
    else:
        path.unlink()
    got, rc = rig.handle(OPEN)
    assert (len(got), rc) == (SALT_LEN, 0)
    line = rig.wait_log(f"127.0.0.1 action 1 {path} refused: ")[0]
    assert line.startswith("ostiary-handle: error: ")
    wait_quiet(rig.cfg)
    assert rig.runs("open") == []
    assert rig.entry().strikes == 0  # the client did prove itself


@ROOT_ONLY
def test_root_actions_must_belong_to_root(rig: Rig):
    rig.write_config(f'ACTION="root-passphrase","{rig.bin}/open",0,0')
    os.chown(rig.bin / "open", 1234, 0)
    rig.handle(b"root-passphrase")
    rig.wait_log("writable by someone other than root")
    wait_quiet(rig.cfg)
    assert rig.runs("open") == []
