"""Look up a connection in a tcprules CDB exactly as ucspi-tcp 0.88's tcpserver does.

Keys are tried in this order; the first key present decides:

1. ``info@ip``         (only if ``info`` is given)
2. ``info@=host``      (only if ``info`` and ``host`` are given)
3. ``ip``
4. ``=host``           (only if ``host`` is given)
5. ``ip``'s prefixes ending in a dot, longest first (``1.2.3.``, ``1.2.``, ``1.``)
6. ``=`` + ``host``'s suffixes starting with a dot, longest first (``=.example.com``)
7. ``=``               (only if ``host`` is given)
8. the empty key

A value is a run of NUL-terminated records: ``D`` denies, ``+NAME=value`` sets
a variable (later ones win), anything else is ignored, as are bytes after the
last NUL. tcpserver sets the variables after its own TCP* ones, so a rule
may override them. ``host`` and ``info`` of ``None`` mean "not known", as when
tcpserver has no name (it never passes an empty one); an empty string is a
known empty value, as tcprulescheck treats a set-but-empty variable.

IPv6: ucspi-tcp 0.88 is IPv4-only, and its tcprules cannot compile a key that
contains a colon. An IPv4-mapped address (``::ffff:192.0.2.1``) is therefore
looked up as the plain IPv4 address, as the IPv6-patched tcpservers do; a
native IPv6 address goes through the same algorithm unchanged, so in practice
it matches only host-based rules and the default (empty) key.
"""

import errno
import os
import struct

from cdblib import Reader

from ..cdb import CdbError, check_header


class RulesError(Exception):
    """The rules CDB cannot be used: tcpserver drops the connection."""


class RulesMissing(RulesError):
    """The rules CDB does not exist (tcpserver -X would allow the connection)."""


def unmapped(ip: str) -> str:
    """Return an IPv4-mapped IPv6 address as its IPv4 address, any other unchanged."""
    return ip[7:] if ip[:7].lower() == "::ffff:" and "." in ip else ip


def candidate_keys(ip: str, host: str | None = None, info: str | None = None) -> list[str]:
    """Return the keys tcpserver tries for this connection, in order."""
    keys = []
    if info is not None:
        keys.append(f"{info}@{ip}")
        if host is not None:
            keys.append(f"{info}@={host}")
    keys.append(ip)
    if host is not None:
        keys.append(f"={host}")
    keys.extend(ip[:i] for i in range(len(ip), 0, -1) if ip[i - 1] == ".")
    if host is not None:
        keys.extend(f"={host[i:]}" for i in range(len(host)) if host[i] == ".")
        keys.append("=")
    keys.append("")
    return keys


def parse_value(value: bytes) -> tuple[bool, dict[str, str]]:
    """Interpret a rule's value as tcpserver does: (allowed, variables).

    A variable with an empty name cannot be put in an environment and is
    skipped; a denied connection gets no variables.
    """
    allowed = True
    variables: dict[str, str] = {}
    for record in value.split(b"\0")[:-1]:
        if record[:1] == b"D":
            allowed = False
        elif record[:1] == b"+":
            name, eq, data = record[1:].partition(b"=")
            if eq and name:
                variables[os.fsdecode(name)] = os.fsdecode(data)
    return (True, variables) if allowed else (False, {})


def _open(cdb_path: str) -> Reader:
    try:
        with open(cdb_path, "rb") as f:
            data = f.read()
    except OSError as e:
        cls = RulesMissing if e.errno == errno.ENOENT else RulesError
        raise cls(f"unable to read {cdb_path}: {e.strerror}") from e
    try:
        check_header(data)
    except CdbError as e:
        raise RulesError(f"unable to read {cdb_path}: not a cdb file: {e}") from e
    return Reader(data)


def lookup(
    cdb_path: str, ip: str, host: str | None = None, info: str | None = None
) -> tuple[bool, dict[str, str]] | None:
    """Apply the rules in ``cdb_path`` to a connection from ``ip``.

    Returns None when no key matched (tcpserver then allows the connection and
    sets no variables), else (allowed, variables). Raises RulesMissing when the
    file does not exist and RulesError when it cannot be read or is corrupt.
    """
    ip = unmapped(ip)
    reader = _open(cdb_path)
    try:
        for key in candidate_keys(ip, host, info):
            value = reader.get(os.fsencode(key))
            if value is not None:
                return parse_value(value)
    except struct.error as e:  # a hash table or record header runs past the end
        raise RulesError(f"unable to read {cdb_path}: corrupt cdb file") from e
    return None
