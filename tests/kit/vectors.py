"""Test vectors from data files in ``tests/vectors/``; each file cites its source.

A file holds blocks of ``name``, ``key``, ``msg`` and ``digest`` lines (``#`` starts a
comment line); a value in double quotes is text, otherwise hex.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

DIR = Path(__file__).resolve().parent.parent / "vectors"


class Vector(NamedTuple):
    """HMAC-SHA256(key, msg) == digest."""

    name: str
    key: bytes
    msg: bytes
    digest: bytes


def _value(text: str) -> bytes:
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1].encode()
    return bytes.fromhex(text)


def load(name: str) -> list[Vector]:
    """The vectors of ``tests/vectors/NAME.txt``, in file order."""
    out, block = [], {}
    lines = (DIR / f"{name}.txt").read_text().splitlines()
    for n, line in enumerate(lines + [""], 1):
        if line.startswith("#"):
            continue
        if not line.strip():
            if block:
                out.append(
                    Vector(
                        block["name"],
                        _value(block["key"]),
                        _value(block["msg"]),
                        bytes.fromhex(block["digest"]),
                    )
                )
                block = {}
            continue
        field, _, value = line.partition(" ")
        if field not in Vector._fields or field in block:
            raise ValueError(f"{name}.txt:{n}: unexpected {field!r}")
        block[field] = value.strip()
    return out


(OSTIARY,) = load("ostiary-4.0")  # the real ostclient's answer (../shared/PROTOCOL.md, section 1)
RFC4231 = load("rfc4231")
