"""ostiary-tcprules and ostiary_ucspi.rules against real ucspi-tcp 0.88.

Every rules file is compiled by real tcprules and by ostiary-tcprules and the
two CDBs must be identical; real tcprulescheck, real tcpserver and our lookup
must then reach the same verdicts.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
from pathlib import Path

import cdblib
import pytest
from conftest import ROOT, project_tool, require_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ostiary_ucspi.cdb import write_cdb
from ostiary_ucspi.ucspi import rules
from ostiary_ucspi.ucspi.tcprules import Fatal, parse_rules

# Keys whose djb hash is 0 and 0 mod 1024: cdblib.Writer (pure-cdb 4) takes a
# slot holding hash 0 for empty and overwrites it, losing the deny rule.
HASH0, HASH0_NEIGHBOUR = b"39.160.226.88", b"10.0.1.92"

LONG_BOUNDS = ROOT / "tests" / "fuzz" / "corpus" / "tcprules" / "crash-long-range-bound"

CORPUS: dict[str, bytes] = {
    "empty": b"",
    "comments-and-blanks": b"# nothing here\n\n#1.2.3.4:deny\n   \n\t\n\r\n",
    "protocol-example": b'127.0.0.1:allow,OSTIARY_X="yes"\n10.0.0.:deny\n1.2.3.4-7:allow\n:allow\n',
    "manpage": (
        b"joe@127.0.0.1:allow,WHO=/joe/\n18.23.0.32:deny\n:allow\n127.:deny\n"
        b'10.0.:allow,RELAYCLIENT="@fix.me"\n10.2-3.:allow,RELAYCLIENT=/@fix.me/\n'
        b'127.0.0.1:allow,RELAYCLIENT="",TCPLOCALHOST="movie.edu"\n'
    ),
    "every-key-kind": (
        b"joe@127.0.0.1:allow,K=/info@ip/\njoe@=www.example.com:allow,K=/info@=host/\n"
        b"18.23.0.32:allow,K=/ip/\n=mail.example.com:allow,K=/=host/\n"
        b"1.2.3.:deny\n1.2.:allow,K=/1.2./\n"
        b"=.example.com:allow,K=/=.example.com/\n=.com:deny\n=:allow,K=/=/\n:deny\n"
    ),
    "delimiters": (
        b'1.2.3.4:allow,A=//,B=\'x y\',C=xhellox,D=|a,b=c|,E="",F=..,G=%with "quotes"%\n'
        b'1.2.3.5:deny,A="denied vars are stored"\n'
        b'1.2.3.6:allow,A="=",B-C="dash",lower="x"\n'
        b':allow,A,B="comma in name",=""\n'
    ),
    "ranges": (
        b"1.2.3.4-7:allow\n10.2-3.:deny\n1.2.3.-2:allow,R=/low/\n1.2.3.250-300:allow,R=/cap/\n"
        b"1.2.3.9-8:deny\n1.2.3.10-:deny\n1.2.3.04-06:deny\n1-3.:allow\n1.2-3.4-5:allow\n"
        b"1.2.3.18446744073709551617-2:allow\n1.2.3.300-400:deny\n1.2.3.\x004-5:allow\n"
    ),
    "no-range-expansion": b"=a-b.example:allow\njoe@1.2.3.4-5:deny\nx-y=z:allow\n",
    "duplicates": (
        b'1.2.3.4:deny\n1.2.3.4:allow,A="second"\n1.2.3.4-6:allow,A="range"\n'
        b":deny\n:allow\n=:allow\n=:deny\n"
    ),
    "whitespace": (
        b"1.2.3.4:allow \t \n 1.2.3.5:deny\n1.2.3.6\t:deny\n #x:allow\n"
        b'no colon here\n1.2.3.7:allow,A=" spaces kept "  \n'
    ),
    "no-final-newline": b"1.2.3.4:deny\n:allow",
    "eight-bit": b'=h\xc3\xa9.example:allow,N="\xff\xfe"\n\xff@1.2.3.4:deny\n',
    "hash-zero": HASH0 + b":deny\n" + HASH0_NEIGHBOUR + b":allow\n:allow\n",
    "many-keys": b'10.0-255.:allow\n10.1.1.0-255:deny\n10.1.2.0-255:allow,X="y"\n:deny\n',
    "example-file": (ROOT / "tcprules" / "ostiary").read_bytes(),
    # Bounds of 5,001 digits (10**5000 + n): once a ValueError, Python's int() limit.
    "long-range-bounds": LONG_BOUNDS.read_bytes(),
}

BAD: dict[str, tuple[bytes, int]] = {
    "undelimited-value": (b"1.2.3.4:allow,X=y\n", 1),
    "allow-garbage": (b"# c\n1.2.3.4:allowx\n", 2),
    "unknown-instruction": (b":permit\n", 1),
    "case": (b"1.2.3.4:Allow\n", 1),
    "variable-without-equals": (b"1.2.3.4:allow,X\n", 1),
    "variable-without-value": (b"1.2.3.4:allow,X=\n", 1),
    "junk-after-value": (b'1.2.3.4:allow,X="y"z\n', 1),
    "trailing-comma": (b'1.2.3.4:allow,X="y",\n', 1),
    "space-before-comma": (b'1.2.3.4:deny ,X="y"\n', 1),
    "two-dashes": (b"1-2-3:allow\n", 1),
    "range-garbage": (b"1.2.3.4-7x:allow\n", 1),
    "dos-line-ending": (b"1.2.3.4:allow\r\n", 1),
    "ipv6-address": (b"::1:allow\n", 1),
    "two-colons": (b"a:b:allow\n", 1),
    "bad-after-good": (b'1.2.3.4:allow\n\n#x\n10.:deny\n5.6.7.8:allow,A="x",B=y\n:allow\n', 5),
    "bad-last-line-no-newline": (b"1.2.3.4:allow\n1.2.3.5:deny,", 2),
}

QUERIES: list[tuple[str, str | None, str | None]] = [
    ("127.0.0.1", None, None),
    ("127.0.0.2", None, None),
    ("127.0.0.1", None, "joe"),
    ("127.0.0.1", None, "bill"),
    ("10.0.0.5", None, None),
    ("10.0.1.5", None, None),
    ("10.2.9.9", None, None),
    ("10.3.1.1", None, None),
    ("10.4.1.1", None, None),
    ("10.1.1.7", None, None),
    ("10.1.2.7", None, None),
    ("1.2.3.0", None, None),
    ("1.2.3.4", None, None),
    ("1.2.3.4", None, "joe"),
    ("1.2.3.5", None, None),
    ("1.2.3.6", None, None),
    ("1.2.3.7", None, None),
    ("1.2.3.8", None, None),
    ("1.2.3.255", None, None),
    ("1.3.4.5", None, None),
    ("18.23.0.32", "mail.example.com", None),
    ("9.9.9.9", "mail.example.com", None),
    ("9.9.9.9", "www.example.com", "joe"),
    ("9.9.9.9", "example.com", None),
    ("9.9.9.9", "example.org", None),
    ("9.9.9.9", "", None),
    ("39.160.226.88", None, None),
    ("10.0.1.92", None, None),
    ("9.9.9.9", "hé.example", None),
    ("192.0.2.7", None, None),
    ("198.51.100.1", "host.example.net", None),
    ("203.0.113.15", None, None),
    ("203.0.113.21", None, None),
    ("0.0.0.0", None, None),
    ("2001:db8::1", None, None),
    ("2001:db8::1", "v6.example.com", "joe"),
]


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    return {
        "tcprules": require_tool("tcprules"),
        "tcprulescheck": require_tool("tcprulescheck"),
        "ours": project_tool("ostiary-tcprules"),
    }


def compile_with(
    tool: str, rules_text: bytes, cdb: Path, tmp: Path | None = None
) -> subprocess.CompletedProcess:
    tmp = tmp or cdb.with_suffix(".tmp")
    return subprocess.run([tool, str(cdb), str(tmp)], input=rules_text, capture_output=True)


def check(tcprulescheck: str, cdb: Path, ip: str, host: str | None, info: str | None):
    """Run real tcprulescheck: (rule key or None, verdict as rules.lookup gives it)."""
    env = {"TCPREMOTEIP": ip}
    if host is not None:
        env["TCPREMOTEHOST"] = host
    if info is not None:
        env["TCPREMOTEINFO"] = info
    out = subprocess.run([tcprulescheck, str(cdb)], env=env, capture_output=True, check=True).stdout
    lines = [os.fsdecode(line) for line in out.split(b"\n")[:-1]]
    if lines == ["default:", "allow connection"]:
        return None, None
    assert lines[0].startswith("rule ") and lines[0].endswith(":"), lines
    key = lines[0][5:-1]
    if lines[-1] == "deny connection":
        return key, (False, {})
    assert lines[-1] == "allow connection", lines
    variables = {}
    for line in lines[1:-1]:
        assert line.startswith("set environment variable "), lines
        name, _, value = line[len("set environment variable ") :].partition("=")
        if name:  # lookup skips empty names: no environment can hold them
            variables[name] = value
    return key, (True, variables)


def cdb_items(path: Path) -> list[tuple[bytes, bytes]]:
    with cdblib.Reader(path.read_bytes()) as reader:
        return reader.items()


def io_cdb(records: list[tuple[bytes, bytes]]) -> bytes:
    buf = io.BytesIO()
    write_cdb(buf, records)
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_same_cdb_and_verdicts(name: str, tools: dict[str, str], tmp_path: Path) -> None:
    text = CORPUS[name]
    real, ours = tmp_path / "real.cdb", tmp_path / "ours.cdb"
    r = compile_with(tools["tcprules"], text, real)
    assert r.returncode == 0, r.stderr
    o = compile_with(tools["ours"], text, ours)
    assert (o.returncode, o.stderr) == (0, b"")
    assert cdb_items(ours) == cdb_items(real)  # keys, order, duplicates, value bytes
    assert ours.read_bytes() == real.read_bytes()
    assert ours.stat().st_mode == real.stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.cdb", "real.cdb"]

    with cdblib.Reader(real.read_bytes()) as reader:
        present = set(reader.keys())
    for ip, host, info in QUERIES:
        key, verdict = check(tools["tcprulescheck"], real, ip, host, info)
        assert check(tools["tcprulescheck"], ours, ip, host, info) == (key, verdict)
        assert rules.lookup(str(real), ip, host, info) == verdict, (ip, host, info)
        assert rules.lookup(str(ours), ip, host, info) == verdict, (ip, host, info)
        tried = [k for k in rules.candidate_keys(ip, host, info) if os.fsencode(k) in present]
        assert (tried[0] if tried else None) == key


def test_hash_zero_key_kept(tools: dict[str, str], tmp_path: Path) -> None:
    assert cdblib.djb_hash(HASH0) == 0 and cdblib.djb_hash(HASH0_NEIGHBOUR) % 1024 == 0
    cdb = tmp_path / "r.cdb"
    assert compile_with(tools["ours"], CORPUS["hash-zero"], cdb).returncode == 0
    assert rules.lookup(str(cdb), "39.160.226.88") == (False, {})
    assert rules.lookup(str(cdb), "10.0.1.92") == (True, {})


def test_example_file_decisions(tools: dict[str, str], tmp_path: Path) -> None:
    cdb = tmp_path / "ostiary.cdb"
    assert compile_with(tools["ours"], CORPUS["example-file"], cdb).returncode == 0
    expected = {
        "127.0.0.1": True,
        "127.1.2.3": True,
        "192.0.2.9": True,
        "198.51.100.7": False,
        "203.0.113.9": True,
        "203.0.113.10": False,
        "203.0.113.20": False,
        "203.0.113.21": True,
        "8.8.8.8": True,
        "2001:db8::1": True,
        "::ffff:198.51.100.7": False,
    }
    for ip, allowed in expected.items():
        verdict = rules.lookup(str(cdb), ip)
        assert verdict is not None and verdict[0] is allowed, ip


def test_lookup_order(tools: dict[str, str], tmp_path: Path) -> None:
    """Remove the winning key each round: the next one in tcpserver's order wins."""
    order = [
        "joe@1.2.3.4",
        "joe@=www.example.com",
        "1.2.3.4",
        "=www.example.com",
        "1.2.3.",
        "1.2.",
        "1.",
        "=.example.com",
        "=.com",
        "=",
        "",
    ]
    assert rules.candidate_keys("1.2.3.4", "www.example.com", "joe") == order
    cdb = tmp_path / "r.cdb"
    for start in range(len(order)):
        text = "".join(f'{k}:allow,N="{i}"\n' for i, k in enumerate(order) if i >= start)
        assert compile_with(tools["ours"], text.encode(), cdb).returncode == 0
        want = (order[start], (True, {"N": str(start)}))
        assert check(tools["tcprulescheck"], cdb, "1.2.3.4", "www.example.com", "joe") == want
        assert rules.lookup(str(cdb), "1.2.3.4", "www.example.com", "joe") == want[1]
    cdb.unlink()
    assert compile_with(tools["ours"], b"1.2.3.5:deny\n", cdb).returncode == 0
    assert check(tools["tcprulescheck"], cdb, "1.2.3.4", None, None) == (None, None)
    assert rules.lookup(str(cdb), "1.2.3.4") is None


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_line(name: str, tools: dict[str, str], tmp_path: Path) -> None:
    text, line = BAD[name]
    old = b"old cdb, must survive"
    results = {}
    for tool in ("tcprules", "ours"):
        d = tmp_path / tool
        d.mkdir()
        (d / "r.cdb").write_bytes(old)
        results[tool] = compile_with(tools[tool], text, d / "r.cdb")
        assert (d / "r.cdb").read_bytes() == old
    assert results["tcprules"].returncode == 100
    assert results["ours"].returncode == 100
    assert results["ours"].stderr.startswith(f"ostiary-tcprules: fatal: line {line}: ".encode())
    assert os.listdir(tmp_path / "ours") == ["r.cdb"]


def test_range_bounds_are_read_modulo_2_64_whatever_their_length() -> None:
    """Like djb's scan_ulong on 64 bits: 10**5000 + 4 is 4 (the file's two rules)."""
    assert parse_rules(LONG_BOUNDS.read_bytes()) == [
        (b"1.2.3.4", b""),
        (b"1.2.3.5", b""),
        (b"1.2.4.2", b"D\0"),
        (b"1.2.4.3", b"D\0"),
    ]


def test_ipv6(tmp_path: Path) -> None:
    cdb = tmp_path / "r.cdb"
    with open(cdb, "wb") as f, cdblib.Writer(f) as w:
        w.put(b"192.0.2.", b"D\0")
        w.put(b"2001:db8::1", b"+EXACT=yes\0")  # 0.88's tcprules cannot write this key
        w.put(b"=v6.example.com", b"+HOST=yes\0")
        w.put(b"", b"+DEFAULT=yes\0")
    assert rules.lookup(str(cdb), "::ffff:192.0.2.7") == (False, {})
    assert rules.lookup(str(cdb), "::FFFF:192.0.2.7") == (False, {})
    assert rules.lookup(str(cdb), "2001:db8::1") == (True, {"EXACT": "yes"})
    assert rules.lookup(str(cdb), "2001:db8::2", "v6.example.com") == (True, {"HOST": "yes"})
    assert rules.lookup(str(cdb), "2001:db8::2") == (True, {"DEFAULT": "yes"})


def test_parse_value_like_tcpserver() -> None:
    value = b"+A=1\0+NOEQ\0+B=x=y\0+A=2\0X\0+=empty name\0+C=no final NUL"
    assert rules.parse_value(value) == (True, {"A": "2", "B": "x=y"})
    assert rules.parse_value(b"+A=1\0D\0") == (False, {})
    assert rules.parse_value(b"D") == (True, {})  # no NUL: tcpserver ignores it


def serve_once(tcpserver: str, cdb: Path, allow_missing: bool = False) -> bytes:
    """Connect once to real tcpserver -x cdb running env; return what it sent."""
    opts = ["-X"] if allow_missing else []
    server = subprocess.Popen(
        [tcpserver, "-1", "-HRl0", *opts, "-x", str(cdb), "127.0.0.1", "0", "env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={"PATH": os.environ["PATH"]},
    )
    try:
        port = int(server.stdout.readline())
        data = b""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            while chunk := s.recv(4096):
                data += chunk
        return data
    finally:
        server.terminate()
        server.wait()


def test_real_tcpserver_agrees(tools: dict[str, str], tmp_path: Path) -> None:
    tcpserver = require_tool("tcpserver")
    cdb = tmp_path / "r.cdb"
    with open(cdb, "wb") as f, cdblib.Writer(f) as w:
        w.put(b"127.0.0.1", b"+A=1\0+NOEQ\0+B=x=y\0+A=2\0X\0+TCPLOCALHOST=rules\0+C=tail")
    lines = serve_once(tcpserver, cdb).decode().splitlines()
    env = dict(line.split("=", 1) for line in lines if line[:1] != "=")
    allowed, variables = rules.lookup(str(cdb), "127.0.0.1")
    assert allowed and variables == {"A": "2", "B": "x=y", "TCPLOCALHOST": "rules"}
    assert {k: env[k] for k in variables} == variables  # rule variables beat tcpserver's own
    assert "NOEQ" not in env and "C" not in env

    assert compile_with(tools["ours"], b"127.0.0.1:deny\n:allow\n", cdb).returncode == 0
    assert rules.lookup(str(cdb), "127.0.0.1") == (False, {})
    assert serve_once(tcpserver, cdb) == b""
    assert compile_with(tools["ours"], b'127.:allow,OSTIARY_X="yes"\n:deny\n', cdb).returncode == 0
    assert b"\nOSTIARY_X=yes\n" in serve_once(tcpserver, cdb)

    cdb.unlink()
    assert serve_once(tcpserver, cdb) == b""
    assert b"TCPREMOTEIP=127.0.0.1" in serve_once(tcpserver, cdb, allow_missing=True)
    with pytest.raises(rules.RulesMissing):
        rules.lookup(str(cdb), "127.0.0.1")


def test_unusable_cdb(tmp_path: Path) -> None:
    good = tmp_path / "good.cdb"
    good.write_bytes(io_cdb(parse_rules(CORPUS["many-keys"])))
    bad = tmp_path / "bad.cdb"
    for content in (b"", b"x" * 100, b"\xff" * 4096, good.read_bytes()[:-100]):
        bad.write_bytes(content)
        with pytest.raises(rules.RulesError) as e:
            rules.lookup(str(bad), "10.1.1.1")
        assert not isinstance(e.value, rules.RulesMissing)
        assert str(bad) in str(e.value)
    with pytest.raises(rules.RulesError) as e:
        rules.lookup(str(tmp_path), "10.1.1.1")
    assert not isinstance(e.value, rules.RulesMissing)
    assert rules.lookup(str(good), "10.1.1.1") == (False, {})


def test_replaces_atomically(tools: dict[str, str], tmp_path: Path) -> None:
    cdb, tmp = tmp_path / "r.cdb", tmp_path / "r.tmp"
    assert compile_with(tools["ours"], b"1.2.3.4:deny\n", cdb).returncode == 0
    before = cdb.stat().st_ino
    with open(cdb, "rb") as held:  # a server that opened the old file keeps reading it
        old = held.read()
        tmp.write_bytes(b"stale junk from an earlier crash")
        assert compile_with(tools["ours"], b"1.2.3.4:allow\n", cdb, tmp).returncode == 0
        held.seek(0)
        assert held.read() == old
    assert cdb.stat().st_ino != before
    assert not tmp.exists()
    assert rules.lookup(str(cdb), "1.2.3.4") == (True, {})


def test_fsync_before_rename(tools: dict[str, str], tmp_path: Path) -> None:
    strace = require_tool("strace")
    log = tmp_path / "trace"
    calls = "trace=openat,fsync,rename,renameat,renameat2"
    cmd = [strace, "-f", "-o", str(log), "-e", calls, tools["ours"], "r.cdb", "r.tmp"]
    subprocess.run(cmd, cwd=tmp_path, input=b":allow\n", check=True, capture_output=True)
    lines = log.read_text().splitlines()
    trace = [line.split(None, 1)[1] for line in lines if '"r.' in line or "fsync" in line]
    opened = next(i for i, c in enumerate(trace) if '"r.tmp", O_WRONLY|O_CREAT|O_TRUNC' in c)
    fd = trace[opened].rsplit("= ", 1)[1]
    synced = next((i for i, c in enumerate(trace) if c.startswith(f"fsync({fd})")), len(trace))
    renamed = next(i for i, c in enumerate(trace) if "rename" in c and '"r.tmp", "r.cdb"' in c)
    assert opened < synced < renamed


def run_both(
    tools: dict[str, str], argv: list[str], stdin: bytes | None = b"", shell_prefix: str = ""
) -> dict[str, int]:
    """Exit codes of real tcprules and ours for the same arguments."""
    codes = {}
    for tool in ("tcprules", "ours"):
        cmd = ["sh", "-c", f'{shell_prefix} exec "$@"', "sh", tools[tool], *argv]
        codes[tool] = subprocess.run(cmd, input=stdin, capture_output=True).returncode
    return codes


def test_system_errors(tools: dict[str, str], tmp_path: Path) -> None:
    cdb = tmp_path / "r.cdb"
    cdb.write_bytes(b"old")
    assert run_both(tools, []) == {"tcprules": 100, "ours": 100}
    assert run_both(tools, [str(cdb)]) == {"tcprules": 100, "ours": 100}
    nodir = str(tmp_path / "missing" / "r.tmp")
    assert run_both(tools, [str(cdb), nodir], b":allow\n") == {"tcprules": 111, "ours": 111}
    closed = run_both(tools, [str(cdb), str(tmp_path / "r.tmp")], None, "exec <&-;")
    assert closed == {"tcprules": 111, "ours": 111}
    assert cdb.read_bytes() == b"old"

    target = tmp_path / "dir.cdb"  # rename onto a non-empty directory fails
    (target / "x").mkdir(parents=True)
    for tool in ("tcprules", "ours"):
        r = compile_with(tools[tool], b":allow\n", target, tmp_path / f"{tool}.tmp")
        assert r.returncode == 111, r.stderr
    assert not (tmp_path / "ours.tmp").exists()

    r = compile_with(tools["ours"], b":allow\n", cdb, cdb)
    assert r.returncode == 100 and cdb.read_bytes() == b"old"


_piece = st.sampled_from(
    [
        b"1",
        b"2",
        b"04",
        b"255",
        b"300",
        b".",
        b"-",
        b"=",
        b"@",
        b":",
        b",",
        b'"',
        b"/",
        b"x",
        b"allow",
        b"deny",
        b"A",
        b" ",
        b"\t",
        b"#",
        b"\r",
        b"\0",
        b"\xff",
        b"joe",
        b"example",
    ]
)
_address = st.lists(_piece.filter(lambda p: p not in (b":", b"\r")), max_size=6).map(b"".join)
_variable = st.builds(
    lambda name, delim, value: b"," + name + b"=" + delim + value + delim,
    st.sampled_from([b"A", b"B", b"", b"A,B", b"X Y"]),
    st.sampled_from([b'"', b"/", b"x", b"=", b","]),
    st.lists(_piece, max_size=3).map(b"".join),
)
_rule = st.builds(
    lambda a, i, v: a + b":" + i + b"".join(v),
    _address,
    st.sampled_from([b"allow", b"deny"]),
    st.lists(_variable, max_size=3),
)
_rules_file = st.builds(
    lambda lines, end: b"\n".join(lines) + end,
    st.lists(st.one_of(_rule, st.lists(_piece, max_size=10).map(b"".join)), max_size=8),
    st.sampled_from([b"", b"\n"]),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=_rules_file)
def test_random_rules_match_real_tcprules(
    text: bytes, tools: dict[str, str], tmp_path: Path
) -> None:
    cdb = tmp_path / "real.cdb"
    if cdb.exists():
        cdb.unlink()
    real = compile_with(tools["tcprules"], text, cdb)
    try:
        ours = (0, io_cdb(parse_rules(text)))
    except Fatal as e:
        ours = (e.status, None)
    assert ours == (real.returncode, cdb.read_bytes() if real.returncode == 0 else None)


def make_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tcp"
    d.mkdir()
    for name in ("Makefile", "ostiary"):
        shutil.copy(ROOT / "tcprules" / name, d / name)
    return d


def make(d: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    env.pop("TCPRULES", None)
    env.pop("MAKEFLAGS", None)
    make_path = shutil.which("make")
    return subprocess.run([make_path, *args], cwd=d, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("compiler", ["tcprules", "ours"])
def test_makefile_rebuilds_only_on_change(
    compiler: str, tools: dict[str, str], tmp_path: Path
) -> None:
    require_tool("make")
    d = make_dir(tmp_path)
    cdb = d / "ostiary.cdb"
    reference = tmp_path / "reference.cdb"
    assert compile_with(tools["tcprules"], (d / "ostiary").read_bytes(), reference).returncode == 0

    r = make(d, f"TCPRULES={tools[compiler]}")
    assert r.returncode == 0, r.stderr
    assert f"{tools[compiler]} ostiary.cdb ostiary.tmp < ostiary" in r.stdout
    assert cdb.read_bytes() == reference.read_bytes()
    built = cdb.stat()

    r = make(d, f"TCPRULES={tools[compiler]}")
    assert r.returncode == 0 and "ostiary.tmp" not in r.stdout
    assert (cdb.stat().st_ino, cdb.stat().st_mtime_ns) == (built.st_ino, built.st_mtime_ns)

    with open(d / "ostiary", "ab") as f:
        f.write(b"10.9.8.7:deny\n")
    os.utime(cdb, ns=(built.st_atime_ns, built.st_mtime_ns - 10**10))  # source is newer
    r = make(d, f"TCPRULES={tools[compiler]}")
    assert r.returncode == 0, r.stderr
    assert cdb.stat().st_ino != built.st_ino
    assert rules.lookup(str(cdb), "10.9.8.7") == (False, {})

    with open(d / "ostiary", "ab") as f:
        f.write(b"10.9.8.6:allow,X=unquoted\n")
    os.utime(cdb, ns=(built.st_atime_ns, built.st_mtime_ns - 10**10))
    before = cdb.read_bytes()
    assert make(d, f"TCPRULES={tools[compiler]}").returncode != 0
    assert cdb.read_bytes() == before

    assert make(d, "clean").returncode == 0
    assert sorted(os.listdir(d)) == ["Makefile", "ostiary"]


def test_makefile_picks_compiler(tools: dict[str, str], tmp_path: Path) -> None:
    require_tool("make")
    d = make_dir(tmp_path)
    r = make(d)
    assert r.returncode == 0 and f"{tools['tcprules']} ostiary.cdb" in r.stdout

    bin_dir = tmp_path / "bin"  # a PATH where only ostiary-tcprules exists
    bin_dir.mkdir()
    make(d, "clean")
    r = make(d, path=str(bin_dir))
    assert r.returncode != 0 and not (d / "ostiary.cdb").exists()
    (bin_dir / "ostiary-tcprules").symlink_to(tools["ours"])
    r = make(d, path=str(bin_dir))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ostiary-tcprules ostiary.cdb ostiary.tmp < ostiary\n"
    assert (d / "ostiary.cdb").read_bytes() == io_cdb(parse_rules((d / "ostiary").read_bytes()))
