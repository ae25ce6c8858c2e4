"""ostiary-tcpserver -F: the forked child gets what the exec'd program gets, and serves the same."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import project_tool
from kit.procs import wait_for
from kit.site import KILL, OPEN, Rig
from kit.wire import SALT_LEN, knock

from ostiary_ucspi.policy import STOPPED

RECORDER = textwrap.dedent('''\
    """Writes what it was started with to the file named by argv[1]."""
    import json, os, sys

    def main(argv):
        status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines()
                      if ":\\t" in line)
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        kinds = {fd: os.readlink(f"/proc/self/fd/{fd}").split(":")[0] for fd in (0, 1, 2)}
        with open(argv[1], "w") as f:
            json.dump({"argv": argv[2:], "env": dict(os.environ), "fds": fds, "kinds": kinds,
                       "sigign": status["SigIgn"], "sigblk": status["SigBlk"],
                       "cwd": os.getcwd(), "umask": os.umask(0)}, f)
        return 0

    if __name__ == "__main__":
        sys.exit(main(sys.argv))
''')


def clean_signals() -> None:
    """Start the server as init would: every signal at its default, none blocked."""
    for sig in signal.valid_signals():
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


@contextmanager
def shim(
    *args: str, env: dict[str, str], log: Path, preexec: Callable[[], None] = clean_signals
) -> Iterator[int]:
    """Run ostiary-tcpserver -1 ... on 127.0.0.1 (``preexec`` run first); yield its port."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [project_tool("ostiary-tcpserver"), "-1", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            preexec_fn=preexec,
        )
    try:
        port = int(proc.stdout.readline())
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def recorded(
    tmp_path: Path,
    fork: bool,
    preexec: Callable[[], None] = clean_signals,
    lookups: str = "-Hrl0",
) -> dict:
    """What the recorder saw of one connection, started by exec or by -F.

    ``lookups``: -F with ``-HRl0`` has the parent prepare the connection, with
    ``-Hrl0`` (an ident look-up) the child does it all.
    """
    (tmp_path / "recorder.py").write_text(RECORDER)
    script = tmp_path / "recorder"
    script.write_text(f"#!{sys.executable}\n" + RECORDER)
    script.chmod(0o755)
    out = tmp_path / ("fork.json" if fork else "exec.json")
    # LC_ALL set: an exec'd Python adds no LC_CTYPE of its own (PEP 538 coercion).
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(tmp_path),
        "ODD": "a b\tc",
        "LC_ALL": "C.UTF-8",
        "TCPREMOTEHOST": "left over",  # -H: the program must not see it
    }
    # -r (ident, refused at once on loopback) keeps the exec'd program off the posix_spawn
    # path, whose glibc leaves its internal signals 32 and 33 ignored in the program.
    flags = [lookups, "-t1", "-x", str(rules(tmp_path))] + (["-F", "recorder"] if fork else [])
    with shim(
        *flags,
        "127.0.0.1",
        "0",
        str(script),
        str(out),
        "extra arg",
        env=env,
        log=tmp_path / "log",
        preexec=preexec,
    ) as port:
        knock(port)
        wait_for(out.exists, 10, "the recorder")
        time.sleep(0.1)
    return json.loads(out.read_text())


def rules(tmp_path: Path) -> Path:
    """A rules CDB that sets a variable, as tcprules would."""
    cdb = tmp_path / "rules.cdb"
    subprocess.run(
        [project_tool("ostiary-tcprules"), str(cdb), str(tmp_path / "rules.tmp")],
        input=b':allow,RULEVAR="from the rules"\n',
        check=True,
    )
    return cdb


@pytest.mark.parametrize("lookups", ["-Hrl0", "-HRl0"], ids=["child-prepares", "parent-prepares"])
def test_the_forked_child_gets_what_the_exec_d_program_gets(tmp_path: Path, lookups: str) -> None:
    by_exec, by_fork = recorded(tmp_path, False), recorded(tmp_path, True, lookups=lookups)
    for seen in (by_exec, by_fork):
        for name in ("TCPREMOTEPORT", "TCPLOCALPORT"):  # two servers, two connections
            seen["env"].pop(name)
    assert by_fork == by_exec
    assert by_fork["env"]["RULEVAR"] == "from the rules" and by_fork["env"]["ODD"] == "a b\tc"
    assert by_fork["argv"] == ["extra arg"] and "TCPREMOTEHOST" not in by_fork["env"]
    assert by_fork["kinds"]["0"] == by_fork["kinds"]["1"] == "socket"
    assert int(by_fork["sigblk"], 16) == 0


@pytest.mark.parametrize("lookups", ["-Hrl0", "-HRl0"], ids=["child-prepares", "parent-prepares"])
def test_the_listening_socket_is_not_inherited(tmp_path: Path, lookups: str) -> None:
    seen = recorded(tmp_path, True, lookups=lookups)
    assert seen["fds"][:3] == [0, 1, 2] and len(seen["fds"]) == 4  # the listdir's own
    ignored = {n + 1 for n in range(64) if int(seen["sigign"], 16) >> n & 1}
    assert ignored == {signal.SIGPIPE, signal.SIGXFSZ}  # as a starting Python sets them


def test_a_server_started_with_signals_ignored_and_blocked_passes_on_neither(
    tmp_path: Path,
) -> None:
    def nohup_and_block() -> None:  # nohup, from a shell with &, and a blocked signal
        clean_signals()
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR2, signal.SIGWINCH))

    seen = recorded(tmp_path, True, nohup_and_block, lookups="-HRl0")
    ignored = {n + 1 for n in range(64) if int(seen["sigign"], 16) >> n & 1}
    assert ignored == {signal.SIGPIPE, signal.SIGXFSZ}
    assert int(seen["sigblk"], 16) == 0


def test_a_connection_the_rules_deny_is_logged_by_its_child_under_f(tmp_path: Path) -> None:
    """-F -HRl0: a denied connection is left to the child, which logs and exits as tcpserver's."""
    (tmp_path / "recorder.py").write_text(RECORDER)
    cdb = tmp_path / "rules.cdb"
    subprocess.run(
        [project_tool("ostiary-tcprules"), str(cdb), str(tmp_path / "rules.tmp")],
        input=b"127.0.0.7:deny\n:allow\n",
        check=True,
    )
    out, log = tmp_path / "seen.json", tmp_path / "log"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    with shim(
        "-v",
        "-HRl0",
        "-x",
        str(cdb),
        "-F",
        "recorder",
        "127.0.0.1",
        "0",
        "recorder",
        str(out),
        env=env,
        log=log,
    ) as port:
        assert knock(port, source="127.0.0.7") == b""
        wait_for(lambda: "status 25600" in log.read_text(), 10, "the denied child's end")
        knock(port, source="127.0.0.8")
        wait_for(out.exists, 10, "the allowed connection's recorder")
    lines = log.read_text().splitlines()
    denied = [line for line in lines if line.startswith("tcpserver: deny ")]
    assert len(denied) == 1 and ":127.0.0.7::" in denied[0]
    allowed = [line for line in lines if line.startswith("tcpserver: ok ")]
    assert len(allowed) == 1 and ":127.0.0.8::" in allowed[0]
    assert not out.read_text().count("127.0.0.7")


def test_an_unimportable_module_is_fatal(tmp_path: Path) -> None:
    r = subprocess.run(
        [project_tool("ostiary-tcpserver"), "-F", "no_such_module_here", "127.0.0.1", "0", "true"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.returncode == 111
    assert r.stderr.startswith("ostiary-tcpserver: fatal: unable to import no_such_module_here: ")


@contextmanager
def forking(rig: Rig) -> Iterator[int]:
    """The handler behind ostiary-tcpserver -F, the rig's config; yield the port."""
    with shim(
        "-v",
        "-HRl0",
        "-F",
        "ostiary_ucspi.handle",
        "127.0.0.1",
        "0",
        "ostiary-handle",
        "-c",
        str(rig.cfg),
        env=rig.env(),
        log=rig.log,
    ) as port:
        yield port


def test_a_config_edit_is_seen_at_the_next_connection(rig: Rig) -> None:
    with forking(rig) as port:
        assert len(knock(port, OPEN)) == SALT_LEN
        rig.wait_runs("open")
        rig.action("other")
        rig.write_config('ACTION="a-new-passphrase-here","%s/other"' % rig.bin)
        assert len(knock(port, b"a-new-passphrase-here")) == SALT_LEN
        rig.wait_runs("other")


def test_lockout_kill_actions_undo_and_32_bytes_only(rig: Rig) -> None:
    rig.action("undo")
    rig.write_config(open_action=False)
    rig.cfg.write_text(
        f'ACTION="{OPEN.decode()}","{rig.bin}/open"\nUNDO=1,"{rig.bin}/undo"\n'
        + rig.cfg.read_text()
    )
    with forking(rig) as port:
        for _ in range(3):  # wrong, far too long: only 32 bytes come back, ever
            got = knock(port, response_bytes=b"w" * 100)
            assert len(got) == SALT_LEN
        assert knock(port, OPEN) == b""  # locked out: closed at once
        rig.wait_log("locked out after 3 bad connections")
        got = knock(port, OPEN, source="127.0.0.2")
        assert len(got) == SALT_LEN
        rig.wait_runs("open")
        rig.wait_runs("undo")  # the door closes under -F too
        assert len(knock(port, KILL, source="127.0.0.3")) == SALT_LEN
        wait_for(lambda: rig.store_view().get(STOPPED), 10, "the stopped state")
        assert knock(port, OPEN, source="127.0.0.4") == b""
    assert os.path.exists(rig.db)
