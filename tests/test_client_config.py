"""ostiary-client's command line, named targets (client.conf), --secret-command, exit statuses."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from kit.servers import unused_port
from test_client import fatal, run_client, secret_file, serve  # noqa: F401 (serve: a fixture)

from ostiary_ucspi import __version__, client
from ostiary_ucspi.protocol import response

# --- exit statuses and help ---------------------------------------------------


def test_exits_are_every_status_and_the_docstring_lists_them_all():
    constants = {v for k, v in vars(client).items() if k.startswith("EXIT_")}
    assert set(client.EXITS) == constants | {0}
    listed = client.__doc__.split("Exit status:\n", 1)[1]
    assert [int(x) for x in re.findall(r"^  (\d+) ", listed, re.M)] == sorted(client.EXITS)
    for code, meaning in client.EXITS.items():
        block = re.search(rf"^  {code} +(.*?)(?=^  \d|^\S|\Z)", listed, re.M | re.S).group(1)
        assert " ".join(block.split()) == meaning, code


def test_help_and_version():
    helped = run_client("--help")
    assert (helped.returncode, helped.stderr) == (0, "")
    assert helped.stdout.startswith("ostiary-client: usage: ostiary-client -a host[:port]")
    assert "--connect [host:]port" in helped.stdout and "client.conf" in helped.stdout
    version = run_client("--version")
    assert (version.returncode, version.stdout) == (0, f"ostiary-client {__version__}\n")


# --- the command line ---------------------------------------------------------


def fields(opts: client.Options) -> dict:
    return {k: v for k, v in vars(opts).items() if k != "secret"}


OLD = {
    "host": "h",
    "port": 7050,
    "numeric": False,
    "source": "",
    "fd": 0,
    "secret_file": "",
    "secret_command": "",
    "timeout": 10.0,
    "wait": 10.0,
    "mode": "knock",
    "door": None,
    "verbose": False,
}


@pytest.mark.parametrize(
    "argv, changes",
    [
        (["-a", "h:7050"], {}),
        (["-ah:7050"], {}),
        (["-a", "h", "-p", "7050"], {}),
        (["-p7050", "-ah"], {}),
        (["-vf3", "-a", "h:7050"], {"verbose": True, "source": "-f", "fd": 3}),
        (["-a", "h:7050", "-f", "0"], {"source": "-f"}),
        (["-a", "h:7050", "--secret-file", "/s"], {"source": "--secret-file", "secret_file": "/s"}),
        (["-a", "h:7050", "--secret-file=/s"], {"source": "--secret-file", "secret_file": "/s"}),
        (["-a", "h:7050", "--time", "2.5"], {"timeout": 2.5}),
        (["-a", "[::1]:7050"], {"host": "::1", "numeric": True}),
        (["-a", "::1", "-p", "7050"], {"host": "::1"}),
    ],
)
def test_ostclient_and_earlier_command_lines_parse_as_before(argv, changes):
    assert fields(client.parse_args(argv)) == {**OLD, **changes}


@pytest.mark.parametrize(
    "argv, mode, door",
    [
        (["--connect", "22"], "connect", (None, 22, False)),
        (["--connect=22"], "connect", (None, 22, False)),
        (["--connect", "h:22"], "connect", ("h", 22, False)),
        (["--connect", ":22"], "connect", (None, 22, False)),
        (["--connect", "[::1]:22"], "connect", ("::1", 22, True)),
        (["--connect", "2001:db8::1:22"], "connect", ("2001:db8::1", 22, False)),
        (["--wait-open", "other:80", "--wait", "3"], "wait-open", ("other", 80, False)),
    ],
)
def test_connect_and_wait_open_values(argv, mode, door):
    opts = client.parse_args(["-a", "h:7050", *argv])
    assert (opts.mode, opts.door) == (mode, door)


@pytest.mark.parametrize(
    "argv, text",
    [
        (["--connect"], "--connect needs [host:]port"),
        (["--connect", "22", "--wait-open", "22"], "give one"),
        (["--connect", "h:0"], "bad port"),
        (["--connect", "[::1]"], "no port in --connect"),
        (["--wait", "3"], "--wait says how long"),
        (["--wait-open", "22", "--wait", "0"], "positive number of seconds"),
        (["-f", "0", "--secret-command", "true"], "both name a passphrase"),
        (["--config", "/x"], "name a TARGET too"),
        (["--se", "x"], "not a unique prefix"),
        (["a", "b"], "unexpected argument 'b'"),
    ],
)
def test_new_usage_errors(argv, text):
    proc = run_client("-a", "h:7050", *argv)
    assert proc.returncode == client.EXIT_USAGE
    assert text in fatal(proc, "usage")


# --- --secret-command ---------------------------------------------------------


def test_secret_command_first_line_is_the_passphrase(serve):
    srv = serve()
    # stdin is /dev/null: cat reads nothing of ours; the second line is ignored.
    proc = run_client(
        "-v",
        "-a",
        srv.addr,
        "--secret-command",
        "cat; printf 'pw word \\r\\nnext\\n'",
        input="not for the command\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert "pw word" not in proc.stderr and "next" not in proc.stderr
    assert srv.answered() == [response(b"pw word", srv.salt)]


@pytest.mark.parametrize(
    "command, why",
    [
        ("echo pw; exit 3", "exited with status 3"),
        ("kill -TERM $$", "was killed by signal 15"),
        ("true", "printed nothing"),
        ("/no/such/program", "exited with status 127"),
    ],
)
def test_secret_command_failures(serve, command, why):
    srv = serve()
    proc = run_client("-a", srv.addr, "--secret-command", command)
    assert proc.returncode == client.EXIT_COMMAND
    assert proc.stdout == ""
    # The command's own complaints (sh: not found) come first, on the same stderr.
    assert (
        proc.stderr.splitlines()[-1]
        == f"ostiary-client: fatal: the secret command {command!r} {why}"
    )
    assert srv.peers == []


def test_secret_command_with_an_empty_first_line_is_an_empty_passphrase(serve):
    srv = serve()
    proc = run_client("-a", srv.addr, "--secret-command", "printf '\\nsecond\\n'")
    assert proc.returncode == client.EXIT_SECRET
    assert "empty passphrase" in fatal(proc)


# --- named targets --------------------------------------------------------------


def write_conf(home: Path, text: str, mode: int = 0o600) -> Path:
    path = home / "ostiary" / "client.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def as_user(home: Path, *args: str, **kw):
    """Run the client with $XDG_CONFIG_HOME = home."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(home), "XDG_CONFIG_DIRS": str(home / "none")}
    return run_client(*args, env=env, **kw)


def test_a_target_knocks_with_its_stanza(serve, tmp_path):
    srv = serve()
    secret = secret_file(tmp_path, b"from the file\n")
    write_conf(
        tmp_path,
        f"# mine\n[other]\nhost = nowhere.invalid:1\n\n[box]\n"
        f"host = 127.0.0.1\nport = {srv.port}\nsecret-file = {secret}\n",
    )
    proc = as_user(tmp_path, "box")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert srv.answered() == [response(b"from the file", srv.salt)]


def test_the_command_line_overrides_the_stanza(serve, tmp_path):
    srv = serve()
    write_conf(tmp_path, f"[box]\nhost = 127.0.0.1:{unused_port()}\nsecret = inline one\n")
    proc = as_user(tmp_path, "-p", str(srv.port), "box", "-f", "0", input="typed\n")
    assert proc.returncode == 0, proc.stderr
    assert srv.answered() == [response(b"typed", srv.salt)]


def test_an_inline_secret_in_a_private_file(serve, tmp_path):
    srv = serve()
    write_conf(tmp_path, f"[box]\nhost = 127.0.0.1:{srv.port}\nsecret = in line # kept\n")
    proc = as_user(tmp_path, "box")
    assert proc.returncode == 0, proc.stderr
    assert srv.answered() == [response(b"in line # kept", srv.salt)]


def test_a_stanza_s_connect_target_and_wait(tmp_path, monkeypatch):
    write_conf(tmp_path, "[box]\nhost = box.example:7000\nconnect = 22\nwait = 3\ntimeout = 2\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "none"))
    opts = client.parse_args(["box", "--connect"])
    assert (opts.host, opts.port, opts.mode, opts.door, opts.wait, opts.timeout) == (
        "box.example",
        7000,
        "connect",
        (None, 22, False),
        3.0,
        2.0,
    )
    assert client.parse_args(["--connect", "box"]).door == (None, 22, False)
    assert client.parse_args(["box", "--wait-open", "2222"]).door == (None, 2222, False)
    assert client.parse_args(["box", "--wait", "9", "--connect"]).wait == 9.0
    assert client.parse_args(["box"]).mode == "knock"


def test_xdg_config_dirs_is_searched_after_the_home(serve, tmp_path):
    srv = serve()
    system = tmp_path / "system"
    write_conf(system, f"[box]\nhost = 127.0.0.1:{srv.port}\n", mode=0o644)
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "empty"),
        "XDG_CONFIG_DIRS": f"relative:{system}",
    }
    proc = run_client("box", "-f", "0", input="pw\n", env=env)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "mode, text",
    [
        (0o620, "its group or others may write it (mode 0620)"),
        (0o602, "its group or others may write it (mode 0602)"),
        (0o640, "it holds a secret inline and its group or others may read it (mode 0640)"),
        (0o604, "it holds a secret inline and its group or others may read it (mode 0604)"),
    ],
)
def test_unsafe_files_are_refused(serve, tmp_path, mode, text):
    srv = serve()
    path = write_conf(tmp_path, f"[box]\nhost = 127.0.0.1:{srv.port}\nsecret = x\n", mode)
    proc = as_user(tmp_path, "box")
    assert proc.returncode == client.EXIT_CONFIG
    assert f"refusing {path}: {text}" in fatal(proc)
    assert srv.peers == []


def test_a_readable_file_without_inline_secrets_is_fine(serve, tmp_path):
    srv = serve()
    write_conf(tmp_path, f"[box]\nhost = 127.0.0.1:{srv.port}\n", 0o644)
    proc = as_user(tmp_path, "box", "-f", "0", input="pw\n")
    assert proc.returncode == 0, proc.stderr


def test_a_file_owned_by_someone_else_is_refused(serve, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root can give a file away")
    path = write_conf(tmp_path, "[box]\nhost = 127.0.0.1:1\n")
    os.chown(path, 65534, 65534)
    proc = as_user(tmp_path, "box", "-f", "0", input="pw\n")
    assert proc.returncode == client.EXIT_CONFIG
    assert "belongs to uid 65534" in fatal(proc)


@pytest.mark.parametrize(
    "text, line, why",
    [
        ("host = h:1\n", 1, "host before any [name] stanza"),
        ("[box]\nhost h:1\n", 2, "expected key = value or [name]"),
        ("[box]\nhots = h:1\n", 2, "unknown key 'hots'"),
        ("[box]\nhost = h:1\nhost = h:2\n", 3, "host given twice in this stanza"),
        ("[box]\n[box]\n", 2, "a second [box] stanza"),
        ("[b x]\n", 1, "bad stanza line"),
        ("[22]\n", 1, "bad stanza line"),
        ("[box]\nhost = h:0\n", 2, "bad port '0'"),
        ("[box]\nhost = h:1\nport = 2\n", 3, "two different ports: 1 in host, 2 in port"),
        ("[box]\nconnect = [::1]\n", 2, "no port in connect"),
        ("[box]\nwait = never\n", 2, "wait takes a positive number of seconds"),
        (
            "[box]\nsecret-file = relative\n",
            2,
            "secret-file must be an absolute path or start with ~/",
        ),
        ("[box]\nsecret = x\nsecret-command = y\n", 3, "secret-command and secret both name"),
        ("[box]\nsecret =\n", 2, "secret is empty"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path, text, line, why):
    path = write_conf(tmp_path, text)
    proc = as_user(tmp_path, "box", "-f", "0", input="pw\n")
    assert proc.returncode == client.EXIT_CONFIG
    assert fatal(proc).startswith(f"ostiary-client: fatal: {path}:{line}: {why}")


def test_an_unknown_target_is_a_usage_error(tmp_path):
    path = write_conf(tmp_path, "[box]\nhost = h:1\n")
    proc = as_user(tmp_path, "boxx")
    assert proc.returncode == client.EXIT_USAGE
    assert f"no target 'boxx': {path} has no [boxx] stanza" in fatal(proc, "usage")
    none = as_user(tmp_path / "nothing", "box")
    assert none.returncode == client.EXIT_USAGE
    assert "there is no" in fatal(none, "usage")


def test_a_broken_file_does_not_touch_plain_command_lines(serve, tmp_path):
    srv = serve()
    write_conf(tmp_path, "garbage\n", 0o666)
    proc = as_user(tmp_path, "-a", srv.addr, "-f", "0", input="pw\n")
    assert proc.returncode == 0, proc.stderr
