"""The sample firewall actions and base rulesets, against the real nft, iptables and ipset.

Every firewall command runs as root inside a network namespace the test creates
and deletes (``ip netns``), never in the host's own ruleset. The samples run as
ostiary starts an action: argv [path, address], the environment PATH only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IN_CI, ROOT, project_tool, require_tool
from kit.procs import wait_for
from kit.servers import Handler
from kit.site import OPEN, Rig
from kit.wire import SALT_LEN, tcp_pair

from ostiary_ucspi.actions import SAFE_PATH
from ostiary_ucspi.address import parse

ACTIONS = ROOT / "examples/actions"
NFT_BASE = ROOT / "examples/nftables/ostiary.nft"
IPT_BASE = ROOT / "examples/iptables/ostiary-iptables"
SAMPLES = ["open-ssh-nft", "close-ssh-nft", "open-ssh-iptables", "close-ssh-iptables"]
OPENERS = {"nft": "open-ssh-nft", "ipset": "open-ssh-iptables"}
CLOSERS = {"nft": "close-ssh-nft", "ipset": "close-ssh-iptables"}
CHECK_START, CHECK_END = "# --- address check:", "# --- end of the address check ---\n"
TIMEOUT_LINE = re.compile(r"^TIMEOUT=(\d+)$", re.M)
ADDRESSES = [("192.0.2.7", "4"), ("2001:db8::7", "6"), ("::0.2.0.3", "6")]
REFUSED = [
    "",
    "300.1.1.1",
    "01.2.3.4",
    "::",
    "0.0.0.0",
    "192.0.2.7; reboot",
    "192.0.2.7 }; flush ruleset; {",
    "192.0.2.7\n10.0.0.1",
    " 192.0.2.7",
    "192.0.2.7 ",
    "-j",
    "*",
    "example.com",
    "1.2.3",
    "1.2.3.4.5",
    "1..2.3",
    ".1.2.3",
    "1.2.3.",
    "1234.1.1.1111",
    "192.0.2.0/24",
    "2001:db8::/64",
    "2001:db8::7%eth0",
    "2001:DB8::7",
    "2001:db8:0:0:1:0:0:1",
    "2001:0db8::7",
    "::2:3",
    "::ffff:1.2.3.4",
    "::ffff:102:304",
    "1:2:3:4:5:6:7:8:",
    "1::2::3",
    ":::",
    "2001:db8::g",
    "0:0:0:0:0:0:0:0:0:0:0:0:0:0",
    "a",
]


class Netns:
    """A network namespace of the test's own; ``run`` executes a command inside it."""

    def __init__(self, ip: str, name: str) -> None:
        self.ip, self.name = ip, name

    def run(
        self, *argv: str | Path, path: str = SAFE_PATH, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.ip, "netns", "exec", self.name, *map(str, argv)],
            env={"PATH": path},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def ok(self, *argv: str | Path, path: str = SAFE_PATH) -> str:
        r = self.run(*argv, path=path)
        assert r.returncode == 0, (argv, r.stdout, r.stderr)
        return r.stdout

    def elements(self, kind: str, family: str) -> dict[str, int | None]:
        """Address -> seconds left, of the ssh set of ``family`` (nft or ipset)."""
        if kind == "nft":
            out = json.loads(self.ok("nft", "-j", "list", "set", "inet", "ostiary", f"ssh{family}"))
            elems = [o["set"].get("elem", []) for o in out["nftables"] if "set" in o][0]
            return {e["elem"]["val"]: e["elem"].get("expires") for e in elems}
        got: dict[str, int | None] = {}
        for line in self.ok("ipset", "-o", "save", "list", f"ostiary-ssh{family}").splitlines():
            m = re.fullmatch(r"add \S+ (\S+) timeout (\d+)", line)
            if m:
                got[m[1]] = int(m[2])
        return got

    def ruleset(self) -> str:
        """Everything the firewall holds, as text, timeouts left out."""
        text = self.ok("nft", "list", "ruleset") + self.ok("ipset", "save")
        return re.sub(r" (timeout|expires) \w+", "", text)


@pytest.fixture
def netns() -> Iterator[Netns]:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the firewall tests need root; CI must run them as root")
        pytest.skip("the firewall tests need root")
    for tool in ("nft", "ipset", "iptables", "ip6tables", "iptables-restore", "ip"):
        require_tool(tool)
    ip = require_tool("ip")
    name = f"ostiary-test-{os.getpid()}-{secrets.token_hex(4)}"
    subprocess.run([ip, "netns", "add", name], check=True, timeout=30)
    try:
        yield Netns(ip, name)
    finally:
        subprocess.run([ip, "netns", "delete", name], check=True, timeout=30)


def load_base(netns: Netns, kind: str) -> None:
    if kind == "nft":
        netns.ok("nft", "-f", NFT_BASE)
    else:
        netns.ok(IPT_BASE)


def with_timeout(tmp_path: Path, script: str, seconds: int) -> Path:
    """A copy of open script ``script`` whose documented TIMEOUT is ``seconds``."""
    text = (ACTIONS / script).read_text()
    assert len(TIMEOUT_LINE.findall(text)) == 1
    path = tmp_path / script
    path.write_text(TIMEOUT_LINE.sub(f"TIMEOUT={seconds}", text))
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("kind", ["nft", "ipset"])
@pytest.mark.parametrize("address,family", ADDRESSES)
def test_open_lets_the_address_in_and_close_takes_it_out(netns, kind, address, family):
    load_base(netns, kind)
    opener, closer = OPENERS[kind], CLOSERS[kind]
    for _ in range(2):
        r = netns.run(ACTIONS / opener, address)
        assert (r.returncode, r.stdout) == (0, f"{opener}: ssh open for {address}\n")
    left = netns.elements(kind, family)
    assert list(left) == [address] and 3590 <= left[address] <= 3600
    for _ in range(2):
        r = netns.run(ACTIONS / closer, address)
        assert (r.returncode, r.stdout) == (0, f"{closer}: ssh closed for {address}\n")
    assert netns.elements(kind, family) == {}


@pytest.mark.parametrize("kind", ["nft", "ipset"])
def test_a_knock_opens_the_door_and_its_undo_closes_it(netns, rig: Rig, kind):
    """ostiary-handle runs in the namespace: its ACTION and UNDO are the samples."""
    load_base(netns, kind)
    rig.write_config(
        f'ACTION="{OPEN.decode()}","{ACTIONS / OPENERS[kind]}",0,0',
        f'UNDO=3,"{ACTIONS / CLOSERS[kind]}"',
        open_action=False,
    )
    client, server = tcp_pair()
    with open(rig.log, "ab") as log:
        proc = subprocess.Popen(
            [netns.ip, "netns", "exec", netns.name, *rig.argv()],
            stdin=server,
            stdout=server,
            stderr=log,
            env=rig.env({"TCPREMOTEIP": "2001:db8::7"}),
        )
    server.close()
    rig.procs.append(proc)
    assert len(Handler(proc, client).talk(OPEN)) == SALT_LEN
    left = wait_for(lambda: netns.elements(kind, "6"), 10, "the action to open the door")
    assert list(left) == ["2001:db8::7"] and left["2001:db8::7"] > 3000
    wait_for(lambda: netns.elements(kind, "6") == {}, 20, "the undo to close the door")
    rig.wait_log(f"{CLOSERS[kind]}: ssh closed for 2001:db8::7")


@pytest.mark.parametrize("kind", ["nft", "ipset"])
def test_the_kernel_closes_the_door_when_the_close_never_runs(netns, tmp_path, kind):
    load_base(netns, kind)
    netns.ok(with_timeout(tmp_path, OPENERS[kind], 2), "192.0.2.7")
    opened = time.monotonic()
    assert "192.0.2.7" in netns.elements(kind, "4")
    wait_for(lambda: netns.elements(kind, "4") == {}, 15, "the kernel to drop the address")
    assert time.monotonic() - opened > 1


@pytest.mark.parametrize("kind", ["nft", "ipset"])
def test_opening_again_starts_the_timeout_again(netns, tmp_path, kind):
    load_base(netns, kind)
    opener = with_timeout(tmp_path, OPENERS[kind], 60)
    netns.ok(opener, "2001:db8::7")
    time.sleep(2.5)
    assert netns.elements(kind, "6")["2001:db8::7"] <= 57
    netns.ok(opener, "2001:db8::7")
    assert netns.elements(kind, "6")["2001:db8::7"] >= 58


def test_the_nft_ruleset_loads_twice_without_duplicates_and_keeps_the_sets(netns):
    netns.ok("nft", "-f", NFT_BASE)
    first = netns.ruleset()
    netns.ok(ACTIONS / "open-ssh-nft", "192.0.2.7")
    netns.ok("nft", "add", "element", "inet", "ostiary", "locked6", "{ 2001:db8:1::/64 }")
    filled = netns.ruleset()
    netns.ok("nft", "-f", NFT_BASE)
    assert netns.ruleset() == filled != first
    rules = json.loads(netns.ok("nft", "-j", "list", "chain", "inet", "ostiary", "input"))
    assert len([o for o in rules["nftables"] if "rule" in o]) == 6


def test_the_iptables_rules_load_twice_without_duplicates_and_keep_the_sets(netns):
    def rules() -> str:
        return netns.ok("iptables", "-w", "-S") + netns.ok("ip6tables", "-w", "-S")

    netns.ok(IPT_BASE)
    first = rules()
    assert first.count("-j ostiary") == 2 and first.count("-A ostiary -j DROP") == 2
    netns.ok(ACTIONS / "open-ssh-iptables", "192.0.2.7")
    netns.ok(IPT_BASE)
    assert rules() == first
    assert list(netns.elements("ipset", "4")) == ["192.0.2.7"]


@pytest.mark.parametrize("script", SAMPLES)
def test_samples_refuse_anything_but_a_canonical_address(netns, script):
    load_base(netns, "nft" if script.endswith("nft") else "ipset")
    netns.ok(ACTIONS / script.replace("close", "open"), "192.0.2.99")
    before = netns.ruleset()
    for address in REFUSED:
        r = netns.run(ACTIONS / script, address)
        assert r.returncode == 100, (address, r.stdout, r.stderr)
        assert r.stdout == f"{script}: fatal: not an IPv4 or IPv6 address: {address}\n"
    for args in ((), ("192.0.2.7", "192.0.2.8")):
        r = netns.run(ACTIONS / script, *args)
        assert (r.returncode, r.stdout) == (100, f"{script}: usage: {script} ADDRESS\n")
    assert netns.ruleset() == before


def address_check() -> str:
    """The address check of the samples (the same in each)."""
    blocks = set()
    for script in SAMPLES:
        text = (ACTIONS / script).read_text()
        start = text.index(CHECK_START)
        blocks.add(text[start : text.index(CHECK_END, start) + len(CHECK_END)])
    assert len(blocks) == 1, "the samples' address checks differ"
    return blocks.pop()


def spellings(rng: random.Random) -> Iterator[str]:
    """Addresses as a client might show up, zeros and IPv4 tails favoured."""
    for _ in range(150):
        yield ".".join(
            str(rng.choice([0, 1, 9, 10, 99, 100, 199, 200, 249, 250, 255, rng.randrange(256)]))
            for _ in range(4)
        )
    for _ in range(250):
        words = [rng.choice([0, 0, 0, 1, 0xFFFF, rng.randrange(0x10000)]) for _ in range(8)]
        packed = ipaddress.IPv6Address(b"".join(w.to_bytes(2, "big") for w in words))
        yield rng.choice(
            [
                packed.exploded,
                packed.compressed,
                str(packed).upper(),
                ":".join(f"{w:x}" for w in words),
            ]
        )


def test_the_address_check_takes_exactly_what_the_handler_hands_on(tmp_path):
    script = tmp_path / "check"
    script.write_text("#!/bin/sh\nset -u\n" + address_check() + 'echo "$family"\n')
    script.chmod(0o755)
    rng = random.Random(12)
    for text in [*spellings(rng), "::1", "::ffff:0.0.0.0", "::0.0.0.1", "1::", "::1:0:0:0"]:
        try:
            canonical: str | None = parse(text)[0]
        except ValueError:
            canonical = None
        for given in {text, canonical} - {None}:
            r = subprocess.run(
                [script, given], env={"PATH": SAFE_PATH}, capture_output=True, text=True, timeout=10
            )
            fine = given == canonical and canonical not in ("0.0.0.0", "::")
            assert r.returncode == (0 if fine else 100), (text, given, canonical, r.stdout)


def test_open_scripts_document_a_timeout_equal_to_their_undo():
    for script in OPENERS.values():
        text = (ACTIONS / script).read_text()
        (timeout,) = TIMEOUT_LINE.findall(text)
        assert f"#   UNDO={timeout}," in text
    assert "TIMEOUT" in (ROOT / "examples/ostiary.cfg").read_text()


def test_the_lockout_refill_replaces_the_sets_and_keeps_them_when_export_fails(netns, tmp_path):
    lockout = project_tool("ostiary-lockout")
    path = f"{Path(lockout).parent}:{SAFE_PATH}"
    (tmp_path / "state").mkdir()
    cfg = tmp_path / "ostiary.cfg"
    cfg.write_text(f'KILL="k"\nACTION="p","/bin/true"\nLOCKOUT_DB={tmp_path}/state/lockout.cdb\n')
    cfg.chmod(0o600)
    refill = ACTIONS / "refill-lockout-nft"

    def locked() -> str:
        return netns.ok("nft", "list", "set", "inet", "ostiary", "locked4") + netns.ok(
            "nft", "list", "set", "inet", "ostiary", "locked6"
        )

    netns.ok("nft", "-f", NFT_BASE)
    for address in ("192.0.2.7", "198.51.100.1", "2001:db8:1::/64"):
        subprocess.run([lockout, "-c", cfg, "lock", address], check=True, capture_output=True)
    netns.ok(refill, cfg, path=path)
    assert "192.0.2.7" in locked() and "198.51.100.1" in locked() and "2001:db8:1::/64" in locked()
    subprocess.run([lockout, "-c", cfg, "unlock", "198.51.100.1"], check=True, capture_output=True)
    netns.ok(refill, cfg, path=path)
    kept = locked()
    assert "192.0.2.7" in kept and "198.51.100.1" not in kept and "2001:db8:1::/64" in kept
    (tmp_path / "state/lockout.cdb").write_bytes(b"garbage")
    for argv in ((refill, cfg), (refill, tmp_path / "missing.cfg")):
        r = netns.run(*argv, path=path)
        assert r.returncode == 111, (r.stdout, r.stderr)
        assert r.stderr.endswith(
            "refill-lockout-nft: fatal: unable to run ostiary-lockout export;"
            " the sets are left as they were\n"
        ), r.stderr
        assert locked() == kept
