"""ostiary-client: the wire protocol, the terminal prompt, passphrase sources,
every exit status, address parsing, and round trips against the real handler.

All but the last section use a tiny in-test server (:class:`FakeServer`) on
loopback, which records what the client sends; the client always runs as a
real process, and without a controlling terminal unless pexpect gives it one.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pexpect
import pytest
from conftest import project_tool, require_tool
from kit.servers import closed_port, listen, stop
from kit.vectors import OSTIARY

from ostiary_ucspi import client
from ostiary_ucspi.protocol import response

PROMPT = "Enter command secret: "
VECTOR_SALT, VECTOR_RESPONSE = OSTIARY.msg, OSTIARY.digest  # the real ostclient's answer
EXIT_CODES = {name: value for name, value in vars(client).items() if name.startswith("EXIT_")}


def client_path() -> str:
    """The installed ostiary-client command."""
    return project_tool("ostiary-client")


def wait_stopped(pid: int) -> None:
    """Wait until process ``pid`` is stopped by a signal."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never stopped")


class FakeServer:
    """A loopback server thread that plays one part for every connection.

    ``ostiary``  send the salt, record up to 32 bytes of answer, close.
    ``close``    close at once, as for a locked-out or denied address.
    ``partial``  send 10 bytes of salt, then hang until the test ends.
    ``reset``    when the test sets ``go``, send the salt and reset the
                 connection, then set ``sent``.
    """

    def __init__(
        self, mode: str = "ostiary", host: str = "127.0.0.1", salt: bytes | None = None
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.mode = mode
        self.salt = os.urandom(32) if salt is None else salt
        self.peers: list[str] = []
        self.answers: list[bytes] = []
        self.stop = threading.Event()
        self.go = threading.Event()
        self.sent = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                self.peers.append(peer[0])
                if self.mode == "ostiary":
                    conn.sendall(self.salt)
                    answer = b""
                    while len(answer) < 32:
                        chunk = conn.recv(32 - len(answer))
                        if not chunk:
                            break
                        answer += chunk
                    self.answers.append(answer)
                elif self.mode == "partial":
                    conn.sendall(self.salt[:10])
                    self.stop.wait()
                elif self.mode == "reset" and self.go.wait(10):
                    conn.sendall(self.salt)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    self.sent.set()

    def answered(self, count: int = 1) -> list[bytes]:
        """Wait until ``count`` answers are recorded (the client may exit first); return all."""
        deadline = time.monotonic() + 10
        while len(self.answers) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.answers

    @property
    def addr(self) -> str:
        host = self.listener.getsockname()[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def serve():
    """Start FakeServers; stop them all when the test ends."""
    made: list[FakeServer] = []

    def start(mode: str = "ostiary", host: str = "127.0.0.1", salt: bytes | None = None):
        made.append(FakeServer(mode, host, salt))
        return made[-1]

    yield start
    for server in made:
        server.close()


@pytest.fixture
def ipv6() -> None:
    """Skip when this machine has no IPv6 loopback."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback (::1) here")


def run_client(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run ostiary-client in a new session: no controlling terminal, so it never prompts."""
    return subprocess.run(
        [client_path(), *args],
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
        **kw,
    )


def run_shell(script: str, *args: str, **kw) -> subprocess.CompletedProcess:
    """Run ``sh -c script`` with $0 = ostiary-client and $1... = args, as a user's script would."""
    return subprocess.run(
        ["sh", "-c", script, client_path(), *args],
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
        **kw,
    )


def secret_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> str:
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(mode)
    return str(path)


def fatal(proc: subprocess.CompletedProcess, kind: str = "fatal") -> str:
    """Check that a failure printed exactly one ``kind`` line, and return it."""
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"ostiary-client: {kind}: "), proc.stderr
    return proc.stderr


# --- the wire protocol ------------------------------------------------------


def test_sends_the_protocol_test_vector(serve, tmp_path):
    srv = serve(salt=VECTOR_SALT)
    proc = run_client("-a", srv.addr, "--secret-file", secret_file(tmp_path, OSTIARY.key + b"\n"))
    assert proc.returncode == 0, proc.stderr
    assert srv.answered() == [VECTOR_RESPONSE]


def test_success_is_silent_and_verbose_shows_hex_never_the_passphrase(serve, tmp_path):
    srv = serve()
    path = secret_file(tmp_path, b"correct horse\n")
    quiet = run_client("-a", srv.addr, "--secret-file", path)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    loud = run_client("-v", "-a", srv.addr, "--secret-file", path)
    assert loud.returncode == 0 and loud.stdout == ""
    assert srv.salt.hex() in loud.stderr
    assert response(b"correct horse", srv.salt).hex() in loud.stderr
    assert "horse" not in loud.stderr
    assert "never say whether it was accepted" in loud.stderr


# --- the terminal prompt ----------------------------------------------------


def test_prompt_hides_the_passphrase(serve):
    srv = serve()
    typed = "hunter2 ünï ".encode()  # as typed: UTF-8, trailing space kept
    child = pexpect.spawn(client_path(), ["-a", srv.addr], timeout=10)
    child.expect_exact(PROMPT)
    child.sendline(typed)
    child.expect(pexpect.EOF)
    child.close()
    assert child.before.strip() == b""  # nothing after the prompt but its newline
    assert child.exitstatus == 0
    assert srv.answered() == [response(typed, srv.salt)]
    assert srv.peers == ["127.0.0.1"]


def test_the_echo_check_sees_an_echoing_prompt():
    """Control for the test above: the same check catches a prompt that echoes."""
    child = pexpect.spawn(sys.executable, ["-c", f"input({PROMPT!r})"], timeout=10)
    child.expect_exact(PROMPT)
    child.sendline(b"hunter2")
    child.expect(pexpect.EOF)
    assert b"hunter2" in child.before


def test_prompt_reads_the_terminal_not_stdin(serve):
    srv = serve()
    child = pexpect.spawn(
        "sh", ["-c", 'echo wrong | exec "$0" -a "$1"', client_path(), srv.addr], timeout=10
    )
    child.expect_exact(PROMPT)
    child.sendline(b"right")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert srv.answered() == [response(b"right", srv.salt)]


def at_a_terminal() -> None:
    """SIGINT at its default, as a shell at a terminal starts a command.

    Under nohup or ``&`` the suite itself ignores SIGINT, and a shell that
    starts with SIGINT ignored may not trap it: ^C would reach nobody.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_at_the_prompt_restores_echo(serve):
    srv = serve()
    script = 'trap : INT; "$0" -a "$1"; echo "status=$?"; stty -a'
    child = pexpect.spawn(
        "sh", ["-c", script, client_path(), srv.addr], timeout=10, preexec_fn=at_a_terminal
    )
    child.expect_exact(PROMPT)
    child.sendintr()
    child.expect(r"status=(\d+)")
    assert int(child.match.group(1)) == client.EXIT_INTERRUPTED
    child.expect(pexpect.EOF)
    assert re.search(rb"(?<![-\w])echo(?!\w)", child.before), child.before
    assert srv.peers == []


def test_no_terminal_and_no_source_is_refused(serve):
    srv = serve()
    proc = run_client("-a", srv.addr)
    assert proc.returncode == client.EXIT_SECRET
    assert "--secret-file" in fatal(proc)
    assert srv.peers == []


# --- -f and --secret-file ---------------------------------------------------


def test_fd_3_strips_trailing_whitespace(serve, tmp_path):
    srv = serve()
    path = secret_file(tmp_path, b"pass phrase \t\r\n")
    proc = run_shell('exec "$0" -a "$1" -f 3 3<"$2"', srv.addr, path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert srv.answered() == [response(b"pass phrase", srv.salt)]


def test_fd_0_from_a_pipe_reads_no_further_than_the_newline(serve):
    srv = serve()
    proc = run_shell('"$0" -a "$1" -f 0 && cat', srv.addr, input="first\nsecond\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "second\n"
    assert srv.answered() == [response(b"first", srv.salt)]


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o620])
def test_secret_file_readable_by_owner_only(serve, tmp_path, mode):
    srv = serve()
    proc = run_client("-a", srv.addr, "--secret-file", secret_file(tmp_path, b"s3cret\r\n", mode))
    assert proc.returncode == 0, proc.stderr
    assert srv.answered() == [response(b"s3cret", srv.salt)]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_secret_file_readable_by_others_is_refused(serve, tmp_path, mode):
    srv = serve()
    proc = run_client("-a", srv.addr, "--secret-file", secret_file(tmp_path, b"s3cret\n", mode))
    assert proc.returncode == client.EXIT_SECRET
    assert f"readable by its group or by others (mode {mode:04o})" in fatal(proc)
    assert srv.peers == []


def test_missing_secret_file(serve, tmp_path):
    srv = serve()
    proc = run_client("-a", srv.addr, "--secret-file", str(tmp_path / "nope"))
    assert proc.returncode == client.EXIT_SECRET
    assert "No such file" in fatal(proc)
    assert srv.peers == []


def test_unreadable_descriptor(serve):
    srv = serve()
    proc = run_client("-a", srv.addr, "-f", "7")
    assert proc.returncode == client.EXIT_SECRET
    assert "descriptor 7" in fatal(proc)
    assert srv.peers == []


@pytest.mark.parametrize("given", ["", "\n", " \t\r\n"])
def test_empty_passphrase_is_refused(serve, given):
    srv = serve()
    proc = run_client("-a", srv.addr, "-f", "0", input=given)
    assert proc.returncode == client.EXIT_SECRET
    assert "empty passphrase" in fatal(proc)
    assert srv.peers == []


def test_long_passphrase_has_no_64_byte_limit(serve, tmp_path):
    srv = serve()
    secret = ("ж" * 150 + "end").encode()
    proc = run_client("-a", srv.addr, "--secret-file", secret_file(tmp_path, secret + b"\n"))
    assert proc.returncode == 0, proc.stderr
    assert srv.answered() == [response(secret, srv.salt)]


# --- failures and their exit statuses ---------------------------------------


def test_exit_statuses_are_distinct_and_documented():
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)
    proc = run_client("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    for code in EXIT_CODES.values():
        assert re.search(rf"^  {code} ", proc.stdout, re.M), code


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-a"],
        ["-a", "host"],
        ["-a", "host:"],
        ["-a", "host:0"],
        ["-a", "host:65536"],
        ["-a", "host:http"],
        ["-a", "host:7050", "-p", "7051"],
        ["-a", "host:7050", "-a", "other:7050"],
        ["-a", "host", "-p", "1", "-p", "1"],
        ["-a", "[::1:7050"],
        ["-a", "[::1]7050"],
        ["-a", "[]:7050"],
        ["-a", "host:7050", "-f", "x"],
        ["-a", "host:7050", "-f", "0", "--secret-file", "/dev/null"],
        ["-a", "host:7050", "--timeout", "0"],
        ["-a", "host:7050", "--timeout", "nan"],
        ["-a", "host:7050", "--timeout", "soon"],
        ["-a", "host:7050", "extra"],
        ["-a", "host:7050", "--passphrase", "x"],
    ],
)
def test_usage_errors(args):
    proc = run_client(*args)
    assert proc.returncode == client.EXIT_USAGE
    assert "usage: ostiary-client -a host[:port]" in fatal(proc, "usage")


def test_nothing_listening_is_refused():
    with closed_port() as port:
        proc = run_client("-a", "127.0.0.1", "-p", str(port), "-f", "0", input="pw\n")
    assert proc.returncode == client.EXIT_REFUSED
    assert f"127.0.0.1 port {port}: connection refused" in fatal(proc)


def test_server_that_closes_at_once(serve):
    srv = serve("close")
    proc = run_client("-a", srv.addr, "-f", "0", input="pw\n")
    assert proc.returncode == client.EXIT_CLOSED
    line = fatal(proc)
    assert "after 0 of 32 salt bytes" in line and "locked out" in line
    assert srv.peers == ["127.0.0.1"]


def test_server_that_sends_10_bytes_and_hangs(serve):
    srv = serve("partial")
    started = time.monotonic()
    proc = run_client("-a", srv.addr, "--timeout", "0.5", "-f", "0", input="pw\n")
    assert proc.returncode == client.EXIT_TIMEOUT
    assert "got 10 of 32 bytes" in fatal(proc)
    assert time.monotonic() - started < 5


def test_connect_timeout():
    """A listener whose accept queue is full drops SYNs: the connect hangs."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        port = listener.getsockname()[1]
        started = time.monotonic()
        proc = run_client("-a", f"127.0.0.1:{port}", "--timeout", "0.5", "-f", "0", input="pw\n")
    assert proc.returncode == client.EXIT_TIMEOUT
    assert "timed out after 0.5 seconds" in fatal(proc)
    assert 0.4 < time.monotonic() - started < 5


def test_send_fails_when_the_server_resets_after_the_salt(serve):
    """The client is stopped once connected; meanwhile the salt arrives with a reset."""
    srv = serve("reset")
    proc = subprocess.Popen(
        [client_path(), "-v", "-a", srv.addr, "-f", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        proc.stdin.write("pw\n")
        proc.stdin.close()
        assert "info: connected to" in proc.stderr.readline()
        os.kill(proc.pid, signal.SIGSTOP)
        wait_stopped(proc.pid)
        srv.go.set()
        assert srv.sent.wait(10)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    err = proc.stderr.read()
    assert proc.wait(30) == client.EXIT_SEND
    assert err.splitlines()[-1].startswith("ostiary-client: fatal: unable to send the response")


@pytest.mark.parametrize("address", ["[no-such-address]:7050", "bad..name:7050"])
def test_cannot_resolve(address):
    """Both fail before any DNS query is sent: only loopback traffic in tests."""
    proc = run_client("-a", address, "-f", "0", input="pw\n")
    assert proc.returncode == client.EXIT_RESOLVE
    fatal(proc)


def test_resolution_fails_before_the_prompt():
    child = pexpect.spawn(client_path(), ["-a", "[no-such-address]:7050"], timeout=10)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == client.EXIT_RESOLVE
    assert PROMPT.encode() not in child.before


def test_denied_by_real_tcprules(tmp_path):
    tcpserver = require_tool("tcpserver")
    tcprules = require_tool("tcprules")
    rules = tmp_path / "rules.cdb"
    subprocess.run(
        [tcprules, str(rules), str(tmp_path / "rules.tmp")], input=b":deny\n", check=True
    )
    server = subprocess.Popen(
        [tcpserver, "-1", "-H", "-R", "-l0", "-x", str(rules), "127.0.0.1", "0", "true"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = int(server.stdout.readline())
        proc = run_client("-a", f"127.0.0.1:{port}", "-f", "0", input="pw\n")
    finally:
        server.kill()
        server.wait()
    assert proc.returncode == client.EXIT_CLOSED
    assert "denied by its rules" in fatal(proc)


# --- addresses --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("host.example:7050", ("host.example", 7050, False)),
        ("host.example", ("host.example", None, False)),
        ("10.0.0.1:22", ("10.0.0.1", 22, False)),
        ("[::1]:7000", ("::1", 7000, True)),
        ("[::1]", ("::1", None, True)),
        ("[127.0.0.1]:7000", ("127.0.0.1", 7000, True)),
        ("::1", ("::1", None, False)),
        ("fe80::1%eth0", ("fe80::1%eth0", None, False)),
        ("2001:db8::7", ("2001:db8::7", None, False)),
    ],
)
def test_split_address(text, expected):
    assert client.split_address(text) == expected


def test_host_name_with_separate_port(serve):
    srv = serve()
    proc = run_client("-a", "localhost", "-p", str(srv.port), "-f", "0", input="pw\n")
    assert proc.returncode == 0, proc.stderr
    assert srv.answered() == [response(b"pw", srv.salt)]


def test_same_port_in_both_places_is_fine(serve):
    srv = serve()
    proc = run_client("-p", str(srv.port), "-a", srv.addr, "-f", "0", input="pw\n")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("form", ["bracketed", "separate"])
def test_ipv6_loopback(serve, ipv6, form):
    srv = serve(host="::1")
    where = (
        ["-a", f"[::1]:{srv.port}"] if form == "bracketed" else ["-a", "::1", "-p", str(srv.port)]
    )
    proc = run_client(*where, "-f", "0", input="pw\n")
    assert proc.returncode == 0, proc.stderr
    assert srv.answered() == [response(b"pw", srv.salt)]
    assert srv.peers == ["::1"]


def fake_addresses(monkeypatch, ports: list[int]) -> None:
    """Make every name resolve to 127.0.0.1 at each of ``ports``, in order."""
    infos = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p)) for p in ports]
    monkeypatch.setattr(client.socket, "getaddrinfo", lambda *a, **k: infos)


def passphrase_fd(text: bytes) -> int:
    rfd, wfd = os.pipe()
    os.write(wfd, text)
    os.close(wfd)
    return rfd


def knock_fake_name() -> int:
    """Run the client on knock.test:7050 (see fake_addresses), passphrase 'pw' on a pipe."""
    fd = passphrase_fd(b"pw\n")
    try:
        return client.main(["ostiary-client", "-a", "knock.test:7050", "-f", str(fd)])
    finally:
        os.close(fd)


def test_tries_each_address_in_turn(serve, monkeypatch, capsys):
    srv = serve()
    with closed_port() as dead:
        fake_addresses(monkeypatch, [dead, srv.port])
        rc = knock_fake_name()
    assert rc == 0, capsys.readouterr().err
    assert srv.answered() == [response(b"pw", srv.salt)]


def test_every_address_failing_is_reported_in_one_line(monkeypatch, capsys):
    with closed_port() as dead1, closed_port() as dead2:
        fake_addresses(monkeypatch, [dead1, dead2])
        rc = knock_fake_name()
    err = capsys.readouterr().err
    assert rc == client.EXIT_REFUSED
    assert err.count("\n") == 1
    assert err.count("127.0.0.1: connection refused") == 2


class UnreachableSocket(socket.socket):
    """A socket whose connect() fails as it does without a route to the host."""

    def connect(self, address):
        raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))


def test_other_connect_errors_and_the_last_address_decides(monkeypatch, capsys):
    real = client.socket.socket
    made = []

    def second_unreachable(*args):
        made.append(args)
        return (real if len(made) == 1 else UnreachableSocket)(*args)

    with closed_port() as dead1, closed_port() as dead2:
        fake_addresses(monkeypatch, [dead1, dead2])
        monkeypatch.setattr(client.socket, "socket", second_unreachable)
        rc = knock_fake_name()
    err = capsys.readouterr().err
    assert rc == client.EXIT_CONNECT
    assert "127.0.0.1: connection refused; 127.0.0.1: Network is unreachable" in err


def test_nonblocking_empty_descriptor_is_an_error_not_a_short_passphrase(serve):
    srv = serve()
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    try:
        proc = run_client("-a", srv.addr, "-f", str(rfd), pass_fds=(rfd,))
    finally:
        os.close(rfd)
        os.close(wfd)
    assert proc.returncode == client.EXIT_SECRET
    assert f"descriptor {rfd}" in fatal(proc)
    assert srv.peers == []


# --- round trips against the real handler behind a ucspi server -------------
def write_config(tmp_path: Path, extra: str = "") -> Path:
    """A config with two actions, each writing '$# $*' to its own file."""
    lines = ['KILL="stop the knocker"']
    for name, secret in (("a", "open sesame"), ("b", "second secret")):
        script = tmp_path / f"action-{name}"
        out = tmp_path / f"argv-{name}"
        script.write_text(f'#!/bin/sh\necho "$# $*" > {out}.tmp && mv {out}.tmp {out}\n')
        script.chmod(0o700)
        lines.append(f'ACTION="{secret}","{script}",{os.getuid()},{os.getgid()}')
    lines += [f"LOCKOUT_DB={tmp_path}/lockout.cdb", "DELAY=0", extra]
    cfg = tmp_path / "ostiary.cfg"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def wait_for(path: Path, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path.name} never appeared: the action did not run")


@pytest.fixture(params=["tcpserver", "ostiary-tcpserver"])
def ucspi(request, tmp_path):
    """Start the handler behind real tcpserver or our shim; return (address, tmp_path)."""
    procs: list[subprocess.Popen] = []

    def start(extra: str = "", host: str = "127.0.0.1") -> str:
        cfg = write_config(tmp_path, extra)
        handle = [project_tool("ostiary-handle"), "-c", str(cfg)]
        if request.param == "tcpserver":
            argv = [require_tool("tcpserver"), "-1", "-H", "-R", "-l0", host, "0", *handle]
        else:
            argv = [project_tool("ostiary-tcpserver"), "-1", "-H", "-R", "-l0", host, "0", *handle]
        with open(tmp_path / "server.log", "wb") as log:
            proc, port = listen(argv, log, start_new_session=True)
        procs.append(proc)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    yield start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        stop(proc)


def test_handler_round_trip_from_a_script(ucspi, tmp_path):
    addr = ucspi()
    path = secret_file(tmp_path, b"open sesame\n")
    proc = run_shell('exec "$0" -a "$1" -f 3 3<"$2"', addr, path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert wait_for(tmp_path / "argv-a") == "1 127.0.0.1\n"


def test_handler_round_trip_at_the_prompt(ucspi, tmp_path):
    addr = ucspi()
    child = pexpect.spawn(client_path(), ["-a", addr], timeout=10)
    child.expect_exact(PROMPT)
    child.sendline(b"second secret")
    child.expect(pexpect.EOF)
    child.close()
    assert child.before.strip() == b""
    assert child.exitstatus == 0
    assert wait_for(tmp_path / "argv-b") == "1 127.0.0.1\n"


def test_handler_wrong_passphrase_runs_nothing(ucspi, tmp_path):
    addr = ucspi()
    wrong = run_client("-a", addr, "-f", "0", input="open sesame!\n")
    assert wrong.returncode == 0  # delivered: the protocol has no "wrong"
    right = run_client("-a", addr, "-f", "0", input="second secret\n")
    assert right.returncode == 0, right.stderr
    wait_for(tmp_path / "argv-b")
    assert not (tmp_path / "argv-a").exists()


def test_handler_lockout_closes_before_the_salt(ucspi, tmp_path):
    addr = ucspi("MAX_BAD_CONNS=2")
    codes = []
    while client.EXIT_CLOSED not in codes and len(codes) < 6:
        codes.append(run_client("-a", addr, "-f", "0", input="guess\n").returncode)
    assert codes[-1] == client.EXIT_CLOSED, codes
    assert set(codes[:-1]) == {0}
    proc = run_client("-a", addr, "-f", "0", input="open sesame\n")
    assert proc.returncode == client.EXIT_CLOSED
    assert "locked out" in fatal(proc)


@pytest.mark.parametrize("ucspi", ["ostiary-tcpserver"], indirect=True)  # 0.88 is IPv4 only
def test_handler_round_trip_over_ipv6(ucspi, tmp_path, ipv6):
    addr = ucspi(host="::1")
    proc = run_client("-a", addr, "-f", "0", input="open sesame\n")
    assert proc.returncode == 0, proc.stderr
    assert wait_for(tmp_path / "argv-a") == "1 ::1\n"
