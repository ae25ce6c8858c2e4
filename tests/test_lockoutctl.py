"""ostiary-lockout: every command on a busy, an empty, a missing and a corrupt store."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from conftest import project_tool
from kit.damage import OPERATOR, damage_header
from kit.site import NOW
from kit.site import StoreRig as Rig

from ostiary_ucspi import store as storemod
from ostiary_ucspi import supervise
from ostiary_ucspi.admin.lockout import PROG, main
from ostiary_ucspi.config import load
from ostiary_ucspi.policy import ERRORS, STOPPED, Entry, charge, refusal, stop


@pytest.fixture
def rig(tmp_path) -> Rig:
    return Rig(tmp_path)


@pytest.fixture
def run(rig, capsys):
    """Run ostiary-lockout -c CONFIG ARGS in-process; return (status, stdout, stderr)."""

    def go(*args: str) -> tuple[int, str, str]:
        code = main([PROG, "-c", rig.cfg_path, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return go


def when(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


# -- list, show, export ---------------------------------------------------------


def test_list_on_an_empty_store_creates_nothing(rig, run):
    code, out, err = run("list")
    assert (code, err) == (0, "")
    assert "0 tracked, 0 locked out" in out and "ADDRESS" not in out
    code, out, _ = run("list", "--json")
    assert json.loads(out)["addresses"] == [] and json.loads(out)["stopped"] is None
    assert os.listdir(rig.state) == []


def test_list_shows_every_address_and_the_stopped_state(rig, run):
    locked = rig.fails("192.0.2.7", 3, NOW - 100)
    rig.fails("2001:db8:1:2::5", 1, NOW - 50)
    with rig.store.lock() as tx:
        stop(tx, NOW - 10, "KILL from 198.51.100.1")
    code, out, err = run("list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "2 tracked, 1 locked out, 4 errors in all" in lines[0]
    assert lines[1] == f"SERVICE STOPPED since {when(NOW - 10)}: KILL from 198.51.100.1"
    assert lines[2].split() == ["ADDRESS", "STRIKES", "ERRORS", "LOCKED", "SINCE", "LAST", "SEEN"]
    assert lines[3].split() == [
        locked.decode(),
        "3",
        "3",
        *when(NOW - 100).split(),
        *when(NOW - 100).split(),
    ]
    assert lines[4].split() == ["2001:db8:1:2::/64", "1", "1", "-", *when(NOW - 50).split()]
    doc = json.loads(run("list", "--json")[1])
    assert doc["stopped"] == {"since": NOW - 10, "reason": "KILL from 198.51.100.1"}
    assert doc["total_errors"] == 4 and doc["max_bad_conns"] == 3 and doc["store"] == rig.db
    assert doc["addresses"] == [
        {
            "address": "192.0.2.7",
            "strikes": 3,
            "errors": 3,
            "locked": True,
            "locked_since": NOW - 100,
            "last_seen": NOW - 100,
        },
        {
            "address": "2001:db8:1:2::/64",
            "strikes": 1,
            "errors": 1,
            "locked": False,
            "locked_since": None,
            "last_seen": NOW - 50,
        },
    ]


def test_show_finds_an_ipv6_address_by_its_prefix(rig, run):
    rig.fails("2001:db8:1:2::5", 3)
    for arg in ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64", "2001:db8:1:2::99/64"):
        code, out, _ = run("show", arg)
        assert code == 0
        assert "address       2001:db8:1:2::/64" in out and "strikes       3" in out
        assert f"locked since  {when(NOW)}" in out and "closed at once" in out
    code, out, _ = run("show", "2001:db8:1:3::1")
    assert code == 0 and "none: not locked out" in out


@pytest.mark.parametrize(
    "bad", ["1.2.3", "256.1.1.1", "example.com", "1.2.3.4/32", "2001:db8::/129", "2001:db8::/x", ""]
)
def test_a_bad_address_is_a_usage_error(run, bad):
    code, out, err = run("show", bad)
    assert (code, out) == (100, "")
    assert err == f"ostiary-lockout: usage: not an IP address or IPv6 prefix: {bad!r}\n"


def test_export_writes_the_locked_out_addresses_in_numeric_order(rig, run):
    for ip in ("10.0.0.1", "9.0.0.200", "2001:db8::1", "9.0.0.30"):
        rig.fails(ip, 3)
    rig.fails("192.0.2.1", 2)  # not (yet) locked out
    with rig.store.lock() as tx:  # at the limit through a charge whose handler died: refused
        tx.put(b"192.0.2.2", b"3 3 0 %d" % NOW)
    code, out, err = run("export")
    assert (code, err) == (0, "")
    assert out == "9.0.0.30\n9.0.0.200\n10.0.0.1\n192.0.2.2\n2001:db8::/64\n"
    for line in out.split():
        assert refusal(rig.store.view(), line.encode(), 3) == "locked out"
    assert rig.refused("192.0.2.1") is None


# -- unlock, lock -------------------------------------------------------------------


def test_unlock_forgets_strikes_errors_and_lock(rig, run):
    rig.fails("192.0.2.7", 3)
    assert rig.refused("192.0.2.7") == "locked out"
    code, out, _ = run("unlock", "192.0.2.7")
    assert code == 0
    assert out == f"192.0.2.7: unlocked (had 3 strikes, 3 errors, locked since {when(NOW)})\n"
    assert rig.refused("192.0.2.7") is None and rig.store.view().get(b"192.0.2.7") is None
    assert run("unlock", "192.0.2.7")[1] == "192.0.2.7: no record, nothing to unlock\n"


def test_unlock_an_ipv6_prefix_as_list_prints_it(rig, run):
    rig.fails("2001:db8:1:2::5", 3)
    assert run("unlock", "2001:db8:1:2::/64")[0] == 0
    assert rig.refused("2001:db8:1:2::5") is None


def test_lock_refuses_an_address_at_once(rig, run):
    code, out, _ = run("lock", "198.51.100.9")
    assert (code, out) == (0, "198.51.100.9: locked out\n")
    assert rig.refused("198.51.100.9") == "locked out"
    assert rig.refused("198.51.100.10") is None
    since = Entry(rig.store.view().get(b"198.51.100.9")).locked_since
    assert abs(since - time.time()) < 5
    assert (
        run("lock", "198.51.100.9")[1] == f"198.51.100.9: locked out already, since {when(since)}\n"
    )
    assert run("lock", "2001:db8:5:6::7")[0] == 0
    assert rig.refused("2001:db8:5:6:ffff::1") == "locked out"


def test_lock_refuses_a_prefix_the_handler_does_not_count_by(rig, run):
    code, out, err = run("lock", "2001:db8::/48")
    assert (code, out) == (100, "")
    assert "IPv6 strikes count per /64 (IPV6_PREFIX)" in err
    assert rig.store.view() is None


# -- revive, prune --------------------------------------------------------------------


def test_revive_leaves_the_stopped_state_and_says_how_to_restart(tmp_path, capsys, monkeypatch):
    rig = Rig(tmp_path, "MAX_SINGLE_ERRS=2\n")
    rig.fails("192.0.2.7", 3)
    assert rig.refused("198.51.100.1").startswith(
        "service stopped: 192.0.2.7 passed MAX_SINGLE_ERRS"
    )
    monkeypatch.setenv("OSTIARY_SERVICE", "/service/ostiary")
    assert main([PROG, "-c", rig.cfg_path, "revive"]) == 0
    out = capsys.readouterr().out
    assert f"revived: stopped since {when(NOW)}: 192.0.2.7 passed MAX_SINGLE_ERRS (3 errors)" in out
    assert "rm /service/ostiary/down; svc -u /service/ostiary" in out
    assert "SERVICEDIR" not in out
    view = rig.store.view()
    assert view.get(STOPPED) is None and view.get(ERRORS) is None
    assert Entry(view.get(b"192.0.2.7")).errors == 0
    assert rig.refused("198.51.100.1") is None
    assert rig.refused("192.0.2.7") == "locked out"  # revive is not unlock
    assert main([PROG, "-c", rig.cfg_path, "revive"]) == 0
    assert capsys.readouterr().out == "the service is not stopped\n"


def test_prune_drops_expired_strikes_and_locks_now(tmp_path, capsys):
    rig = Rig(tmp_path, "STRIKE_EXPIRE=3600\nLOCKOUT_EXPIRE=7200\n")
    rig.fails("192.0.2.1", 1, NOW - 4000)  # strikes expired
    rig.fails("192.0.2.2", 1, NOW - 100)  # strikes fresh
    rig.fails("192.0.2.3", 3, NOW - 8000)  # lock expired
    rig.fails("192.0.2.4", 3, NOW - 1000)  # lock fresh
    assert main([PROG, "-c", rig.cfg_path, "prune"]) == 0
    assert capsys.readouterr().out == "pruned: 2 expired records dropped, 2 kept\n"
    items = rig.store.view().items()
    assert set(items) == {b"192.0.2.2", b"192.0.2.4", ERRORS}
    assert os.path.getsize(rig.db + ".journal") == len(b"ostiary-journal 3\n")


def test_read_and_undo_commands_on_an_empty_store_create_nothing(rig, run):
    assert run("prune") == (0, "the store is empty: nothing to prune\n", "")
    assert run("revive") == (0, "the service is not stopped\n", "")
    assert run("unlock", "192.0.2.1") == (0, "192.0.2.1: no record, nothing to unlock\n", "")
    shown = "address       192.0.2.1\nrecord        none: not locked out\n"
    assert run("show", "192.0.2.1") == (0, shown, "")
    assert run("export") == (0, "", "")
    assert os.listdir(rig.state) == []
    assert run("lock", "192.0.2.1") == (0, "192.0.2.1: locked out\n", "")
    assert rig.refused("192.0.2.1") == "locked out"


# -- failures: missing, corrupt -------------------------------------------------------


def test_a_missing_store_directory_is_fatal(rig, run):
    os.rmdir(rig.state)
    for args in (["list"], ["export"], ["lock", "192.0.2.1"], ["prune"]):
        code, out, err = run(*args)
        assert (code, out) == (111, "")
        assert (
            err
            == f"ostiary-lockout: fatal: lockout store: state directory {rig.state} does not exist\n"
        )


def test_a_missing_config_is_fatal(tmp_path, capsys):
    assert main([PROG, "-c", str(tmp_path / "nope.cfg"), "list"]) == 111
    err = capsys.readouterr().err
    assert (
        err
        == f"ostiary-lockout: fatal: unable to read {tmp_path}/nope.cfg: No such file or directory\n"
    )


@pytest.mark.parametrize("damage, what", OPERATOR)
def test_a_corrupt_store_is_reported_then_set_aside_on_request(rig, run, damage, what):
    rig.fails("192.0.2.7", 3)
    damage(rig.db)
    for args in (["list"], ["list", "--json"], ["show", "192.0.2.8"], ["export"]):
        code, out, err = run(*args)
        assert (code, out) == (111, ""), args
        assert err.startswith("ostiary-lockout: fatal: the lockout store is corrupt: ")
        assert what in err and "'ostiary-lockout reset --force' moves it aside" in err
    code, out, err = run("reset")
    assert code == 100 and "run 'reset --force'" in err
    assert os.path.exists(rig.db)
    code, out, err = run("reset", "--force")
    assert (code, err) == (0, "")
    assert what in out and "every strike, lock and the stopped state are forgotten" in out
    aside = sorted(f for f in os.listdir(rig.state) if ".corrupt-" in f)
    assert [f.split(".corrupt-")[0] for f in aside] == ["lockout.cdb", "lockout.cdb.journal"]
    assert all(f"moved aside: {rig.state / f}" in out for f in aside)
    assert run("list")[0] == 0 and rig.refused("192.0.2.7") is None
    rig.fails("192.0.2.9", 1)
    assert rig.refused("192.0.2.9") is None and rig.store.view().get(b"192.0.2.9") is not None


def test_reset_refuses_a_valid_store(rig, run):
    rig.fails("192.0.2.7", 3)
    code, out, err = run("reset", "--force")
    assert (code, out) == (111, "")
    assert "the store is not corrupt: nothing to reset" in err
    assert rig.refused("192.0.2.7") == "locked out"


def test_writes_to_a_corrupt_store_fail(rig, run):
    rig.fails("192.0.2.7", 3)
    damage_header(rig.db)
    for args in (["unlock", "192.0.2.7"], ["lock", "192.0.2.1"], ["prune"], ["revive"]):
        code, out, err = run(*args)
        assert code == 111 and "bad CDB header" in err, args


# -- the command line -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no command"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["-x", "list"], "unknown option '-x'"),
        (["list", "192.0.2.1"], "list takes no argument"),
        (["show"], "show takes ADDR"),
        (["unlock", "192.0.2.1", "192.0.2.2"], "unlock takes ADDR"),
        (["export", "--json"], "export takes no argument"),
    ],
)
def test_usage_errors(rig, capsys, args, message):
    assert main([PROG, "-c", rig.cfg_path, *args]) == 100
    err = capsys.readouterr().err
    assert err.startswith(f"ostiary-lockout: usage: {message}\nostiary-lockout [-c FILE] COMMAND")


def test_help(capsys):
    assert main([PROG, "--help"]) == 0
    assert capsys.readouterr().out.startswith(
        "ostiary-lockout: usage: ostiary-lockout [-c FILE] COMMAND"
    )


def test_the_installed_command(rig):
    tool = project_tool("ostiary-lockout")
    rig.fails("192.0.2.7", 3)
    done = subprocess.run([tool, f"-c{rig.cfg_path}", "export"], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "192.0.2.7\n", "")
    done = subprocess.run(
        [tool, "-c", rig.cfg_path, "show", "nonsense"], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout) == (100, "")
    damage_header(rig.db)
    done = subprocess.run([tool, "-c", rig.cfg_path, "list"], capture_output=True, text=True)
    assert done.returncode == 111 and done.stdout == ""
    assert done.stderr.startswith("ostiary-lockout: fatal: the lockout store is corrupt: ")
    cmd = f"{tool} -c {rig.cfg_path}"
    done = subprocess.run(
        f"{cmd} reset --force && {cmd} list | head -1", shell=True, capture_output=True, text=True
    )
    assert done.returncode == 0 and "0 tracked" in done.stdout


# -- safe while handlers run ---------------------------------------------------------------


def test_operator_changes_and_handler_charges_interleave_without_loss(rig, run, monkeypatch):
    monkeypatch.setattr(storemod, "MIN_JOURNAL", 2048)
    monkeypatch.setattr(storemod, "MAX_JOURNAL", 2048)
    with open(rig.cfg_path, "a") as f:
        f.write("MAX_BAD_CONNS=1000000\n")
    cfg = load(rig.cfg_path)
    pids = []
    for p in range(4):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for _ in range(60):
                    charge(rig.store, b"203.0.113.%d" % p, cfg, int(time.time()))
                    rig.store.compact_due()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for i in range(20):
        assert run("lock", f"198.51.100.{i}")[0] == 0
        if i % 5 == 0:
            assert run("prune")[0] == 0
        assert run("list")[0] == 0
    for i in range(0, 20, 2):
        assert run("unlock", f"198.51.100.{i}")[0] == 0
    assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids] == [0] * 4
    view = rig.store.view()
    assert view.gen > 3
    for p in range(4):
        assert Entry(view.get(b"203.0.113.%d" % p)).strikes == 60
    assert int(view.get(ERRORS)) == 240
    locked = run("export")[1].split()
    assert locked == [f"198.51.100.{i}" for i in range(1, 20, 2)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change owners")
def test_a_store_file_the_handler_cannot_use_is_named(rig, run):
    rig.fails("192.0.2.7", 1)
    os.chown(rig.state, 65534, 65534)
    os.chown(rig.db + ".lock", 65534, 65534)
    os.chown(rig.db + ".journal", 65534, 65534)  # the snapshot stays root's
    for args in (["list"], ["unlock", "192.0.2.7"], ["prune"]):
        code, out, err = run(*args)
        assert (code, out) == (111, "")
        assert err == (
            f"ostiary-lockout: fatal: lockout store: {rig.db}: its owner (uid 0) is not the "
            f"state directory's (uid 65534), so the handler cannot use it: chown 65534 {rig.db}\n"
        )
    os.chown(rig.db, 65534, 0)
    assert run("list")[0] == 0


def test_a_store_file_its_owner_cannot_read_or_write_is_named(rig, run):
    rig.fails("192.0.2.7", 1)
    os.chmod(rig.db + ".journal", 0o440)
    code, out, err = run("list")
    assert (code, out) == (111, "")
    assert err == (
        f"ostiary-lockout: fatal: lockout store: {rig.db}.journal: Permission denied to its "
        f"owner, the handler (mode 440): chmod u+rw {rig.db}.journal\n"
    )
    os.chmod(rig.db + ".journal", 0o640)
    os.chmod(rig.state, 0o500)
    code, out, err = run("export")
    assert code == 111 and f"state directory {rig.state}: mode 500" in err
    os.chmod(rig.state, 0o700)
    assert run("export")[0] == 0


def test_revive_outside_supervision_names_no_directory(tmp_path, capsys, monkeypatch):
    rig = Rig(tmp_path, "MAX_SINGLE_ERRS=2\n")
    rig.fails("192.0.2.7", 3)
    monkeypatch.delenv("OSTIARY_SERVICE", raising=False)
    monkeypatch.setattr(supervise, "ROOT", str(tmp_path))  # a machine with nothing set up
    assert main([PROG, "-c", rig.cfg_path, "revive"]) == 0
    out = capsys.readouterr().out
    assert "rm SERVICEDIR/down; svc -u SERVICEDIR" in out
    assert rig.refused("198.51.100.1") is None
