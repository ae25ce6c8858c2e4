"""Coverage-guided fuzzing of the lockout store's journal reader (atheris); seeds: corpus/README.md.

Usage: python tests/fuzz/fuzz_journal.py [libFuzzer flags] [corpus dirs]
"""

import sys
import zlib
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for kit
with atheris.instrument_imports(include=["ostiary_ucspi"]):
    from kit.parsers import check_journal


def sealed(data: bytes) -> bytes:
    """Return ``data`` with each line after the header checksummed as the store writes it.

    A mutation almost always breaks the CRC-32 that covers the whole journal;
    sealed, the same bytes reach the record parser behind it. A line's own
    last 9 bytes stand for its old checksum, a ``+`` after them is kept; the
    text after the last newline stays as it is (a torn write).
    """
    head, _, body = data.partition(b"\n")
    *lines, tail = body.split(b"\n")
    out = head + b"\n"
    for line in lines:
        more = line.endswith(b"+")
        out += line[: -10 if more else -9] + b" "
        out += b"%08x%s\n" % (zlib.crc32(out), b"+" if more else b"")
    return out + tail


def first_fold(data: bytes) -> int:
    """Return where the first transaction after the header ends (a fold may end there), or 0."""
    i = data.find(b"\n") + 1
    while i:
        i = data.find(b"\n", i) + 1
        if i and data[i - 2 : i - 1] != b"+":
            return i
    return 0


def one_input(data: bytes) -> None:
    """Read ``data`` as it is, then sealed: whole, and from its first fold on (``!from``)."""
    check_journal(data)
    data = sealed(data)
    check_journal(data)
    check_journal(data, first_fold(data))


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
