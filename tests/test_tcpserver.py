"""ostiary-tcpserver against real tcpserver (ucspi-tcp 0.88), through real sockets.

The same connection is made to both servers, each running ``env -0``: the
environments must be equal (ports aside, which are checked against the
sockets). DNS and ident are served by fakes on loopback addresses of their
own (the servers are pointed there by $DNSCACHEIP; port 53 and 113 need
root, as CI has), so both servers see the same answers and nothing leaves
the machine. Then -v log lines, messages and exit codes, -c, reaping,
descriptors, SIGTERM, -x with rules compiled by real tcprules, -u/-g and IPv6.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import project_tool, require_tool
from hypothesis import given
from hypothesis import strategies as st
from kit.servers import listen, stop

from ostiary_ucspi.ucspi import dns, tcpserver

DNS_IP = "127.83.0.53"  # the fake DNS server
CLIENT = "127.113.0.2"  # PTR client-host.example (A matches); identd: USERID "joe user"
CLIENT_ERR = "127.113.0.3"  # PTR weird.example (A does not match); identd: ERROR
CLIENT_ODD = "127.113.0.4"  # PTR with blanks, colon, backslash, control and 8-bit bytes
CLIENT_SLOW = "127.113.0.5"  # identd accepts and never answers
CLIENT_PTR = "127.113.0.7"  # PTR answer compressed against the question
CLIENT_NONE = "127.113.0.8"  # no PTR (NXDOMAIN)


def wire(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


PTR = {
    "1.0.0.127.in-addr.arpa": wire(b"Srv", b"Example"),
    "2.0.113.127.in-addr.arpa": wire(b"Client-Host", b"Example"),
    "3.0.113.127.in-addr.arpa": wire(b"weird", b"example"),
    "4.0.113.127.in-addr.arpa": wire(b"a b:c\\x\x01\xff", b"Ex"),
    "7.0.113.127.in-addr.arpa": b"\x03ptr\xc0\x0c",  # "ptr." + the question's name
}
A = {"client-host.example": socket.inet_aton(CLIENT), "weird.example": socket.inet_aton("1.2.3.4")}

BASE_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "DNSCACHEIP": DNS_IP,
    "FOO": "bar",
    "TCPREMOTEHOST": "stale",
    "TCPREMOTEINFO": "stale",
    "TCPLOCALHOST": "stale",
}


def real() -> str:
    return require_tool("tcpserver")


def shim() -> str:
    return project_tool("ostiary-tcpserver")


# --- fake DNS server and identd ---------------------------------------------


def dns_reply(query: bytes) -> bytes:
    """Answer a query from the PTR and A tables (NXDOMAIN otherwise)."""
    pos, labels = 12, []
    while query[pos]:
        labels.append(query[pos + 1 : pos + 1 + query[pos]].decode("latin-1"))
        pos += 1 + query[pos]
    qtype = struct.unpack(">H", query[pos + 1 : pos + 3])[0]
    question = query[12 : pos + 5]
    name = ".".join(labels).lower()
    rdata = PTR.get(name) if qtype == 12 else A.get(name) if qtype == 1 else None
    answer = b""
    if rdata is not None:
        answer = b"\xc0\x0c" + struct.pack(">HHIH", qtype, 1, 60, len(rdata)) + rdata
    flags = 0x8180 if rdata is not None else 0x8183
    return query[:2] + struct.pack(">HHHHH", flags, 1, 1 if answer else 0, 0, 0) + question + answer


def serve_thread(target: Callable[[], None]) -> None:
    threading.Thread(target=target, daemon=True).start()


@pytest.fixture(scope="module")
def fakes() -> Iterator[None]:
    """Run the fake DNS server and identds (needs root for ports 53 and 113)."""
    try:
        dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns.bind((DNS_IP, 53))
        idents = []
        for ip in (CLIENT, CLIENT_ERR, CLIENT_SLOW):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ip, 113))
            s.listen(16)
            idents.append(s)
    except OSError as e:
        if os.environ.get("CI"):
            pytest.fail(f"cannot bind the fake DNS server or identd: {e}")
        pytest.skip(f"cannot bind ports 53 and 113 on loopback (root needed): {e}")

    def dns_loop() -> None:
        with contextlib.suppress(OSError):  # ends when the socket is shut down
            while True:
                query, peer = dns.recvfrom(512)
                if not query:
                    return
                dns.sendto(dns_reply(query), peer)

    def ident_loop(listener: socket.socket, reply: bytes | None) -> None:
        held = []
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                if reply is None:
                    held.append(conn)  # never answer
                    continue
                request = conn.recv(100).strip()
                conn.sendall(request + reply)
                conn.close()
        for conn in held:
            conn.close()

    serve_thread(dns_loop)
    replies = (b" : USERID : UNIX : joe user\r\n", b" : ERROR : NO-USER\r\n", None)
    for listener, reply in zip(idents, replies):
        serve_thread(lambda listener=listener, reply=reply: ident_loop(listener, reply))
    yield
    for s in (dns, *idents):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


# --- running servers and clients ------------------------------------------


class Server:
    """A running tcpserver (real or shim) started with -1."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        with log.open("wb") as stderr:
            self.proc, self.port = listen(argv, stderr, env=env)

    def stop(self) -> int:
        return stop(self.proc)

    def log(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def wait_log(self, pattern: str, timeout: float = 5) -> list[str]:
        """Wait until a log line matches ``pattern``; return the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.log()
            if any(re.search(pattern, line) for line in lines):
                return lines
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}: {self.log()}")


@contextlib.contextmanager
def running(
    tool: str,
    flags: list[str],
    program: list[str],
    tmp: Path,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> Iterator[Server]:
    log = tmp / f"log.{time.monotonic_ns()}"
    server = Server([tool, "-1", *flags, host, "0", *program], env or BASE_ENV, log)
    try:
        yield server
    finally:
        server.stop()


def talk(
    port: int, source: str | None = None, host: str = "127.0.0.1", family: int = socket.AF_INET
) -> tuple[bytes, int]:
    """Connect, read until EOF; return (data, the client's port)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        client_port = s.getsockname()[1]
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data, client_port
            data += chunk


def environment(data: bytes, server_port: int, client_port: int) -> dict[str, str]:
    """Parse ``env -0`` output; check and blank the ports, which differ between servers."""
    env = dict(entry.decode("latin-1").split("=", 1) for entry in data.split(b"\0") if entry)
    for prefix in ("TCP", "TCP6"):
        if f"{prefix}LOCALPORT" in env:
            assert env.pop(f"{prefix}LOCALPORT") == str(server_port)
            assert env.pop(f"{prefix}REMOTEPORT") == str(client_port)
    return env


def both_envs(
    flags: list[str],
    tmp: Path,
    source: str | None = None,
    env: dict[str, str] | None = None,
    banner: bytes = b"",
) -> dict[str, str]:
    """Make the same connection through real tcpserver and the shim; the
    environments must be equal. Returns the shim's."""
    results = []
    for tool in (real(), shim()):
        with running(tool, flags, ["env", "-0"], tmp, env) as server:
            data, client_port = talk(server.port, source)
        assert data.startswith(banner), (tool, data[:100])
        results.append(environment(data[len(banner) :], server.port, client_port))
    assert results[1] == results[0]
    return results[1]


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


def test_env_plain_matches_real(tmp_path: Path) -> None:
    env = both_envs(["-HRl0"], tmp_path)
    # Nothing of Python's own (PEP 538's LC_CTYPE) leaks; stale look-up variables go.
    assert env == {
        **without(BASE_ENV, "TCPREMOTEHOST", "TCPREMOTEINFO"),
        "PROTO": "TCP",
        "TCPLOCALIP": "127.0.0.1",
        "TCPLOCALHOST": "0",
        "TCPREMOTEIP": "127.0.0.1",
    }


def test_env_keeps_whatever_the_server_inherited(tmp_path: Path) -> None:
    env = both_envs(
        ["-HRl", "name.example"],
        tmp_path,
        env={
            "PATH": BASE_ENV["PATH"],
            "PROTO": "UDP",
            "TCPREMOTEIP": "1.2.3.4",
            "TCP6REMOTEIP": "::2",
            "EMPTY": "",
            "LANG": "C",
        },
    )
    assert env["PROTO"] == "TCP" and env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["TCP6REMOTEIP"] == "::2" and env["EMPTY"] == "" and env["LANG"] == "C"
    assert env["TCPLOCALHOST"] == "name.example"


def test_banner_then_env_match_real(tmp_path: Path) -> None:
    env = both_envs(["-HRl0", "-B", "220 hello\r\n"], tmp_path, banner=b"220 hello\r\n")
    assert env["TCPREMOTEIP"] == "127.0.0.1"


LOOKUPS = [  # flags, client address, what the program must see (None: unset)
    (
        ["-h", "-r"],
        CLIENT,
        {
            "TCPLOCALHOST": "srv.example",
            "TCPREMOTEHOST": "client-host.example",
            "TCPREMOTEINFO": "joeuser",
        },
    ),
    (
        ["-h", "-r", "-l", "mine"],
        CLIENT_ERR,
        {"TCPLOCALHOST": "mine", "TCPREMOTEHOST": "weird.example", "TCPREMOTEINFO": ""},
    ),
    (["-p", "-R", "-l0"], CLIENT, {"TCPREMOTEHOST": "client-host.example", "TCPREMOTEINFO": None}),
    (["-p", "-R", "-l0"], CLIENT_ERR, {"TCPREMOTEHOST": None}),
    (["-h", "-R", "-l0"], CLIENT_ODD, {"TCPREMOTEHOST": "a\\040b\\072c\\134x\\001\\377.ex"}),
    (["-h", "-R", "-l0"], CLIENT_PTR, {"TCPREMOTEHOST": "ptr.7.0.113.127.in-addr.arpa"}),
    (["-h", "-R", "-l0"], CLIENT_NONE, {"TCPREMOTEHOST": None}),
    (["-H", "-r", "-l0"], "127.0.0.1", {"TCPREMOTEINFO": None}),  # nothing on port 113
    (["-H", "-r", "-t", "1", "-l0"], CLIENT_SLOW, {"TCPREMOTEINFO": None}),
]


@pytest.mark.parametrize("flags, source, expected", LOOKUPS)
def test_env_with_dns_and_ident_matches_real(
    fakes: None, tmp_path: Path, flags: list[str], source: str, expected: dict[str, str | None]
) -> None:
    env = both_envs(flags, tmp_path, source)
    assert env["TCPREMOTEIP"] == source
    for name, value in expected.items():
        assert env.get(name) == value, name


def test_ident_timeout_is_honoured(fakes: None, tmp_path: Path) -> None:
    with running(shim(), ["-HRl0", "-r", "-t", "1"], ["env", "-0"], tmp_path) as server:
        start = time.monotonic()
        data, _ = talk(server.port, CLIENT_SLOW)
        took = time.monotonic() - start
    assert 0.9 < took < 3 and b"TCPREMOTEIP=" + CLIENT_SLOW.encode() in data


RULES = (
    f'joeuser@{CLIENT}:allow,RULE="info@ip",TCPREMOTEIP="spoofed"\n'
    '=weird.example:allow,RULE="=host"\n'
    f'{CLIENT_ODD}:allow,RULE="ip"\n'
    '127.113.0.:allow,RULE="prefix",EMPTY=""\n'
    "127.0.0.2:deny\n"
    ':allow,RULE="default"\n'
)


def tcprules(tmp: Path, text: str, name: str = "rules.cdb") -> Path:
    """Compile ``text`` with real tcprules; return the CDB's path."""
    cdb = tmp / name
    subprocess.run(
        [require_tool("tcprules"), str(cdb), str(tmp / "rules.tmp")],
        input=text.encode(),
        check=True,
    )
    return cdb


@pytest.mark.parametrize(
    "source, rule",
    [
        (CLIENT, "info@ip"),
        (CLIENT_ERR, "=host"),
        (CLIENT_ODD, "ip"),
        (CLIENT_NONE, "prefix"),
        ("127.0.0.1", "default"),
    ],
)
def test_rules_variables_match_real(fakes: None, tmp_path: Path, source: str, rule: str) -> None:
    cdb = tcprules(tmp_path, RULES)
    env = both_envs(["-h", "-r", "-l0", "-x", str(cdb)], tmp_path, source)
    assert env["RULE"] == rule
    assert env["TCPREMOTEIP"] == ("spoofed" if rule == "info@ip" else source)


@pytest.mark.parametrize("which", ["real", "shim"])
def test_rules_deny_missing_and_recompiled(tmp_path: Path, which: str) -> None:
    tool = real() if which == "real" else shim()
    cdb = tcprules(tmp_path, '127.0.0.1:deny\n:allow,V="1"\n')
    with running(tool, ["-HRl0", "-x", str(cdb)], ["env", "-0"], tmp_path) as server:
        assert talk(server.port)[0] == b""  # denied: closed, the program never ran
        assert b"\0V=1\0" in b"\0" + talk(server.port, "127.0.0.3")[0]
        tcprules(tmp_path, '127.0.0.1:allow,V="2"\n')  # takes effect at once
        assert b"\0V=2\0" in b"\0" + talk(server.port)[0]
        cdb.unlink()
        assert talk(server.port)[0] == b""  # missing: dropped
        cdb.write_bytes(b"not a cdb")
        assert talk(server.port)[0] == b""  # unreadable: dropped
    flags = ["-HRl0", "-X", "-x", str(cdb) + ".none"]
    with running(tool, flags, ["env", "-0"], tmp_path) as server:
        assert b"TCPREMOTEIP=127.0.0.1" in talk(server.port)[0]


# --- -v log lines ----------------------------------------------------------


def normalized(lines: list[str], server_port: int, client_port: int) -> list[str]:
    """Replace pids and ports, which differ from run to run."""
    pids = set(re.findall(r"pid (\d+) from", "\n".join(lines)))
    out = []
    for line in lines:
        line = line.replace(f":{server_port} ", ":PORT ").replace(f":{client_port}", ":CPORT")
        for pid in pids:
            line = re.sub(rf"\b{pid}\b", "PID", line)
        out.append(line)
    return out


def verbose_log(
    tool: str, flags: list[str], program: list[str], tmp: Path, source: str | None = None
) -> list[str]:
    """The -v log of one connection, from start to the child's end."""
    with running(tool, ["-v", *flags], program, tmp) as server:
        _, client_port = talk(server.port, source)
        lines = server.wait_log(r"^tcpserver: end ")
        time.sleep(0.05)  # the status line after it
        lines = server.log()
    return normalized(lines, server.port, client_port)


@pytest.mark.parametrize(
    "case", ["ok", "deny", "missing-rules", "not-runnable", "banner", "percent"]
)
def test_verbose_lines_match_real(tmp_path: Path, case: str) -> None:
    cdb = tcprules(tmp_path, "127.0.0.1:deny\n:allow\n")
    flags, program = {
        "ok": (["-HRl0", "-x", str(cdb)], ["true"]),
        "deny": (["-HRl0", "-x", str(cdb)], ["true"]),
        "missing-rules": (["-HRl0", "-x", str(tmp_path / "none.cdb")], ["true"]),
        "not-runnable": (["-HRl0", "-c", "3"], [str(tmp_path / "no-such-program")]),
        "banner": (["-HRl", "local.example", "-B", "x"], ["sh", "-c", "exit 3"]),
        "percent": (["-HRl", "lo%cal%s.example"], ["true"]),  # safecats: '%' is logger stupidity
    }[case]
    source = "127.0.0.1" if case == "deny" else "127.0.0.3"
    logs = [verbose_log(tool, flags, program, tmp_path, source) for tool in (real(), shim())]
    assert logs[1] == logs[0]
    expected_end = {
        "ok": "status 0",
        "deny": "status 25600",
        "missing-rules": "status 28416",
        "not-runnable": "status 28416",
        "banner": "status 768",
        "percent": "status 0",
    }[case]
    if case == "percent":
        assert any(" lo?cal?s.example:127.0.0.1:" in line for line in logs[1]), logs[1]
    assert f"tcpserver: end PID {expected_end}" in logs[1]
    assert logs[1][0].startswith("tcpserver: status: 0/") and logs[1][-1] == logs[1][0]


def test_verbose_lines_with_lookups_match_real(fakes: None, tmp_path: Path) -> None:
    logs = [
        verbose_log(tool, ["-h", "-r"], ["true"], tmp_path, CLIENT_ODD) for tool in (real(), shim())
    ]
    assert logs[1] == logs[0]
    assert (
        "tcpserver: ok PID srv.example:127.0.0.1:PORT "
        f"a\\040b\\072c\\134x\\001\\377.ex:{CLIENT_ODD}::CPORT"
    ) in logs[1]


# --- command line, messages, exit codes -------------------------------------


def run_both(args: list[str], env: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """(exit code, stderr) of real tcpserver and the shim.

    getopt's complaints start with the command's name (tcpserver,
    ostiary-tcpserver): that becomes NAME; the shim's usage and fatal lines
    name it ostiary-tcpserver, read as tcpserver.
    """
    out = []
    for tool in (real(), shim()):
        p = subprocess.run([tool, *args], capture_output=True, timeout=10, env=env or BASE_ENV)
        name = re.escape(os.path.basename(tool))
        text = re.sub(
            rf"^{name}: (illegal option|option requires)",
            r"NAME: \1",
            p.stderr.decode(),
            flags=re.M,
        )
        text = re.sub(r"\bostiary-tcpserver\b", "tcpserver", text)  # the shim names itself
        text = text.replace(" [ -F module ]", "")  # the shim's own option, not 0.88's
        out.append((p.returncode, text))
    return out


@pytest.mark.parametrize(
    "args, code",
    [
        ([], 100),
        (["-Z"], 100),
        (["-c"], 100),
        (["-v", "127.0.0.1", "0"], 100),
        (["-q", "127.0.0.1"], 100),
        (["-q", "-Z"], 100),
        (["127.0.0.1", "no-such-service", "true"], 111),
        (["-q", "127.0.0.1", "nope", "true"], 111),
    ],
)
def test_usage_and_fatal_messages_match_real(args: list[str], code: int) -> None:
    results = run_both(args)
    assert results[1] == results[0]
    assert results[1][0] == code


def test_bind_failure_matches_real() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        results = run_both(["127.0.0.1", port, "true"])
        quiet = run_both(["-q", "127.0.0.1", port, "true"])
    message = "tcpserver: fatal: unable to bind: address already used\n"
    assert results[1] == results[0] == (111, message)
    assert quiet[1] == quiet[0] == (111, "")


@pytest.mark.parametrize("which", ["real", "shim"])
def test_dash_one_prints_the_port_then_closes_stdout(tmp_path: Path, which: str) -> None:
    tool = real() if which == "real" else shim()
    with running(tool, ["-HRl0"], ["true"], tmp_path) as server:
        rest = server.proc.stdout.read()  # EOF: the server closed descriptor 1
        with socket.socket() as s:
            s.connect(("127.0.0.1", server.port))
    assert rest == b"" and 0 < server.port < 65536


def test_port_may_be_a_service_name(tmp_path: Path) -> None:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", socket.getservbyname("smtp", "tcp")))
    except OSError as e:
        pytest.skip(f"smtp port unusable here: {e}")
    server = Server([shim(), "-1", "127.0.0.1", "smtp", "true"], BASE_ENV, tmp_path / "log")
    assert server.port == 25 and server.stop() == 0


# --- process hygiene ----------------------------------------------------------


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of ``pid``'s children, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(stat[1]) == pid:
                found.append((int(entry), stat[0]))
    return found


def test_concurrency_limit(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    program = ["sh", "-c", 'echo $$ > "$0/$$"; ls "$0" | wc -l; sleep 0.8; rm "$0/$$"', str(live)]
    results: list[tuple[float, bytes]] = []

    def client(port: int) -> None:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as s:
            first = s.recv(100)
            results.append((time.monotonic() - start, first))
            while s.recv(100):
                pass

    with running(shim(), ["-v", "-HRl0", "-c", "2"], program, tmp_path) as server:
        threads = [threading.Thread(target=client, args=(server.port,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        lines = server.wait_log(r" end ", 5)
    results.sort()
    counts = [int(data) for _, data in results]
    assert max(counts) <= 2 and 2 in counts, counts
    assert results[1][0] < 0.6 and results[2][0] > 0.75, results  # the third waited its turn
    statuses = [line for line in lines if "status: " in line]
    assert "tcpserver: status: 2/2" in statuses and not any("3/2" in s for s in statuses)


def test_children_are_reaped(tmp_path: Path) -> None:
    with running(shim(), ["-v", "-HRl0", "-c", "10"], ["true"], tmp_path) as server:
        threads = [threading.Thread(target=talk, args=(server.port,)) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        deadline = time.monotonic() + 3
        while children(server.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert children(server.proc.pid) == []  # no zombie, nothing left running
        time.sleep(0.05)
        lines = server.log()
    assert len([line for line in lines if " end " in line]) == 30
    assert lines[-1] == "tcpserver: status: 0/10"


FD_PROGRAM = """
import os, socket
def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
s = socket.socket(fileno=0)
print([fd for fd in range(1024) if is_open(fd)], s.getpeername()[1], flush=True)
s.detach()
"""


@pytest.mark.parametrize(
    "flags",
    [["-HRl0"], ["-HRl0", "-B", "x"], ["-HRl0", "-x", "RULES"]],
    ids=["spawned", "forked", "with-rules"],
)
def test_program_gets_only_the_socket(tmp_path: Path, flags: list[str]) -> None:
    cdb = tcprules(tmp_path, ":allow\n")
    flags = [str(cdb) if f == "RULES" else f for f in flags]
    program = [sys.executable, "-S", "-c", FD_PROGRAM]
    with running(shim(), flags, program, tmp_path) as server:
        data, client_port = talk(server.port)
    assert data.lstrip(b"x").decode() == f"[0, 1, 2] {client_port}\n"


def test_sigterm_stops_accepting_and_exits(tmp_path: Path) -> None:
    program = ["sh", "-c", "echo started; sleep 0.3; echo done"]
    with running(shim(), ["-HRl0"], program, tmp_path) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            f = s.makefile("rb")
            assert f.readline() == b"started\n"
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(3) == 0
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", server.port), timeout=2)
            assert f.read() == b"done\n"  # as tcpserver: the running child is not killed
            f.close()


def privileged_port() -> int:
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port below 1024")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize(
    "flags, env", [(["-u", "65534", "-g", "65533"], {}), (["-U"], {"UID": "65534", "GID": "65533"})]
)
def test_privileges_dropped_after_binding(
    tmp_path: Path, flags: list[str], env: dict[str, str]
) -> None:
    port = privileged_port()
    program = ["sh", "-c", "id -u; id -g; id -G"]
    outputs = []
    for tool in (real(), shim()):
        server = Server(
            [tool, "-1", "-HRl0", *flags, "127.0.0.1", str(port), *program],
            {**BASE_ENV, **env},
            tmp_path / "log",
        )
        try:
            outputs.append(talk(server.port)[0])
        finally:
            server.stop()
    assert outputs[1] == outputs[0] == b"65534\n65533\n65533\n"


NODELAY = """
import socket
s = socket.socket(fileno=0)
print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), flush=True)
s.detach()
"""


@pytest.mark.parametrize(
    "flags, expected",
    [([], b"0\n"), (["-D"], b"1\n"), (["-D", "-d"], b"0\n"), (["-D", "-B", "x"], b"x1\n")],
)
def test_nodelay_matches_real(tmp_path: Path, flags: list[str], expected: bytes) -> None:
    outputs = []
    for tool in (real(), shim()):
        with running(
            tool, ["-HRl0", *flags], [sys.executable, "-S", "-c", NODELAY], tmp_path
        ) as server:
            outputs.append(talk(server.port)[0])
    assert outputs[1] == outputs[0] == expected


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6(tmp_path: Path) -> None:
    with running(shim(), ["-v", "-HRl0"], ["env", "-0"], tmp_path, host="::1") as server:
        data, client_port = talk(server.port, host="::1", family=socket.AF_INET6)
        lines = server.wait_log(r" end ")
    env = environment(data, server.port, client_port)
    assert {k: v for k, v in env.items() if k.startswith(("TCP", "PROTO"))} == {
        "PROTO": "TCP6",
        "TCPLOCALIP": "::1",
        "TCPREMOTEIP": "::1",
        "TCPLOCALHOST": "0",
        "TCP6LOCALIP": "::1",
        "TCP6REMOTEIP": "::1",
        "TCP6LOCALHOST": "0",
    }
    ok = normalized(lines, server.port, client_port)[3]
    assert ok == "tcpserver: ok PID 0:??1:PORT :??1::CPORT"


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_any_takes_ipv4_clients_as_ipv4(tmp_path: Path) -> None:
    with running(shim(), ["-HRl0"], ["env", "-0"], tmp_path, host="::") as server:
        data, client_port = talk(server.port)
    env = environment(data, server.port, client_port)
    assert env["PROTO"] == "TCP" and env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["TCPLOCALIP"] == "127.0.0.1" and not any(k.startswith("TCP6") for k in env)


# --- pieces -------------------------------------------------------------------


@given(st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=4))
def test_dns_names_round_trip(labels: list[bytes]) -> None:
    text = dns.to_dot(labels)
    assert all(33 <= ord(c) <= 126 for c in text)
    assert dns.from_dot(text) == [label.lower() for label in labels]


def test_log_fields_are_made_safe() -> None:
    assert tcpserver.safe(b"a:b c\x7f\xff") == "a?b?c??"
    assert tcpserver.safe(b"x" * 99) == "x" * 99
    assert tcpserver.safe(b"x" * 100) == tcpserver.safe(b"x" * 101) == "x" * 100 + "..."
    assert tcpserver.safe(None) == ""
