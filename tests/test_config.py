"""The config file: Ostiary 4.0 configs unchanged, clear fatal errors, ``--check``."""

from __future__ import annotations

import grp
import os
import pwd
import re

import pytest
from kit.procs import wait_quiet
from kit.site import KILL, OPEN, Rig
from kit.wire import SALT_LEN

from ostiary_ucspi.config import LOG_LEVELS, ConfigError, parse

# A config as Ostiary 4.0 users write them: listener keys, flags, quoted and
# bare ids, names and numbers, more than 8 actions, \" inside strings, comments.
SAMPLE = r"""# /etc/ostiary.cfg -- Ostiary 4.0 on gate.example.net
# Keep this file mode 600: it holds the passphrases.

# The daemon's own listener
PORT=665
LOCAL_IP=127.0.0.1
SKIP_DETACH
IGNORE_URANDOM
PIDFILE="/var/run/ostiaryd.pid"

DELAY=1
COMM_TIMEOUT=5
MAX_BAD_CONNS=3
MAX_SINGLE_ERRS=20
MAX_TOTAL_ERRS=500
EXIT_ON_IPCACHE_FULL
DEFAULT_UID=65534
DEFAULT_GID=65534
MIN_LOGLEVEL=LOG_NOTICE

KILL="stop the gate, now!"   # a comma inside quotes

ACTION="open sesame","{bin}/a1"
ACTION="close sesame","{bin}/a2","0","0"
ACTION="say \"hello\" # not a comment","{bin}/a3",65534,65534
ACTION="backup","{bin}/a4","nobody","nogroup"
ACTION="reboot-please","{bin}/a5",0
ACTION="  spaces  inside  ","{bin}/a6", 65534 , 65534
ACTION="back\slash","{bin}/a7"     # trailing comment
ACTION="eighth","{bin}/a8"
ACTION="ninth action","{bin}/a9",nobody,nogroup
ACTION="tenth","{bin}/a10"

# Run when an address gets locked out; the first field is ignored.
LOCKOUT_ACTION="","{bin}/lockout"
"""
NOBODY = pwd.getpwnam("nobody").pw_uid
try:
    NOGROUP: int | None = grp.getgrnam("nogroup").gr_gid
except KeyError:
    NOGROUP = None


def write_sample(rig: Rig, extra: str = "") -> None:
    for name in [f"a{i}" for i in range(1, 11)] + ["lockout"]:
        rig.action(name)
    rig.cfg.write_text(SAMPLE.replace("{bin}", str(rig.bin)) + extra)
    rig.cfg.chmod(0o600)


@pytest.mark.skipif(NOGROUP is None, reason="no group 'nogroup' on this system")
def test_an_ostiary_4_config_is_accepted_unchanged(rig: Rig):
    write_sample(rig)
    cfg = parse(rig.cfg.read_text(), str(rig.cfg))
    assert cfg.kill == b"stop the gate, now!"
    assert [a.secret for a in cfg.actions] == [
        b"open sesame",
        b"close sesame",
        b'say "hello" # not a comment',
        b"backup",
        b"reboot-please",
        b"  spaces  inside  ",
        b"back\\slash",
        b"eighth",
        b"ninth action",
        b"tenth",
    ]
    assert [a.command for a in cfg.actions] == [f"{rig.bin}/a{i}" for i in range(1, 11)]
    assert [(a.uid, a.gid) for a in cfg.actions] == [
        (None, None),
        (0, 0),
        (65534, 65534),
        (NOBODY, NOGROUP),
        (0, None),
        (65534, 65534),
        (None, None),
        (None, None),
        (NOBODY, NOGROUP),
        (None, None),
    ]
    assert (cfg.default_uid, cfg.default_gid) == (65534, 65534)
    assert (cfg.delay, cfg.comm_timeout, cfg.max_bad_conns) == (1, 5, 3)
    assert (cfg.max_single_errs, cfg.max_total_errs, cfg.exit_on_ipcache_full) == (20, 500, True)
    assert cfg.min_loglevel == LOG_LEVELS["LOG_NOTICE"]
    assert cfg.lockout_action.command == f"{rig.bin}/lockout"
    assert cfg.lockout_action.secret == b""
    assert sorted(k for _, k in cfg.unused) == sorted(
        ["PORT", "LOCAL_IP", "SKIP_DETACH", "IGNORE_URANDOM", "PIDFILE"]
    )


@pytest.mark.skipif(os.getuid() != 0, reason="the sample runs actions as other users")
def test_the_ostiary_4_config_serves_knocks(rig: Rig):
    write_sample(rig, f"LOCKOUT_DB={rig.db}\n")  # the one line an ostiary-handle needs added
    for secret, name in (
        (b'say "hello" # not a comment', "a3"),
        (b"ninth action", "a9"),
        (b"  spaces  inside  ", "a6"),
        (b"back\\slash", "a7"),
        (b"tenth", "a10"),
    ):
        got, rc = rig.handle(secret)
        assert (len(got), rc) == (SALT_LEN, 0)
        assert rig.wait_runs(name) == ["127.0.0.1"], name
    assert rig.record("a3")["uid"] == [65534] * 4
    assert rig.record("a9")["gid"] == [NOGROUP] * 4


def test_syntax_details():
    cfg = parse(
        "\r\n".join(
            [
                '  KILL = "k#not-a-comment"  # a comment',
                'ACTION="a \\"quoted\\" \\\\ b","/bin/true"',
                'ACTION="x" , "/bin/echo" , "1", 2',
                'UNDO=30,"/bin/false"',
                "EXIT_ON_IPCACHE_FULL=no",
                "SKIP_DETACH=yes",
                "",
                "# the end",
            ]
        ),
        "t.cfg",
    )
    assert cfg.kill == b"k#not-a-comment"
    assert cfg.actions[0].secret == b'a "quoted" \\ b'
    assert (cfg.actions[1].uid, cfg.actions[1].gid) == (1, 2)
    assert (cfg.actions[1].undo, cfg.actions[1].undo_delay) == ("/bin/false", 30)
    assert cfg.actions[0].undo is None
    assert cfg.exit_on_ipcache_full is False


def test_long_passphrases_and_lockout_action_field_are_fine():
    long = "p" * 200
    cfg = parse(
        f'KILL="{long}"\nACTION="{long}x","/bin/true"\nLOCKOUT_ACTION="{long}","/bin/true"\n',
        "t.cfg",
    )
    assert len(cfg.kill) == 200
    assert cfg.lockout_action.secret == long.encode()  # ignored, so it may repeat one


@pytest.mark.parametrize("level", list(LOG_LEVELS))
def test_every_syslog_level(level):
    cfg = parse(f'KILL="k"\nACTION="a","/bin/true"\nMIN_LOGLEVEL={level}\n', "t.cfg")
    assert cfg.min_loglevel == LOG_LEVELS[level]


GOOD = ['KILL="the-kill-passphrase"', 'ACTION="the-open-passphrase","/bin/true"']
BAD_CONFIGS = {
    # name: (lines, line number of the error or None, words the message has)
    "unknown key": (GOOD + ["NO_SUCH_KEY=1"], 3, "unknown key"),
    "missing KILL": (GOOD[1:], None, "KILL"),
    "no ACTION": (GOOD[:1], None, "ACTION"),
    "relative command": (GOOD + ['ACTION="other-passphrase","bin/true"'], 3, "absolute path"),
    "passphrase twice": (
        GOOD + ['ACTION="the-open-passphrase","/bin/false"'],
        3,
        "already used on line 2",
    ),
    "KILL reused by ACTION": (
        GOOD + ['ACTION="the-kill-passphrase","/bin/false"'],
        3,
        "already used on line 1",
    ),
    "ACTION reused by KILL": (
        [GOOD[1], GOOD[0].replace("kill", "open")],
        2,
        "already used on line 1",
    ),
    "unterminated string": (GOOD + ['ACTION="oops,/bin/true'], 3, "unterminated"),
    "not a number": (GOOD + ["DELAY=soon"], 3, "whole number"),
    "bad log level": (GOOD + ["MIN_LOGLEVEL=LOG_LOUD"], 3, "MIN_LOGLEVEL"),
    "key twice": (GOOD + ["DELAY=1", "DELAY=2"], 4, "already set on line 3"),
    "stray UNDO": (GOOD + ["DELAY=1", 'UNDO=5,"/bin/true"'], 4, "UNDO"),
    "unknown user": (
        GOOD + ['ACTION="x-passphrase","/bin/true","no-such-user-here"'],
        3,
        "no such user",
    ),
    "empty passphrase": (GOOD + ['ACTION="","/bin/true"'], 3, "empty passphrase"),
    "relative LOCKOUT_DB": (GOOD + ["LOCKOUT_DB=state/lockout.cdb"], 3, "absolute"),
    "no equals sign": (GOOD + ["DELAY 5"], 3, "KEY=value"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_config_errors_are_fatal_and_the_client_gets_nothing(rig: Rig, name):
    lines, line, words = BAD_CONFIGS[name]
    rig.cfg.write_text("\n".join(lines) + "\n")
    got, rc = rig.handle(OPEN)
    assert (got, rc) == (b"", 111)
    log = rig.log_text().splitlines()
    assert len(log) == 1, log
    where = f"(?:{re.escape(str(rig.cfg))}|ostiary\\.cfg)" + (f":{line}" if line else "")
    assert re.match(f"^ostiary-handle: fatal: {where}: ", log[0]), log[0]
    assert words in log[0]
    assert 'passphrase"' not in log[0] and "the-kill" not in log[0] and "the-open" not in log[0]
    assert rig.store_view() is None  # nothing was charged or written


@pytest.mark.parametrize(
    "bad",
    [
        'KILL "s3cr3t-in-error"',
        "s3cr3t-in-error",
        "s3cr3tinerror",
        "KILL=s3cr3t-in-error",
        'KILL="s3cr3t-in-error',
        'KILL="x" "s3cr3t-in-error"',
        'ACTION=s3cr3t-in-error,"/bin/true"',
        'ACTION="/bin/true","s3cr3t-in-error"',
        'ACTION="/bin/true",s3cr3t-in-error',
        'ACTION="s3cr3t-in-error"',
        'ACTION="s3cr3t-in-error","/bin/true",1,2,3',
    ],
)
def test_config_errors_never_show_a_passphrase(bad):
    with pytest.raises(ConfigError) as e:
        parse("\n".join(GOOD + [bad]) + "\n", "t.cfg")
    assert str(e.value).startswith("t.cfg:3: ")
    assert "s3cr3t" not in str(e.value)


def test_unreadable_config_is_fatal(rig: Rig):
    got, rc = rig.handle(OPEN, cfg=rig.root / "missing.cfg")
    assert (got, rc) == (b"", 111)
    assert re.match(r"^ostiary-handle: fatal: .*missing\.cfg: ", rig.log_text())


# -- --check -----------------------------------------------------------------------


def check_config(rig: Rig, *lines: str, **settings) -> None:
    rig.action("undo")
    rig.write_config(
        f'ACTION="a-second-passphrase","{rig.bin}/open",1234,4321',
        f'UNDO=90,"{rig.bin}/undo"',
        *lines,
        **settings,
    )


def assert_no_secret(text: str, *secrets: bytes) -> None:
    for s in (KILL, OPEN, b"a-second-passphrase") + secrets:
        assert s.decode() not in text


@pytest.mark.skipif(os.getuid() != 0, reason="names other uids: only root may")
def test_check_describes_a_good_config(rig: Rig):
    check_config(rig)
    r = rig.check()
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"{rig.bin}/open ADDRESS as uid {NOBODY} gid " in out  # the default, as root
    assert f"{rig.bin}/open ADDRESS as uid 1234 gid 4321, undo {rig.bin}/undo after 90s" in out
    assert str(rig.db) in out
    assert out.rstrip().endswith("ok")
    assert r.stderr == ""
    assert_no_secret(out + r.stderr)


def test_check_warns_about_a_readable_config_and_short_passphrases(rig: Rig):
    rig.write_config('ACTION="shorty","/bin/true"', mode=0o644)
    r = rig.check()
    assert r.returncode == 0, r.stderr
    warnings = r.stderr.splitlines()
    assert all(w.startswith("ostiary-handle: warning: ") for w in warnings), warnings
    assert any("readable" in w for w in warnings)
    assert any(":8: passphrase is shorter" in w for w in warnings)  # the line after DEFAULTS
    assert_no_secret(r.stdout + r.stderr, b"shorty")


def test_check_warns_about_listener_keys(rig: Rig):
    rig.write_config("PORT=665", "SKIP_DETACH")
    r = rig.check()
    assert r.returncode == 0
    assert "PORT is for Ostiary's own listener" in r.stderr
    assert "SKIP_DETACH is for Ostiary's own listener" in r.stderr


@pytest.mark.parametrize(
    "problem",
    [
        "world-writable config",
        "world-writable action",
        "world-writable action directory",
        "missing action",
        "action not executable",
        "no state directory",
        "syntax error",
        "action as root owned by another user",
    ],
)
def test_check_refuses_unusable_configs(rig: Rig, problem):
    if problem == "world-writable config":
        rig.write_config(mode=0o666)
    elif problem == "world-writable action":
        (rig.bin / "open").chmod(0o777)
    elif problem == "world-writable action directory":
        rig.bin.chmod(0o777)
    elif problem == "missing action":
        (rig.bin / "open").unlink()
    elif problem == "action not executable":
        (rig.bin / "open").chmod(0o644)
    elif problem == "no state directory":
        rig.write_config(db=rig.root / "nowhere" / "lockout.cdb")
    elif problem == "syntax error":
        rig.write_config('ACTION="s3cr3t-pass",relative/cmd')
    else:
        if os.getuid() != 0:
            pytest.skip("needs root to give a file away")
        rig.write_config(f'ACTION="a-root-passphrase","{rig.bin}/open",0,0')
        os.chown(rig.bin / "open", 1234, 1234)
    r = rig.check()
    assert r.returncode == 111
    fatal = [x for x in r.stderr.splitlines() if x.startswith("ostiary-handle: fatal: ")]
    assert fatal, r.stderr
    assert "ok" not in r.stdout.split()
    assert_no_secret(r.stdout + r.stderr, b"s3cr3t-pass", b"a-root-passphrase")
    # The handler refuses the same things when it runs.
    got, rc = rig.handle(b"a-root-passphrase" if "root" in problem else OPEN)
    if problem in ("world-writable config", "no state directory", "syntax error"):
        assert (got, rc) == (b"", 111)
    else:  # a bad action file: the client proved itself, the action is refused
        assert (len(got), rc) == (SALT_LEN, 0)
        assert rig.wait_log(f"{rig.bin}/open refused: ")
    wait_quiet(rig.cfg)
    assert rig.runs("open") == []


def test_check_usage_error(rig: Rig):
    r = rig.check("--bogus")
    assert r.returncode == 100
    assert r.stderr.startswith("ostiary-handle: usage: ")
