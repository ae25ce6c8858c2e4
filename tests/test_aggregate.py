"""IPv6 strikes aggregate up the prefix tree, so a flood of fresh prefixes is bounded.

policy.py: a prefix's record counts the records just below it; FANOUT of them
lock it, closing every address under it. The store of an attacker holding a
/32 is bounded by FANOUT**4 + FANOUT**3 + FANOUT**2 + FANOUT + 1 records,
whatever it does; compaction recounts from the records themselves; a lock is
never dropped to make room, and a full store takes no new key.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from kit.site import NOW, Rig, StoreRig

from ostiary_ucspi import policy
from ostiary_ucspi import store as storemod
from ostiary_ucspi.address import key as address_key
from ostiary_ucspi.policy import FANOUT, Entry, charge, fail, pruner, succeed, unlock
from ostiary_ucspi.store import StoreCorrupt


@pytest.fixture
def site(tmp_path: Path) -> StoreRig:
    return StoreRig(tmp_path)


def v6(a: int, b: int, c: int, d: int) -> str:
    """An address in 2001:db8::/32 whose next four bytes are a, b, c, d (/40 ... /64)."""
    return "2001:db8:%02x%02x:%02x%02x::1" % (a, b, c, d)


def records(site: StoreRig) -> dict[bytes, Entry]:
    view = site.store.view()
    items = {} if view is None else view.items()
    return {k: Entry(v) for k, v in items.items() if not k.startswith(b"!")}


def test_fanout_struck_prefixes_lock_the_prefix_above_them(site: StoreRig) -> None:
    for i in range(FANOUT - 1):
        site.fails(v6(0, 0, 0, i), 1)
    assert site.refused(v6(0, 0, 0, 99)) is None  # the /56 holds FANOUT-1 struck /64s
    site.fails(v6(0, 0, 0, FANOUT - 1), 1)
    assert site.refused(v6(0, 0, 0, 99)) == "locked out with all of 2001:db8::/56"
    assert site.refused(v6(0, 0, 1, 0)) is None  # the next /56 is served
    assert site.refused("192.0.2.1") is None
    top = records(site)[b"2001:db8::/56"]
    assert (top.strikes, top.locked_since) == (FANOUT, NOW)
    before = site.store.view().size()
    charged = charge(site.store, address_key(v6(0, 0, 0, 200)), site.cfg, NOW)
    assert charged.refused == "locked out with all of 2001:db8::/56"
    assert site.store.view().size() == before  # a refusal under a locked prefix writes nothing


def test_the_charge_that_locks_a_prefix_says_so(site: StoreRig) -> None:
    for i in range(FANOUT - 1):
        assert charge(site.store, address_key(v6(0, 0, 0, i)), site.cfg, NOW).locked == []
    last = charge(site.store, address_key(v6(0, 0, 0, FANOUT - 1)), site.cfg, NOW)
    assert last.refused is None and last.locked == [b"2001:db8::/56"]


def test_struck_prefixes_count_once_each_however_often_struck(site: StoreRig) -> None:
    for i in range(FANOUT - 1):
        site.fails(v6(0, 0, 0, i), 2)  # two strikes each, below MAX_BAD_CONNS
    assert records(site)[b"2001:db8::/56"].strikes == FANOUT - 1
    assert site.refused(v6(0, 0, 0, 99)) is None


def test_successes_take_their_prefix_out_of_the_count(site: StoreRig) -> None:
    """A site's many users knocking rightly never lock their /56."""
    for i in range(3 * FANOUT):
        key = address_key(v6(0, 0, 0, i))
        assert charge(site.store, key, site.cfg, NOW).refused is None
        succeed(site.store, key)
    assert site.refused(v6(0, 0, 0, 99)) is None
    assert records(site) == {}  # the prefixes above went with the last record below them


def test_unlocking_a_prefix_forgets_what_is_under_it_and_counts_it_out_above(
    site: StoreRig,
) -> None:
    for i in range(FANOUT):
        site.fails(v6(0, 0, 0, i), 1)
    site.fails(v6(0, 0, 1, 0), 1)  # another /56 of the same /48
    assert unlock(site.store, b"2001:db8::/56") is not None
    assert site.refused(v6(0, 0, 0, 99)) is None
    got = records(site)
    assert set(got) == {
        b"2001:db8::/32",
        b"2001:db8::/40",
        b"2001:db8::/48",
        b"2001:db8:0:100::/56",
        b"2001:db8:0:100::/64",
    }
    assert got[b"2001:db8::/48"].strikes == 1
    site.store.compact(pruner(site.cfg, NOW))  # and compaction agrees
    assert records(site)[b"2001:db8::/48"].strikes == 1


def test_ipv4_addresses_are_each_their_own_record(site: StoreRig) -> None:
    for i in range(3 * FANOUT):
        site.fails(f"192.0.2.{i}", 1)
    assert len(records(site)) == 3 * FANOUT
    assert site.refused("192.0.2.250") is None


def test_compaction_recounts_a_prefix_from_the_records_below_it(tmp_path: Path) -> None:
    site = StoreRig(tmp_path, "STRIKE_EXPIRE=100\n")
    for i in range(5):
        site.fails(v6(0, 0, 0, i), 1, now=NOW)
    for i in range(5, 8):
        site.fails(v6(0, 0, 0, i), 1, now=NOW + 90)
    assert records(site)[b"2001:db8::/56"].strikes == 8
    site.store.compact(pruner(site.cfg, NOW + 150))  # the first five expired
    got = records(site)
    assert got[b"2001:db8::/56"].strikes == 3 and got[b"2001:db8::/56"].last_seen == NOW + 90
    assert got[b"2001:db8::/32"].strikes == 1
    site.store.compact(pruner(site.cfg, NOW + 250))  # all expired: the prefixes go too
    assert records(site) == {}


def test_a_prefix_lives_while_a_lock_below_it_does(tmp_path: Path) -> None:
    """Without this an attacker could wait out its prefix's count and strike again."""
    site = StoreRig(tmp_path, "STRIKE_EXPIRE=100\n")
    for i in range(FANOUT - 1):
        site.fails(v6(0, 0, 0, i), site.cfg.max_bad_conns, now=NOW)  # each /64 locked
    site.store.compact(pruner(site.cfg, NOW + 10**6))
    assert records(site)[b"2001:db8::/56"].strikes == FANOUT - 1  # locks never expire
    site.fails(v6(0, 0, 0, 200), 1, now=NOW + 10**6)
    assert site.refused(v6(0, 0, 0, 201)) == "locked out with all of 2001:db8::/56"


def test_a_locked_prefix_is_kept_until_its_lock_runs_out(tmp_path: Path) -> None:
    site = StoreRig(tmp_path, "STRIKE_EXPIRE=100\nLOCKOUT_EXPIRE=1000\n")
    for i in range(FANOUT):
        site.fails(v6(0, 0, 0, i), 1, now=NOW)
    site.store.compact(pruner(site.cfg, NOW + 500))  # the /64s' strikes expired
    got = records(site)
    assert got[b"2001:db8::/56"].locked_since == NOW and b"2001:db8::/64" not in got
    assert site.refused(v6(0, 0, 0, 99)) is not None
    site.store.compact(pruner(site.cfg, NOW + 1000))
    assert records(site) == {}


def tree_order(fanout: int) -> list[tuple[int, ...]]:
    """Every /64 of the first ``fanout`` children at each level of 2001:db8::/32.

    Depth first, the order that makes the most records before each prefix locks.
    """
    return list(itertools.product(range(fanout + 1), repeat=4))


def test_a_flood_of_fresh_prefixes_over_a_32_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound of policy.py's docstring, with a small FANOUT to reach it in a test."""
    fanout = 3
    monkeypatch.setattr(policy, "FANOUT", fanout)
    site = StoreRig(tmp_path)
    order = tree_order(fanout)
    for seed in (None, 1):
        if seed is not None:
            random.Random(seed).shuffle(order)
            site.store.compact(lambda records: iter(()))  # start again, empty
        for a, b, c, d in order:
            site.fails(v6(a, b, c, d), 1)
            assert len(records(site)) <= sum(fanout**i for i in range(5))
        assert site.refused("2001:db8:ffff:ffff::1") == "locked out with all of 2001:db8::/32"
    assert site.refused("2001:db9::1") is None


def test_a_full_store_takes_no_new_key_and_keeps_every_lock(
    site: StoreRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = site.fails("192.0.2.1", site.cfg.max_bad_conns)
    struck = site.fails("192.0.2.2", 1)
    monkeypatch.setattr(storemod, "MAX_FILE", 2 * site.store.view().size() - 2)  # past half
    charged = charge(site.store, address_key("192.0.2.3"), site.cfg, NOW)
    assert charged.refused == policy.FULL
    assert b"192.0.2.3" not in records(site)
    assert charge(site.store, struck, site.cfg, NOW).refused is None  # known: charged
    fail(site.store, struck, site.cfg, NOW)
    assert site.refused("192.0.2.1") == "locked out" and key in records(site)


def test_the_handler_logs_the_prefix_it_locked(rig: Rig) -> None:
    rig.write_config()
    for i in range(FANOUT):
        got, status = rig.handle(b"wrong", remote_ip=v6(7, 0, 0, i))
        assert len(got) == 32 and status == 0
    rig.wait_log("2001:db8:700::/56 locked out: 16 prefixes below it struck")
    got, status = rig.handle(b"wrong", remote_ip=v6(7, 0, 0, 99))
    assert got == b"" and status == 0
    rig.wait_log("closed at once: locked out with all of 2001:db8:700::/56")


def test_a_prefix_whose_lock_ran_out_takes_no_more_records_than_fanout(tmp_path: Path) -> None:
    """LOCKOUT_EXPIRE must not let an attacker add FANOUT records below a /56 per lock."""
    site = StoreRig(tmp_path, "STRIKE_EXPIRE=100000\nLOCKOUT_EXPIRE=100\n")
    n = 0
    for cycle in range(3):
        now = NOW + 200 * cycle  # the /56's lock of the cycle before ran out
        for _ in range(FANOUT):
            key = address_key(v6(0, 0, 0, n))
            n += 1
            if charge(site.store, key, site.cfg, now).refused is None:
                fail(site.store, key, site.cfg, now)
        below = [k for k in records(site) if k.endswith(b"/64")]
        assert len(below) <= FANOUT


def test_a_record_a_compaction_overlaps_is_counted_in_every_prefix_above_it(
    tmp_path: Path,
) -> None:
    """A charge made while a compaction prunes its prefixes away is counted again after it.

    The compaction cannot see it (it came after the fold), so right after the
    swap the prefixes above may miss it: the next charge below them, or the
    next compaction, counts it in. An undercount for so long: fewer locks,
    never a wrong one.
    """
    site = StoreRig(tmp_path, "STRIKE_EXPIRE=100\n")
    site.fails(v6(0, 0, 0, 1), 1, now=NOW)  # expired by NOW + 150
    prune = pruner(site.cfg, NOW + 150)

    def late(records: storemod.Records):  # runs without the writers' lock, after the fold
        site.fails(v6(0, 0, 0, 2), 1, now=NOW + 150)
        return prune(records)

    site.store.compact(late)
    above = policy.above(address_key(v6(0, 0, 0, 2)))
    assert address_key(v6(0, 0, 0, 2)) in records(site)
    site.fails(v6(0, 0, 0, 3), 1, now=NOW + 150)  # the next charge below counts its way up
    got = records(site)
    assert [got[p].strikes if p in got else 0 for p in above[1:]] == [1] * 3
    site.store.compact(pruner(site.cfg, NOW + 150))  # and the next compaction counts right
    got = records(site)
    assert [got[p].strikes for p in above] == [2, 1, 1, 1]


def test_a_prefix_length_too_long_for_int_is_corrupt(site: StoreRig) -> None:
    bad = [(b"2001:db8::/" + b"5" * 5000, b"1 1 0 %d" % NOW)]
    with pytest.raises(StoreCorrupt):
        list(pruner(site.cfg, NOW)(lambda: iter(bad)))
    assert not policy.aggregate(bad[0][0], site.cfg)  # ostiary-lockout list asks it of each key


def test_ipcache_size_counts_the_records_prefixes_included(tmp_path: Path) -> None:
    """EXIT_ON_IPCACHE_FULL watches the store's records: an IPv6 address brings its prefixes."""
    site = StoreRig(tmp_path, "EXIT_ON_IPCACHE_FULL\nIPCACHE_SIZE=6\n")
    assert charge(site.store, address_key("2001:db8::1"), site.cfg, NOW).stopped is None
    assert charge(site.store, address_key("192.0.2.1"), site.cfg, NOW).stopped is None
    assert len(records(site)) == 6  # a /64, its /56, /48, /40 and /32, and one IPv4 address
    stopped = charge(site.store, address_key("192.0.2.2"), site.cfg, NOW).stopped
    assert stopped == "address table full (6 records, EXIT_ON_IPCACHE_FULL)"
