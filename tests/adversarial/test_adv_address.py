"""Adversarial: a hostile TCPREMOTEIP reaches neither actions nor the log.

A tcprules variable or a server other than tcpserver could hand the handler
anything as the client's address. Actions and log lines get the canonical
form of the address that was charged, and nothing that is not an address gets
a salt, a charge or an action.
"""

from __future__ import annotations

import pytest
from kit.site import OPEN

from ostiary_ucspi.address import parse

HOSTILE = [
    "1.2.3.4\x1b[2J",
    "1.2.3.4\rostiary-handle: notice: 9.9.9.9 action 1",
    "$(reboot)",
    "1.2.3.4;reboot",
    "1.2.3.4 5.6.7.8",
    "`id`",
    "1.2.3.4\n",
    "fe80::1%$(reboot)",
    "fe80::1%eth0;id",
    "fe80::1%\x1b",
    "::1%",
    "１.2.3.4",
    "1.2.3.256",
    "1.2.3",
    "0x7f.0.0.1",
    "1.2.3.4/24",
    "",
    " 1.2.3.4",
    "::ffff:010.0.0.1",
]
CANONICAL = {
    "010.000.000.001": "10.0.0.1",
    "127.000.000.001": "127.0.0.1",
    "fe80::1%eth0": "fe80::1",
    "2001:DB8:0:0::1": "2001:db8::1",
    "::ffff:192.0.2.1": "192.0.2.1",
    "0:0:0:0:0:0:0:1": "::1",
}


@pytest.mark.parametrize("text", HOSTILE)
def test_what_is_not_an_address_is_refused(text):
    with pytest.raises(ValueError, match="not an IP address"):
        parse(text)


@pytest.mark.parametrize("text, shown", CANONICAL.items())
def test_an_address_goes_on_in_its_canonical_form(text, shown):
    assert parse(text)[0] == shown


@pytest.mark.parametrize(
    "text",
    ["1.2.3.4\x1b[2J", "1.2.3.4\rforged line", "$(reboot)", "1.2.3.4;reboot", "fe80::1%$(id)"],
)
def test_the_handler_refuses_a_hostile_address_with_one_clean_line(rig, text):
    got, code = rig.handle(OPEN, remote_ip=text)
    assert (got, code) == (b"", 111)
    lines = rig.lines()
    assert len(lines) == 1 and "not an IP address" in lines[0], lines
    assert "\x1b" not in rig.log_text() and "\r" not in rig.log_text()
    assert rig.runs("open") == [] and rig.store_view() is None  # no charge, no action


@pytest.mark.parametrize(
    "text, shown", [("010.000.000.001", "10.0.0.1"), ("127.000.000.001", "127.0.0.1")]
)
def test_actions_and_the_log_get_the_charged_address(rig, text, shown):
    got, code = rig.handle(OPEN, remote_ip=text)
    assert code == 0 and len(got) == 32
    assert rig.wait_runs("open") == [shown]
    assert rig.record("open")["argv"][1] == shown.encode()
    assert text not in rig.log_text() and f"{shown} action 1" in rig.log_text()
    got, code = rig.handle(b"wrong", remote_ip=text)
    assert rig.entry(shown.encode()).strikes == 1  # charged as what it was handed on as
