"""The client's address: parsed once, canonical, and the store key it is charged to.

Whatever the server handed over (``TCPREMOTEIP``, ``REMOTE_ADDR``,
``getpeername``), only its canonical form goes on: to the lockout store, to
the log and to actions. IPv4 is dotted decimal (``010.000.000.001`` is
10.0.0.1, what it is charged as); an IPv4-mapped IPv6 address is its IPv4
address; other IPv6 is RFC 5952 text without a zone; IPv6 is charged per
prefix (IPV6_PREFIX). Anything else is refused.
"""

ZONE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
MAPPED = b"\0" * 10 + b"\xff\xff"


def parse(text: str, v6_prefix: int = 64) -> tuple[str, bytes]:
    """Return (the canonical address, its store key); raise ValueError for anything else.

    The key is the IPv4 address, or ``PREFIX/BITS`` for IPv6.
    """
    if text.count(".") == 3 and ":" not in text:
        parts = text.split(".")
        if all(p.isdigit() and p.isascii() and len(p) <= 3 and int(p) < 256 for p in parts):
            shown = ".".join(str(int(p)) for p in parts)
            return shown, shown.encode()
        raise ValueError(f"not an IP address: {text!r}")
    from .cpython import AF_INET6, inet_ntop, inet_pton

    addr, pct, zone = text.partition("%")
    if pct and not (zone and set(zone) <= ZONE_CHARS):
        raise ValueError(f"not an IP address: {text!r}")
    try:
        packed = inet_pton(AF_INET6, addr)
    except (OSError, ValueError):
        raise ValueError(f"not an IP address: {text!r}") from None
    if packed[:12] == MAPPED:
        shown = ".".join(str(b) for b in packed[12:])
        return shown, shown.encode()
    return inet_ntop(AF_INET6, packed), prefix_key(packed, v6_prefix)


def prefix_key(packed: bytes, bits: int) -> bytes:
    """Return the store key of the ``bits``-bit prefix holding IPv6 address ``packed``."""
    return network_keys(int.from_bytes(packed, "big"), (bits,))[0]


def network_keys(n: int, levels: "tuple[int, ...] | list[int]") -> list[bytes]:
    """Return the store keys of the ``levels``-bit prefixes holding IPv6 address number ``n``."""
    from .cpython import AF_INET6, inet_ntop

    return [
        b"%s/%d"
        % (
            inet_ntop(AF_INET6, (n >> (128 - bits) << (128 - bits)).to_bytes(16, "big")).encode(),
            bits,
        )
        for bits in levels
    ]


def supernets(key: bytes, levels: tuple[int, ...]) -> list[bytes]:
    """Return the keys of the ``levels``-bit prefixes holding IPv6 key ``key``, in that order.

    Only the levels shorter than the key's own prefix; none for an IPv4 key.
    """
    if b"/" not in key:
        return []
    n, bits = prefix_number(key)
    return network_keys(n, [level for level in levels if level < bits])


def prefix_number(key: bytes) -> tuple[int, int]:
    """Return (the 128-bit number, the prefix length) of IPv6 key ``ADDRESS/BITS``.

    Raises ValueError or OSError for anything else.
    """
    from .cpython import AF_INET6, inet_pton

    text, slash, bits = key.partition(b"/")
    if not slash or not bits.isdigit() or not 0 < int(bits) <= 128:
        raise ValueError(f"not an IPv6 prefix: {key[:60]!r}")
    return int.from_bytes(inet_pton(AF_INET6, text.decode()), "big"), int(bits)


def key(text: str, v6_prefix: int = 64) -> bytes:
    """Return the store key for address ``text`` (see :func:`parse`)."""
    return parse(text, v6_prefix)[1]
