"""Adversarial: slow clients, silent clients, clients that never read.

Through real ``tcpserver -HRl0`` with COMM_TIMEOUT=2 and DELAY=1, so the
deadline (one for the whole exchange) and the pause after it are both in play.
"""

from __future__ import annotations

import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from kit.procs import wait_for, wait_quiet
from kit.servers import Server
from kit.site import SECRETS, Site
from kit.wire import SALT_LEN, Addresses, connect, read_to_eof, recv_exact, response

from adversarial.adv_tally import figure
from ostiary_ucspi.policy import Entry

COMM_TIMEOUT, DELAY = 2, 1
BOUND = COMM_TIMEOUT + DELAY + 1


@pytest.fixture(scope="module")
def site():
    s = Site()
    s.config(COMM_TIMEOUT=str(COMM_TIMEOUT), DELAY=str(DELAY))
    yield s
    s.remove()


@pytest.fixture(scope="module")
def server(site, tally):
    with Server(site, limit=60, backlog=100, tally=tally) as srv:
        yield srv


def strikes(site: Site, ip: str) -> tuple[int, int]:
    e = Entry(site.view().get(ip.encode()))
    return e.strikes, e.locked_since


def test_a_one_byte_per_second_drip_is_cut_at_comm_timeout(site, server, pytestconfig):
    """Even the right answer, dripped one byte a second, is cut at the deadline and runs nothing."""
    ip = Addresses(50)()
    t0 = time.monotonic()
    sock = connect(server.port, ip)
    port = sock.getsockname()[1]
    salt = recv_exact(sock, SALT_LEN)
    t_salt = time.monotonic()
    answer = response(SECRETS["open"], salt)
    sent, closed_at = 0, None
    sock.settimeout(1.0)
    while time.monotonic() - t_salt < COMM_TIMEOUT + 3:
        try:
            sock.send(answer[sent : sent + 1])
            sent += 1
            if sock.recv(1) == b"":  # waits up to a second for the server to hang up
                closed_at = time.monotonic()
                break
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed_at = time.monotonic()
            break
    sock.close()
    assert len(salt) == SALT_LEN and closed_at is not None
    cut = closed_at - t_salt
    assert COMM_TIMEOUT - 0.2 <= cut <= COMM_TIMEOUT + 0.5, cut
    assert sent <= COMM_TIMEOUT + 1
    _, ended, status = server.wait_end(ip, port)
    assert status == 0 and ended - t0 <= BOUND
    lines = server.handler_lines(ip)
    assert any(f"{ip} failed: timeout after " in x for x in lines), lines
    assert not any("starting" in x for x in lines)
    assert strikes(site, ip) == (1, 0)
    wait_quiet(site.cfg)
    assert ip not in [r[1] for r in site.runs("open")]
    figure(
        pytestconfig,
        f"drip: cut after {cut:.2f}s and {sent} bytes (COMM_TIMEOUT {COMM_TIMEOUT}s), "
        f"handler gone after {ended - t0:.2f}s (bound {BOUND}s)",
    )


def test_a_client_that_never_reads_does_not_block_the_handler(site, server):
    address = Addresses(51)
    silent, blurter = address(), address()
    socks = []
    for ip in (silent, blurter):
        s = socket.socket()
        s.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 1
        )  # the smallest window the kernel allows
        s.bind((ip, 0))
        s.connect(("127.0.0.1", server.port))
        socks.append(s)
    t0 = time.monotonic()
    socks[1].sendall(b"\x17" * SALT_LEN)  # a full wrong answer, never reading the salt
    for ip, s, limit in ((silent, socks[0], BOUND), (blurter, socks[1], DELAY + 1)):
        _, ended, status = server.wait_end(ip, s.getsockname()[1], timeout=BOUND + 5)
        assert status == 0 and ended - t0 <= limit, (ip, ended - t0)
    for s in socks:  # what waited unread all along: the salt, nothing else
        assert len(read_to_eof(s)) == SALT_LEN
        s.close()
    assert any(f"{silent} failed: timeout after 0 bytes" in x for x in server.handler_lines(silent))
    assert any(f"{blurter} failed: wrong response" in x for x in server.handler_lines(blurter))


def hung_up(sock: socket.socket) -> bool:
    """True once the server closed its end (POLLRDHUP), without reading anything."""
    p = select.poll()
    p.register(sock, select.POLLRDHUP)
    return bool(p.poll(0))


def test_thirty_silent_clients_do_not_stop_a_valid_one(site, server, pytestconfig):
    address = Addresses(52)
    silent = [connect(server.port, address()) for _ in range(30)]
    salts = [recv_exact(s, SALT_LEN) for s in silent]  # thirty handlers now wait for an answer
    assert all(len(x) == SALT_LEN for x in salts)
    t0 = time.monotonic()
    ip = address()
    with connect(server.port, ip) as sock:
        salt = recv_exact(sock, SALT_LEN)
        sock.sendall(response(SECRETS["web"], salt))
        sock.shutdown(socket.SHUT_WR)
        assert salt + read_to_eof(sock) == salt and len(salt) == SALT_LEN
    served = time.monotonic() - t0
    waiting = sum(not hung_up(s) for s in silent)
    assert waiting == 30  # served while every silent client still held its handler
    wait_for(lambda: ip in [r[1] for r in site.runs("web")], 5, "the valid client's action")
    with ThreadPoolExecutor(30) as pool:
        rest = list(pool.map(read_to_eof, silent))
    assert rest == [b""] * 30  # nothing after the salt
    for s in silent:
        s.close()
    figure(pytestconfig, f"30 silent clients held open: a valid client served in {served:.2f}s")
