"""Adversarial: arbitrary byte streams, forged, replayed and cross-action responses.

Everything goes through real ``tcpserver -HRl0`` and real sockets. Each client
connects from an address of its own (127.10.x.y and up), so the lockout never
hides a verdict and every log line, store record and action run names the
connection it belongs to. The handler logs at LOG_DEBUG, so the test knows the
salt it sent and the 32 bytes it judged.
"""

from __future__ import annotations

import hashlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.procs import wait_for, wait_quiet
from kit.servers import TRACEBACK, Server
from kit.site import ADV_KILL as KILL
from kit.site import SECRETS, Site
from kit.wire import SALT_LEN, Addresses, connect, read_to_eof, recv_exact, reset, response

from adversarial.adv_tally import figure
from ostiary_ucspi.policy import Entry

ACTIONS = list(SECRETS)
COMM_TIMEOUT, DELAY = 1, 0
BOUND = COMM_TIMEOUT + DELAY + 1  # a handler's whole life, connect to exit
EXAMPLES = 150


@pytest.fixture(scope="module", params=["tcpserver", "ostiary-tcpserver -F"])
def kind(request) -> str:
    """Each test runs behind real tcpserver, and behind the shim's forking mode."""
    return request.param


@pytest.fixture(scope="module")
def site(kind):
    s = Site()
    s.config(COMM_TIMEOUT=str(COMM_TIMEOUT), DELAY=str(DELAY))
    yield s
    s.remove()


@pytest.fixture(scope="module")
def server(site, kind, tally):
    with Server(site, kind, tally=tally) as srv:
        yield srv


def debug_line(server: Server, address: str) -> tuple[bytes, bytes]:
    """(salt, response) the handler logged for ``address`` at LOG_DEBUG."""
    lines = [x for x in server.handler_lines(address) if " salt " in x]
    assert len(lines) == 1, lines
    words = lines[0].split()
    salt = bytes.fromhex(words[words.index("salt") + 1])
    rest = words[words.index("response") + 1 :]
    return salt, bytes.fromhex(rest[0]) if rest else b""


def started(server: Server, address: str) -> list[int]:
    """Numbers of the actions the handler started for ``address`` (1 = first ACTION)."""
    return [
        int(x.split(" action ")[1].split()[0])
        for x in server.handler_lines(address)
        if " starting as uid " in x
    ]


def runs_for(site: Site, name: str, address: str) -> int:
    """How many times action ``name`` ran for ``address``."""
    return [r[1] for r in site.runs(name)].count(address)


def entry(site: Site, address: str) -> Entry:
    view = site.view()
    return Entry(None if view is None else view.get(address.encode()))


# -- 1. any byte stream, at any pace ---------------------------------------------


@dataclass
class Raw:
    """Bytes that do not depend on the salt; ``early``: the first chunk leaves before the salt is read."""

    data: bytes
    early: bool

    def stream(self, salt: bytes, last_salt: bytes) -> bytes:
        return self.data


TWEAKS = (
    "exact",
    "exact+junk",
    "junk+exact",
    "flip",
    "short",
    "old salt",
    "wrong key",
    "key prefix",
    "reflect",
    "plain hash",
    "kill key, flipped",
)
# The rightful answers twice as often: both verdicts need plenty of examples.
CHOICES = TWEAKS + ("exact", "exact+junk")


@dataclass
class Forged:
    """A response built from the salt: the right one, or one a forger might try."""

    action: str
    tweak: str
    junk: bytes
    k: int
    early = False

    def stream(self, salt: bytes, last_salt: bytes) -> bytes:
        secret = SECRETS[self.action]
        right = response(secret, salt)
        junk = self.junk or b"\0"
        return {
            "exact": right,
            "exact+junk": right + self.junk,
            "junk+exact": junk + right,
            "flip": bytes(
                b ^ (1 << self.k % 8) if i == self.k // 8 % 32 else b for i, b in enumerate(right)
            ),
            "short": right[: self.k % 32],
            "old salt": response(secret, last_salt),
            "wrong key": response(secret + junk[:1], salt),
            "key prefix": response(secret[:-1], salt),
            "reflect": salt,
            "plain hash": hashlib.sha256(secret + salt).digest(),
            "kill key, flipped": bytes([response(KILL, salt)[0] ^ 1]) + response(KILL, salt)[1:],
        }[self.tweak]


payloads = st.one_of(
    st.builds(Raw, st.binary(max_size=200), st.booleans()),
    st.builds(
        Forged,
        st.sampled_from(ACTIONS),
        st.sampled_from(CHOICES),
        st.binary(max_size=SALT_LEN * 6 - SALT_LEN - 1),
        st.one_of(st.sampled_from((0, 31, 248, 255)), st.integers(0, 255)),
    ),  # edges first
)
# (chunk size, pause before it): mostly fast, sometimes past the deadline.
paces = st.lists(
    st.tuples(st.integers(1, 64), st.sampled_from((0, 0, 0, 0.001, 0.01, 0.05, 0.4))), max_size=6
)
endings = st.sampled_from(("shut", "shut", "shut", "hold", "reset"))


def send_paced(sock: socket.socket, data: bytes, pace: list[tuple[int, float]]) -> None:
    """Send ``data`` in the chunks and pauses of ``pace``, the rest at once; stop if the peer closed."""
    try:
        for size, pause in pace:
            if not data:
                return
            time.sleep(pause)
            sock.sendall(data[:size])
            data = data[size:]
        if data:
            sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def test_any_byte_stream_runs_nothing_but_the_exact_response(site, server, pytestconfig, tally):
    """Property: whatever arrives, at whatever pace, only HMAC(passphrase, this salt) runs an action."""
    address = Addresses(10)
    seen = {"inputs": 0, "runs": 0, "false positives": 0, "crashes": 0, "longest": 0.0}
    expected: dict[str, list[str]] = {a: [] for a in ACTIONS}
    last_salt = [b"\0" * SALT_LEN]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(payload=payloads, pace=paces, ending=endings)
    def prop(payload, pace, ending):
        seen["inputs"] += 1
        ip = address()
        t0 = time.monotonic()
        sock = connect(server.port, ip)
        port = sock.getsockname()[1]
        sent = b""
        if payload.early and payload.data:
            sent = payload.data[: pace[0][0] if pace else len(payload.data)]
            sock.sendall(sent)
        salt = recv_exact(sock, SALT_LEN)
        data = payload.stream(salt, last_salt[0])
        send_paced(sock, data[len(sent) :], pace)
        if ending == "reset":
            sock.setblocking(False)
            try:
                rest = sock.recv(4096)
            except (BlockingIOError, ConnectionResetError):
                rest = b""
            reset(sock)
        else:
            if ending == "shut":
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            rest = read_to_eof(sock)
            sock.close()
        pid, ended, status = server.wait_end(ip, port)
        life = ended - t0
        seen["longest"] = max(seen["longest"], life)
        last_salt[0] = salt

        crashed = status != 0 or any(TRACEBACK.search(x) for x in server.handler_lines(ip))
        seen["crashes"] += crashed
        assert not crashed, server.handler_lines(ip)
        assert salt + rest == salt and len(salt) == SALT_LEN  # the salt and nothing else
        logged_salt, judged = debug_line(server, ip)
        assert logged_salt == salt
        assert judged == data[: len(judged)]  # the handler judged a prefix of what we sent
        if sum(p for _, p in pace) < COMM_TIMEOUT / 2 and ending != "reset":
            assert judged == data[:SALT_LEN]
        runs = started(server, ip)
        rightful = [
            i for i, a in enumerate(ACTIONS, 1) if data[:SALT_LEN] == response(SECRETS[a], salt)
        ]
        if not set(runs) <= set(rightful):
            seen["false positives"] += 1
        assert set(runs) <= set(rightful), (runs, rightful)
        assert runs == [i for i, a in enumerate(ACTIONS, 1) if judged == response(SECRETS[a], salt)]
        assert life <= BOUND, f"handler lived {life:.2f}s"
        if runs:
            name = ACTIONS[runs[0] - 1]
            expected[name].append(ip)
            seen["runs"] += 1
            wait_for(lambda: runs_for(site, name, ip), 10, f"{name} to run for {ip}")
            assert entry(site, ip).strikes == 0
        else:
            e = entry(site, ip)
            assert (e.strikes, e.errors, e.locked_since) == (1, 1, 0)  # charged, not locked

    prop()
    tally.totals["inputs"] += seen["inputs"]
    tally.totals["false positives"] += seen["false positives"]
    served = sum(1 for _, x in server.snapshot() if x.startswith("tcpserver: end "))
    wait_quiet(site.cfg)  # runners of the last examples
    for name in ACTIONS:
        got = site.runs(name)
        assert sorted(r[1] for r in got) == sorted(expected[name]), name  # exactly once each
        assert all(r[0] == str(site.bin / name) for r in got)
        assert len({r[2] for r in got}) == len(got)
    assert site.runs("lockout") == []
    assert seen["runs"] > 0 and seen["runs"] < seen["inputs"]  # both verdicts were exercised
    figure(
        pytestconfig,
        f"socket property: {seen['inputs']} inputs, {served} connections, "
        f"{seen['runs']} rightful runs, {seen['false positives']} false positives, "
        f"{seen['crashes']} crashes, longest handler {seen['longest']:.2f}s (bound {BOUND}s)",
    )


# -- 7. replay and cross-connection -----------------------------------------------


def knock(server: Server, ip: str, answer) -> tuple[bytes, bytes]:
    """Connect from ``ip``, send ``answer(salt)``, read to the close; return (salt, all bytes received)."""
    with connect(server.port, ip) as sock:
        salt = recv_exact(sock, SALT_LEN)
        if len(salt) == SALT_LEN:
            sock.sendall(answer(salt))
            sock.shutdown(socket.SHUT_WR)
        return salt, salt + read_to_eof(sock)


def test_a_recorded_response_is_rejected_on_every_other_connection(site, server, pytestconfig):
    address = Addresses(20)
    victim = address()
    # An on-path attacker holds a connection of its own open while the victim knocks.
    early_ip = address()
    early = connect(server.port, early_ip)
    early_salt = recv_exact(early, SALT_LEN)
    recorded = {}
    for name in ACTIONS:
        salt, got = knock(server, victim, lambda s, n=name: response(SECRETS[n], s))
        assert got == salt
        recorded[name] = response(SECRETS[name], salt)
        wait_for(lambda n=name: runs_for(site, n, victim) == 1, 10, f"{name} for {victim}")
    early.sendall(recorded["open"])
    early.shutdown(socket.SHUT_WR)
    assert read_to_eof(early) == b""
    early.close()

    # Replay each recorded answer from the victim's own address and from 15 others at once.
    attempts = [(victim, r) for r in recorded.values()]
    attempts += [(address(), r) for r in recorded.values() for _ in range(5)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda a: knock(server, a[0], lambda s: a[1]), attempts))
    for salt, got in results:
        assert len(salt) == SALT_LEN and got == salt
    for ip, _ in attempts[len(ACTIONS) :] + [(early_ip, None)]:
        e = entry(site, ip)
        assert (e.strikes, e.errors) == (1, 1), ip  # every replay is charged
    assert entry(site, victim).strikes == len(ACTIONS)
    wait_quiet(site.cfg)
    ours = [r[1] for name in ACTIONS for r in site.runs(name) if r[1].startswith("127.20.")]
    assert ours == [victim] * len(ACTIONS)  # the original runs only
    assert early_salt not in [s for s, _ in results]
    figure(
        pytestconfig,
        f"replay: {len(attempts) + 1} replayed responses, {len(ours) - len(ACTIONS)} accepted",
    )


def test_a_response_for_one_action_never_triggers_another(site, server):
    address = Addresses(30)
    for name in ACTIONS:
        ip = address()
        salt, got = knock(server, ip, lambda s, n=name: response(SECRETS[n], s))
        assert got == salt
        wait_for(lambda n=name, i=ip: runs_for(site, n, i), 10, f"{name} for {ip}")
        assert started(server, ip) == [ACTIONS.index(name) + 1]
    wait_quiet(site.cfg)
    for name in ACTIONS:
        mine = [r[1] for r in site.runs(name) if r[1].startswith("127.30.")]
        assert mine == [f"127.30.0.{ACTIONS.index(name) + 1}"]


def test_a_locked_address_gets_no_salt_even_with_the_right_answer(site, server):
    """Many wrong answers at once from one address: MAX_BAD_CONNS salts, one lock, one LOCKOUT_ACTION."""
    ip, bystander = Addresses(40)(), Addresses(41)()
    with ThreadPoolExecutor(20) as pool:
        results = list(
            pool.map(lambda _: knock(server, ip, lambda s: b"\x5a" * SALT_LEN), range(20))
        )
    salts = [got for _, got in results if got]
    assert len(salts) == 3 and all(len(s) == SALT_LEN for s in salts)
    wait_for(lambda: runs_for(site, "lockout", ip), 10, "the lockout action")
    assert knock(server, ip, lambda s: response(SECRETS["open"], s)) == (b"", b"")
    e = entry(site, ip)
    assert e.strikes == 3 and e.locked_since > 0
    salt, got = knock(server, bystander, lambda s: response(SECRETS["open"], s))
    assert got == salt and len(salt) == SALT_LEN
    wait_for(lambda: runs_for(site, "open", bystander), 10, "the bystander's action")
    wait_quiet(site.cfg)
    assert runs_for(site, "open", ip) == 0
    assert runs_for(site, "lockout", ip) == 1
