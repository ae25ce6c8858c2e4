"""ostiary-tcprules: compile tcpserver rules into a CDB, byte for byte like tcprules.

Usage: ostiary-tcprules rules.cdb rules.tmp < rules

The rules language, and the file written, are those of ucspi-tcp 0.88's
tcprules (see tcprules(1)): the same keys, values, key order and duplicates
(the first rule for an address wins), so real tcpserver and tcprulescheck read
the result, and ostiary_ucspi.rules reads real tcprules' output. Values: deny
is ``D\\0``, allow is empty, each variable appends ``+NAME=value\\0``.

Lines that real tcprules silently skips are skipped here too: lines starting
with ``#``, blank lines, and lines without a colon. Trailing blanks and tabs
are ignored; a carriage return is not (a DOS line ending makes the line bad).

The rules are written to rules.tmp, flushed to disk, then renamed over
rules.cdb, so a running server sees the old file or the new one, never a mix.
Unlike real tcprules, a failed run removes rules.tmp and names the bad line.

Exit codes: :data:`EXITS`. On any failure rules.cdb is left untouched.
"""

import os
import sys

from .. import fail
from ..cdb import write_cdb
from ..fail import Fatal

PROG = "ostiary-tcprules"
USAGE = "ostiary-tcprules rules.cdb rules.tmp < rules"
EXITS = {
    0: "rules.cdb replaced; --help, --version",
    100: "usage error, or a line that cannot be parsed (as real tcprules); also rules.tmp "
    "naming the same path as rules.cdb (real tcprules would truncate the live file)",
    111: "cannot create or write rules.tmp, read the input, or rename (as real tcprules)",
}


class RuleError(ValueError):
    """A line real tcprules refuses to parse; the argument says why."""


def _number(text: bytes) -> int:
    """Read a range bound like djb's scan_ulong: digits up to a NUL, empty is 0."""
    text = text.partition(b"\0")[0]
    if text and not text.isdigit():
        raise RuleError("bad number in address range")
    # 2**64 divides 10**64: the last 64 digits decide (and int() refuses over 4300).
    return int(text[-64:] or b"0") % 2**64


def expand(address: bytes) -> list[bytes]:
    """Return the keys an address stands for: ``1.2.3.4-7`` is four keys."""
    if b"=" in address or b"@" in address or b"-" not in address:
        return [address]
    dash = address.index(b"-")
    left = address.rfind(b".", 0, dash) + 1
    right = address.find(b".", dash + 1)
    if right == -1:
        right = len(address)
    bottom = _number(address[left:dash])
    top = min(_number(address[dash + 1 : right]), 255)
    head, tail = address[:left], address[right:]
    return [head + str(n).encode() + tail for n in range(bottom, top + 1)]


def parse_instructions(text: bytes) -> bytes:
    """Turn ``allow,VAR="x"`` or ``deny`` into the value tcprules stores."""
    if text.startswith(b"deny"):
        value, rest = b"D\0", text[4:]
    elif text.startswith(b"allow"):
        value, rest = b"", text[5:]
    else:
        raise RuleError("instructions must begin with allow or deny")
    while rest:
        if rest[:1] != b",":
            if rest[:1] == b"\r":
                raise RuleError("carriage return in line (DOS line ending?)")
            raise RuleError('expected ,VAR="value" or end of line')
        eq = rest.find(b"=")
        if eq == -1:
            raise RuleError("variable without =")
        name = rest[1:eq]
        shown = name.decode(errors="backslashreplace")
        if eq + 1 == len(rest):
            raise RuleError(f"variable {shown} has no value")
        delimiter = rest[eq + 1 : eq + 2]
        end = rest.find(delimiter, eq + 2)
        if end == -1:
            quote = delimiter.decode(errors="backslashreplace")
            raise RuleError(f'value of {shown} has no closing {quote}; write {shown}="value"')
        value += b"+" + name + b"=" + rest[eq + 2 : end] + b"\0"
        rest = rest[end + 1 :]
    return value


def parse_rules(data: bytes) -> list[tuple[bytes, bytes]]:
    """Return the (key, value) records for a rules file, in file order.

    Raises Fatal (exit 100) naming the first bad line.
    """
    records: list[tuple[bytes, bytes]] = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if line[:1] in (b"", b"#"):
            continue
        line = line.rstrip(b" \t")
        address, colon, instructions = line.partition(b":")
        if not colon:
            continue
        try:
            value = parse_instructions(instructions)
            records.extend((key, value) for key in expand(address))
        except RuleError as e:
            text = f"line {number}: unable to parse this line ({e}): {os.fsdecode(line)}"
            raise Fatal(text, fail.USAGE) from None
    return records


def _compile(cdb: str, tmp: str) -> None:
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise fail.unable(f"create {tmp}", e) from None
    try:
        with open(fd, "wb") as out:
            try:
                with open(0, "rb", closefd=False) as stdin:
                    data = stdin.read()
            except OSError as e:
                raise fail.unable("read input", e) from None
            records = parse_rules(data)
            try:
                write_cdb(out, records)
                out.flush()
                os.fsync(out.fileno())
            except OSError as e:
                raise fail.unable(f"write to {tmp}", e) from None
        try:
            os.rename(tmp, cdb)
        except OSError as e:
            raise fail.unable(f"move {tmp} to {cdb}", e) from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def body(argv: list[str]) -> None:
    """Compile standard input into argv[1] by way of argv[2]."""
    args = argv[1:]
    if args[:1] in (["-h"], ["--help"], ["--version"]):
        fail.standard(args[0])
    if len(args) < 2:
        raise fail.Usage(USAGE)
    if os.path.abspath(args[0]) == os.path.abspath(args[1]):
        raise Fatal("rules.tmp must not be rules.cdb", fail.USAGE)
    _compile(args[0], args[1])


def main(argv: list[str] | None = None) -> int:
    """Run ostiary-tcprules; ``argv`` is the whole command line (sys.argv); return the exit code."""
    return fail.run(PROG, USAGE, body, sys.argv if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
