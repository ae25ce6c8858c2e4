"""The known limits of the Ostiary 4.0 protocol, shown rather than claimed (see SECURITY.md).

An attacker on the path sees one salt and one response. That is enough to
test passphrase guesses offline, as fast as HMAC-SHA256 runs, and enough to
relay a victim's knock so the action runs for the attacker's address. Both
tests succeed when the attack succeeds: they document what the protocol
cannot prevent, and fail if that ever changes (so SECURITY.md gets updated).
"""

from __future__ import annotations

import itertools
import socket
import threading
import time

import pytest
from kit.procs import wait_for
from kit.servers import Server
from kit.site import SECRETS, Site
from kit.wire import SALT_LEN, connect, read_to_eof, recv_exact, response

WEAK = b"summer2024"


class Relay:
    """An on-path attacker: accepts the victim's connection, opens its own to the server
    from ``source``, copies bytes both ways and keeps a copy of everything."""

    def __init__(self, server_port: int, source: str) -> None:
        self.server_port = server_port
        self.source = source
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = {"to client": b"", "to server": b""}
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        victim, _ = self.listener.accept()
        upstream = connect(self.server_port, self.source)
        pumps = [
            threading.Thread(target=self._pump, args=(a, b, d))
            for a, b, d in ((upstream, victim, "to client"), (victim, upstream, "to server"))
        ]
        for p in pumps:
            p.start()
        for p in pumps:
            p.join()
        victim.close()
        upstream.close()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        while True:
            try:
                data = src.recv(4096)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            self.seen[direction] += data
            dst.sendall(data)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def site():
    s = Site(actions=("open",))
    s.config(f'ACTION="{WEAK.decode()}","{s.action("weak")}"', COMM_TIMEOUT="2")
    yield s
    s.remove()


def knock_via(relay: Relay, victim_ip: str, secret: bytes) -> bytes:
    with connect(relay.port, victim_ip) as sock:
        salt = recv_exact(sock, SALT_LEN)
        sock.sendall(response(secret, salt))
        sock.shutdown(socket.SHUT_WR)
        return salt + read_to_eof(sock)


def test_an_on_path_relay_makes_the_action_run_for_its_own_address(site, tally):
    """Limit: the response proves the passphrase, not the address the action is run for."""
    with Server(site, tally=tally) as srv:
        relay = Relay(srv.port, source="127.66.6.6")
        got = knock_via(relay, "127.0.0.5", SECRETS["open"])
        relay.close()
        assert len(got) == SALT_LEN
        wait_for(lambda: site.runs("open"), 10, "the relayed action")
    assert [r[1] for r in site.runs("open")] == ["127.66.6.6"]  # the attacker's, not the victim's


def test_a_captured_exchange_lets_an_attacker_guess_a_weak_passphrase_offline(site, tally):
    """Limit: one recorded salt and response is a target for offline guessing."""
    with Server(site, tally=tally) as srv:
        relay = Relay(srv.port, source="127.66.6.7")
        knock_via(relay, "127.0.0.6", WEAK)
        relay.close()
        wait_for(lambda: site.runs("weak"), 10, "the weak action")
    salt, answer = relay.seen["to client"], relay.seen["to server"]
    assert len(salt) == SALT_LEN and len(answer) == SALT_LEN
    # A tiny dictionary attack: words, then words with a year; no contact with the server.
    words = [
        b"password",
        b"letmein",
        b"ostiary",
        b"spring",
        b"summer",
        b"autumn",
        b"winter",
        b"dragon",
    ]
    t0 = time.monotonic()
    found = None
    for n, guess in enumerate(
        w + y
        for w, y in itertools.product(words, [b""] + [str(y).encode() for y in range(1950, 2051)])
    ):
        if response(guess, salt) == answer:
            found = guess
            break
    assert found == WEAK, "the weak passphrase should fall to a dictionary"
    assert time.monotonic() - t0 < 5 and n < 1000
