"""Adversarial: random, grammar-built and mutated config files.

Every input gives either a valid config (checked against the documented
bounds) or exactly one ConfigError that reads ``FILE:LINE: reason`` (``FILE:
reason`` for a whole-file problem: unreadable, KILL or ACTION missing), never
another exception, never a hang. The real ``ostiary-handle`` then gets a
sample of them: one ``fatal`` log line or a salt, never a traceback, and
nothing at all for the client when the config is bad.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import project_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.wire import SALT_LEN, read_to_eof

from ostiary_ucspi.config import UNDO_MAX, Config, ConfigError, load, parse

NAME = "fuzz.cfg"
ERROR = re.compile(r"^(?:/\S*/)?fuzz\.cfg(?::(\d+))?: \S[^\n]*$")  # the file as given
ID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel
SETTINGS = dict(
    deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

KEYS = (
    "KILL",
    "ACTION",
    "LOCKOUT_ACTION",
    "UNDO",
    "LOCKOUT_DB",
    "DELAY",
    "COMM_TIMEOUT",
    "MAX_BAD_CONNS",
    "MAX_SINGLE_ERRS",
    "MAX_TOTAL_ERRS",
    "EXIT_ON_IPCACHE_FULL",
    "IPCACHE_SIZE",
    "DEFAULT_UID",
    "DEFAULT_GID",
    "MIN_LOGLEVEL",
    "STRIKE_EXPIRE",
    "LOCKOUT_EXPIRE",
    "IPV6_PREFIX",
    "PORT",
    "LOCAL_IP",
    "SKIP_DETACH",
    "IGNORE_URANDOM",
    "PIDFILE",
)
BASE = [
    'KILL="fuzz-kill-passphrase"',
    'ACTION="fuzz-open-passphrase","/bin/true"',
    'UNDO=60,"/bin/true"',
    'ACTION="fuzz-other-passphrase","/bin/echo",nobody,"nogroup"',
    'LOCKOUT_ACTION="","/bin/echo"',
    "MAX_BAD_CONNS=3",
    "COMM_TIMEOUT=5",
    "DELAY=0",
    "MIN_LOGLEVEL=LOG_INFO",
    "EXIT_ON_IPCACHE_FULL",
    "DEFAULT_UID=65534",
    "IPV6_PREFIX=64",
    "# a comment",
    "",
    "PORT=7050 # trailing comment",
]


class Hang(Exception):
    pass


def on_alarm(signum, frame):
    raise Hang()


@pytest.fixture(scope="module")
def parser(tally) -> dict:
    """This module's parser figures (``TALLY``), part of the run's ``tally``."""
    counts = tally.section(
        "config parser",
        inputs=0,
        valid=0,
        errors=0,
        crashes=0,
        slowest=0.0,
        render=lambda t: (
            f"config parser: {t['inputs']} inputs, {t['valid']} valid, "
            f"{t['errors']} located errors, {t['crashes']} crashes, "
            f"slowest parse {t['slowest'] * 1000:.1f} ms"
        ),
    )
    counts["totals"] = tally.totals
    return counts


def judge(
    TALLY: dict,
    text: str | None = None,
    raw: bytes | None = None,
    total: bool = True,
    name: str = NAME,
) -> Config | ConfigError:
    """Parse ``text`` as file ``name`` (or load ``raw`` from a file); check the verdict; add it
    to ``TALLY`` (and, if ``total``, to the run's totals); return it."""
    TALLY["inputs"] += 1
    TALLY["totals"]["inputs"] += total
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 5)
    t0 = time.monotonic()
    try:
        if raw is None:
            result: Config | ConfigError = parse(text, name)
        else:
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / NAME
                path.write_bytes(raw)
                result = load(str(path))
    except ConfigError as e:
        result = e
    except Hang:
        TALLY["crashes"] += 1
        TALLY["totals"]["crashes"] += 1
        pytest.fail(f"parser hung on {text or raw!r}")
    except Exception as e:  # anything else is a crash: a traceback in a one-shot handler
        TALLY["crashes"] += 1
        TALLY["totals"]["crashes"] += 1
        raise AssertionError(f"{type(e).__name__}: {e} on {text or raw!r}") from e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        TALLY["slowest"] = max(TALLY["slowest"], time.monotonic() - t0)
    lines = (text if raw is None else raw.decode("utf-8", "replace")).split("\n")
    if isinstance(result, ConfigError):
        TALLY["errors"] += 1
        m = ERROR.match(str(result))
        assert m, f"not one FILE:LINE error: {str(result)!r}"
        if m.group(1):
            assert 1 <= int(m.group(1)) <= len(lines), str(result)
    else:
        TALLY["valid"] += 1
        valid(result)
    return result


def valid(cfg: Config) -> None:
    """A config the parser accepted is within every documented bound."""
    assert cfg.kill and cfg.actions
    secrets = [cfg.kill] + [a.secret for a in cfg.actions]
    assert all(secrets) and len(set(secrets)) == len(secrets)
    for a in cfg.actions + ([cfg.lockout_action] if cfg.lockout_action else []):
        assert a.command.startswith("/") and "\0" not in a.command
        for i in (a.uid, a.gid):
            assert i is None or 0 <= i <= ID_MAX
        if a.undo is not None:
            assert a.undo.startswith("/") and 1 <= a.undo_delay <= UNDO_MAX
    for i in (cfg.default_uid, cfg.default_gid):
        assert i is None or 0 <= i <= ID_MAX
    assert 0 <= cfg.delay <= 3600 and 1 <= cfg.comm_timeout <= 600
    assert cfg.max_bad_conns >= 1 and 1 <= cfg.ipv6_prefix <= 128
    assert cfg.lockout_db.startswith("/") and 0 <= cfg.min_loglevel <= 7


# -- strategies -------------------------------------------------------------------

digits = st.one_of(
    st.integers(-5, 10**6).map(str),
    st.integers(0, 2**70).map(str),
    st.sampled_from((20, 4300, 4301, 6000)).map(lambda n: "9" * n),
    st.sampled_from(("٣", "0x10", "4294967295", "4294967294", "1e3", "")),
)
words = st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=20)
quoted = st.builds(
    lambda s, close: '"' + s.replace('"', '\\"') + ('"' if close else ""),
    words,
    st.sampled_from((True, True, True, False)),
)
paths = st.sampled_from(
    ("/bin/true", "/bin/echo", "bin/true", "", "/", "/nonexistent/x", '"/bin/true"', '/bin/tr\\"ue')
)
names = st.sampled_from(
    (
        "nobody",
        "root",
        "nogroup",
        "no-such-user",
        '"nobody"',
        "0",
        "-1",
        "LOG_DEBUG",
        "LOG_NOPE",
        "yes",
        "no",
        "1",
        "0",
    )
)
atoms = st.one_of(digits, quoted, paths, names, words)
values = st.one_of(atoms, st.lists(atoms, min_size=0, max_size=5).map(",".join))
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(str.lower), words)
seps = st.sampled_from(("=", "=", "=", " = ", "", "==", "\t=\t"))
comments = st.sampled_from(("", "", " # note", '#"', " #", ' "#" '))
lines = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), atoms),
    st.builds(lambda k, s, v, c: k + s + v + c, keys, seps, values, comments),
)
grammar = st.builds(
    lambda base, extra, order, nl: nl.join([x for _, x in sorted(zip(order, base + extra))]),
    st.lists(st.sampled_from(BASE), max_size=8),
    st.lists(lines, max_size=8),
    st.lists(st.integers(0, 100), min_size=16, max_size=16),
    st.sampled_from(("\n", "\n", "\r\n")),
)


@st.composite
def mutated(draw) -> str:
    """The base config, then a few edits of the kind a typo or a hostile writer makes."""
    text = "\n".join(BASE) + "\n"
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("delete", "insert", "replace", "duplicate", "truncate", "swap")))
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "insert":
            bit = draw(st.one_of(words, st.sampled_from(('"', "\\", "#", ",", "=", "\n", "\0"))))
            text = text[:i] + bit + text[i:]
        elif op == "replace":
            text = text[:i] + draw(st.characters(codec="utf-8")) + text[i + 1 :]
        elif op == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif op == "truncate":
            text = text[:i]
        else:
            ls = text.split("\n")
            a, b = draw(st.integers(0, len(ls) - 1)), draw(st.integers(0, len(ls) - 1))
            ls[a], ls[b] = ls[b], ls[a]
            text = "\n".join(ls)
    return text


# -- in-process: many inputs ---------------------------------------------------------


@settings(max_examples=600, **SETTINGS)
@given(st.text(max_size=400))
def test_random_text_gives_a_config_or_one_located_error(parser, text):
    judge(parser, text)


@settings(max_examples=1200, **SETTINGS)
@given(grammar)
def test_grammar_built_configs_give_a_config_or_one_located_error(parser, text):
    judge(parser, text)


@settings(max_examples=800, **SETTINGS)
@given(mutated())
def test_mutated_configs_give_a_config_or_one_located_error(parser, text):
    judge(parser, text)


@settings(max_examples=300, **SETTINGS)
@given(
    st.one_of(
        st.binary(max_size=300),
        mutated()
        .map(lambda t: t.encode())
        .flatmap(lambda b: st.integers(0, len(b)).map(lambda i: b[:i] + b"\xff\xfe" + b[i:])),
    )
)
def test_random_bytes_from_a_file_give_a_config_or_one_located_error(parser, raw):
    judge(parser, raw=raw)


def test_the_fuzz_found_these(parser):
    """Inputs that once crashed the parser or slipped past it."""
    for text in (
        'KILL="k"\nACTION="a","/bin/true"\nMAX_BAD_CONNS=' + "9" * 5000,
        'KILL="k"\nACTION="a","/bin/true"\nDEFAULT_UID=' + "9" * 5000,
        'KILL="k"\nACTION="a","/bin/true",' + "7" * 4400 + "\n",
    ):
        assert isinstance(judge(parser, text), ConfigError)
    for bad_id in ("4294967295", "4294967296", str(2**64)):
        for line in (
            f"DEFAULT_UID={bad_id}",
            f"DEFAULT_GID={bad_id}",
            f'ACTION="b","/bin/true",{bad_id}',
            f'ACTION="b","/bin/true",1,{bad_id}',
        ):
            err = judge(parser, f'KILL="k"\nACTION="a","/bin/true"\n{line}\n')
            assert isinstance(err, ConfigError) and str(err).startswith(f"{NAME}:3: "), line
    err = judge(parser, raw=b'KILL="k"\nACTION="a","/bin/true"\n# caf\xe9\n')
    assert str(err).endswith(f"/{NAME}:3: not valid UTF-8"), err  # the file as given
    assert not isinstance(judge(parser, "\n".join(BASE)), ConfigError)  # the base is valid


# -- the real program ------------------------------------------------------------------


@pytest.fixture(scope="module")
def REAL(tally) -> dict:
    """Runs of the real program; at the end of the session: some ran, none crashed."""
    return tally.section(
        "config files",
        runs=0,
        crashes=0,
        render=lambda t: (
            f"config files through ostiary-handle: {t['runs']} runs, {t['crashes']} crashes"
        ),
        check=lambda t: t["runs"] > 0 and t["crashes"] == 0,
    )


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="ostiary-adv-cfg-", dir="/tmp"))
    (d / "state").mkdir()
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


@settings(max_examples=40, **SETTINGS)
@given(text=st.one_of(mutated(), grammar), check=st.sampled_from((False, False, True)))
def test_the_handler_logs_one_fatal_line_for_a_bad_config_and_sends_nothing(
    scratch, parser, REAL, tally, text, check
):
    TOTALS = tally.totals
    REAL["runs"] += 1
    cfg = scratch / NAME
    for p in (scratch / "state").iterdir():  # a fresh store: no lockout from earlier runs
        p.unlink()
    # Point any store at the scratch directory; run nothing (no right answer is ever sent).
    cfg.write_text(
        re.sub(r"(?m)^LOCKOUT_ACTION=.*$", "", text) + f"\nLOCKOUT_DB={scratch}/state/lockout.cdb\n"
    )
    with open(cfg, newline="") as f:  # as the handler reads it: a CR stays a CR
        expected = judge(parser, f.read(), total=False, name=str(cfg))  # counted below, as a run
    argv = [project_tool("ostiary-handle"), "-c", str(cfg)]
    env = {"PATH": os.environ["PATH"], "TCPREMOTEIP": "127.0.0.1"}
    if check:
        proc = subprocess.run(
            [*argv, "--check"], stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=20
        )
        got = b""
    else:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.shutdown(socket.SHUT_WR)  # a client that hangs up at once: no waiting
            proc = subprocess.run(
                argv, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, env=env, timeout=20
            )
            theirs.close()
            ours.settimeout(5)
            got = read_to_eof(ours)
    err = proc.stderr.decode(errors="replace")
    TOTALS["inputs"] += 1
    TOTALS["connections"] += not check
    if "Traceback" in err or proc.returncode not in (0, 111):
        REAL["crashes"] += 1
        TOTALS["crashes"] += 1
    assert "Traceback" not in err and proc.returncode in (0, 111), err
    if isinstance(expected, ConfigError):
        assert proc.returncode == 111
        assert err == f"ostiary-handle: fatal: {expected}\n"
        assert got == b""
    elif not check:
        assert proc.returncode == 0 and len(got) == SALT_LEN, err
