"""DNS look-ups for ostiary-tcpserver, the way ucspi-tcp does them (djbdns's client).

PTR (and, for -p, A/AAAA) queries over UDP to $DNSCACHEIP, else to the
``nameserver`` lines of /etc/resolv.conf, else to 127.0.0.1, in djbdns's
rounds of 1, 3, 11 and 45 seconds; /etc/hosts is not read. Names come back
in djbdns's "todot" form: lowercase, bytes other than ``a-z 0-9 - _`` as
``\\ooo``.
"""

import os
import socket
import struct
import time

DNS_TIMEOUTS = (1, 3, 11, 45)  # djbdns: seconds per round of queries to every server
QTYPE_A, QTYPE_PTR, QTYPE_AAAA = 1, 12, 28
HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")


def dns_servers(env: dict[bytes, bytes]) -> list[str]:
    """$DNSCACHEIP, else resolv.conf's IPv4 nameservers, else 127.0.0.1 (16 at most)."""
    servers = [ip for ip in env.get(b"DNSCACHEIP", b"").decode("latin-1").split() if is_ip4(ip)]
    if not servers:
        try:
            with open("/etc/resolv.conf", "rb") as f:
                lines = f.read().decode("latin-1").splitlines()
        except OSError:
            lines = []
        for line in lines:
            words = line.split()
            if line[:11] in ("nameserver ", "nameserver\t") and len(words) > 1 and is_ip4(words[1]):
                servers.append("127.0.0.1" if words[1] == "0.0.0.0" else words[1])
    return servers[:16] or ["127.0.0.1"]


def is_ip4(text: str) -> bool:
    """True for a dotted-quad IPv4 address."""
    parts = text.split(".")
    return len(parts) == 4 and all(p.isascii() and p.isdigit() and int(p) < 256 for p in parts)


def wire_name(labels: list[bytes]) -> bytes:
    """Encode labels as a DNS name."""
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def reverse_labels(ip: str, v6: bool) -> list[bytes]:
    """The labels of the PTR name for ``ip`` (in-addr.arpa or ip6.arpa)."""
    if not v6:
        return [p.encode() for p in reversed(ip.split("."))] + [b"in-addr", b"arpa"]
    digits = socket.inet_pton(socket.AF_INET6, ip).hex()
    return [d.encode() for d in reversed(digits)] + [b"ip6", b"arpa"]


def read_name(packet: bytes, pos: int) -> tuple[list[bytes], int]:
    """Read a (possibly compressed) name at ``pos``: (labels, position after it)."""
    labels: list[bytes] = []
    after = None
    jumps = 0
    while True:
        n = packet[pos]
        if n >= 192:
            jumps += 1
            if jumps > 100:
                raise ValueError("DNS compression loop")
            if after is None:
                after = pos + 2
            pos = ((n & 63) << 8) | packet[pos + 1]
        elif n >= 64:
            raise ValueError("bad DNS label")
        elif n == 0:
            return labels, (pos + 1 if after is None else after)
        else:
            if pos + 1 + n > len(packet):
                raise ValueError("truncated DNS label")
            labels.append(packet[pos + 1 : pos + 1 + n])
            pos += 1 + n


def to_dot(labels: list[bytes]) -> str:
    """djbdns's dns_domain_todot: lowercase, other bytes as \\ooo, '.' for the root."""
    parts = []
    for label in labels:
        low = label.lower()
        parts.append("".join(chr(b) if b in HOST_CHARS else "\\%03o" % b for b in low))
    return ".".join(parts) or "."


def from_dot(name: str) -> list[bytes]:
    """djbdns's dns_domain_fromdot: undo \\ooo escapes; empty labels vanish."""
    labels, label, i = [], bytearray(), 0
    data = os.fsencode(name)
    while i < len(data):
        ch = data[i]
        i += 1
        if ch == 0x2E:
            if label:
                labels.append(bytes(label))
                label = bytearray()
            continue
        if ch == 0x5C and i < len(data):
            ch, n = data[i], 0
            if 0x30 <= ch <= 0x37:
                ch = 0
                while n < 3 and i < len(data) and 0x30 <= data[i] <= 0x37:
                    ch = ch * 8 + data[i] - 0x30
                    i += 1
                    n += 1
                ch &= 255
            else:
                i += 1
        label.append(ch)
        if len(label) > 63:
            raise ValueError("DNS label too long")
    if label:
        labels.append(bytes(label))
    return labels


def dns_query(servers: list[str], labels: list[bytes], qtype: int) -> bytes | None:
    """Ask the servers in djbdns's rounds (1, 3, 11, 45 s); return the first usable reply."""
    question = wire_name(labels) + struct.pack(">HH", qtype, 1)
    query = os.urandom(2) + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + question
    for timeout in DNS_TIMEOUTS:
        for server in servers:
            reply = udp_exchange(server, query, timeout)
            # Truncated, or a failure other than "no such name": the next server.
            if reply is not None and not reply[2] & 2 and reply[3] & 15 in (0, 3):
                return reply
    return None


def udp_exchange(server: str, query: bytes, timeout: float) -> bytes | None:
    """Send ``query`` to ``server`` port 53; return the first reply to it, or None."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((server, 53))
            s.send(query)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                s.settimeout(left)
                reply = s.recv(65535)
                if relevant(reply, query):
                    return reply
        except OSError:  # refused, unreachable, timed out
            return None


def relevant(reply: bytes, query: bytes) -> bool:
    """True if ``reply`` answers ``query``: same id, one question, the same question."""
    question = query[12:]
    return (
        len(reply) >= 12
        and reply[:2] == query[:2]
        and reply[4:6] == b"\0\1"
        and reply[12 : 12 + len(question)].lower() == question.lower()
    )


def records(reply: bytes, qtype: int) -> list[tuple[int, int]]:
    """(offset, length) of the rdata of each answer of type ``qtype``, class IN."""
    count = struct.unpack(">H", reply[6:8])[0]
    pos = read_name(reply, 12)[1] + 4
    found = []
    for _ in range(count):
        pos = read_name(reply, pos)[1]
        rtype, rclass, _ttl, length = struct.unpack(">HHIH", reply[pos : pos + 10])
        pos += 10
        if rtype == qtype and rclass == 1:
            found.append((pos, length))
        pos += length
    return found


def dns_name(servers: list[str], ip: str, v6: bool) -> str | None:
    """The first PTR name of ``ip`` (todot form), or None: djbdns's dns_name4."""
    reply = dns_query(servers, reverse_labels(ip, v6), QTYPE_PTR)
    if reply is None:
        return None
    try:
        for pos, _length in records(reply, QTYPE_PTR):
            return to_dot(read_name(reply, pos)[0])
    except (IndexError, ValueError, struct.error):
        pass
    return None


def name_matches(servers: list[str], name: str, ip: str, v6: bool) -> bool:
    """-p: True if ``name``'s A (AAAA) records include ``ip``, as tcpserver checks."""
    want = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, ip)
    if not v6 and all(c in "0123456789.[]" for c in name):  # dns_ip4 reads it as numbers
        codes, code = [], 0
        for c in name + ".":
            if c == ".":
                codes.append(code & 255)
                code = 0
            elif c not in "[]":
                code = code * 10 + int(c)
        return any(bytes(codes[i : i + 4]) == want for i in range(0, len(codes) - 3, 4))
    try:
        labels = from_dot(name)
    except ValueError:
        return False
    qtype = QTYPE_AAAA if v6 else QTYPE_A
    reply = dns_query(servers, labels, qtype)
    if reply is None:
        return False
    try:
        return any(reply[p : p + n] == want for p, n in records(reply, qtype))
    except (IndexError, ValueError, struct.error):
        return False
