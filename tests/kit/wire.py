"""The client's side of the wire: answers, knocks, raw sockets.

:func:`response` is computed with the standard ``hmac`` module, independently
of the code under test.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SALT_LEN = 32


def response(secret: bytes, salt: bytes) -> bytes:
    """What an Ostiary 4.0 client answers: HMAC-SHA256(secret, salt)."""
    return hmac.new(secret, salt, hashlib.sha256).digest()


def read_to_eof(sock: socket.socket) -> bytes:
    """Read until the peer closes; a reset counts as a close."""
    got = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read up to ``n`` bytes, less if the peer closes, resets or times out first."""
    got = b""
    while len(got) < n:
        try:
            chunk = sock.recv(n - len(got))
        except (TimeoutError, ConnectionResetError):
            return got
        if not chunk:
            return got
        got += chunk
    return got


def talk(
    sock: socket.socket,
    secret: bytes | None = None,
    *,
    response_bytes: bytes | None = None,
    answer: Callable[[bytes], bytes] | None = None,
    hold: bool = False,
    timeout: float = 15.0,
) -> bytes:
    """Play the client on a connected socket; return every byte the server sent.

    Reads the salt (up to 32 bytes, or less if the server closes), then sends
    ``response_bytes``, or ``answer(salt)``, or HMAC(``secret``, salt); with none
    of them it sends nothing. Unless ``hold``, it then shuts its sending side.
    Finally it reads until the server closes.
    """
    sock.settimeout(timeout)
    got = b""
    while len(got) < SALT_LEN:
        try:
            chunk = sock.recv(SALT_LEN - len(got))
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    if response_bytes is None and answer is not None:
        response_bytes = answer(got)
    if response_bytes is None and secret is not None:
        response_bytes = response(secret, got)
    with peer_may_close():
        if response_bytes:
            sock.sendall(response_bytes)
        if not hold:
            sock.shutdown(socket.SHUT_WR)
    return got + read_to_eof(sock)


@contextmanager
def peer_may_close() -> Iterator[None]:
    """Around a client's sends and its shutdown: a handler that closed already is no error.

    Closed with our bytes unread (past 32, or cut at COMM_TIMEOUT), the kernel
    resets the connection: EPIPE, ECONNRESET, or ENOTCONN on the shutdown.
    """
    try:
        yield
    except (BrokenPipeError, ConnectionResetError):
        pass
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise


def knock(
    port: int,
    secret: bytes | None = None,
    *,
    host: str = "127.0.0.1",
    source: str | None = None,
    **kw,
) -> bytes:
    """Connect to host:port (from ``source``, if given) and :func:`talk`; return what came back."""
    src = (source, 0) if source else None
    with socket.create_connection(
        (host, port), timeout=kw.get("timeout", 15.0), source_address=src
    ) as s:
        return talk(s, secret, **kw)


def connect(port: int, source: str, timeout: float = 15.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from address ``source`` (any of 127/8)."""
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )


def reset(sock: socket.socket) -> None:
    """Abort the connection: close with SO_LINGER 0, so the peer gets a RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()


def tcp_pair(
    listen_host: str = "127.0.0.1", connect_host: str | None = None
) -> tuple[socket.socket, socket.socket]:
    """Return (client, server), the two ends of a real loopback TCP connection.

    ``listen_host`` "::" listens dual-stack, so an IPv4 ``connect_host`` gives the
    server an IPv4-mapped peer address (::ffff:127.0.0.1).
    """
    family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as lst:
        if listen_host == "::":
            lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lst.bind((listen_host, 0))
        lst.listen(1)
        port = lst.getsockname()[1]
        client = socket.create_connection((connect_host or listen_host, port), timeout=10)
        server, _ = lst.accept()
    return client, server


class Addresses:
    """Hands out distinct loopback addresses (127.N.x.y), so each client is its own stranger."""

    def __init__(self, net: int) -> None:
        self.net = net
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self) -> str:
        with self.lock:
            n = self.n
            self.n += 1
        assert n < 250 * 250, "out of addresses"
        return f"127.{self.net}.{n // 250}.{n % 250 + 1}"
