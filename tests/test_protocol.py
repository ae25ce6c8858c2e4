"""The wire protocol's pure functions: HMAC-SHA256 vectors, matching, salts."""

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.vectors import OSTIARY, RFC4231, Vector

from ostiary_ucspi import cpython, protocol


@pytest.mark.parametrize("vector", [OSTIARY, *RFC4231], ids=lambda v: v.name)
def test_published_vectors(vector: Vector) -> None:
    key, msg, digest = vector.key, vector.msg, vector.digest.hex()
    assert hmac.new(key, msg, hashlib.sha256).hexdigest() == digest  # the vector itself
    assert protocol.response(key, msg).hex() == digest


@pytest.mark.parametrize("length", [0, 1, 31, 32, 63, 64, 65, 127, 128, 129, 1000])
def test_key_lengths_around_the_block_size(length: int) -> None:
    key = bytes((7 * i + 3) % 256 for i in range(length))
    salt = bytes(range(32))
    assert protocol.response(key, salt) == hmac.new(key, salt, hashlib.sha256).digest()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.binary(min_size=32, max_size=32))
def test_same_as_the_hmac_module(key: bytes, salt: bytes) -> None:
    assert protocol.response(key, salt) == hmac.new(key, salt, hashlib.sha256).digest()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=40))
def test_compare_digest_agrees_with_hmac_compare_digest(a: bytes, b: bytes) -> None:
    assert protocol.compare_digest(a, b) == hmac.compare_digest(a, b) == (a == b)


def test_compare_digest_is_the_constant_time_routine() -> None:
    """CPython's own routine (hmac.compare_digest without OpenSSL), or hmac's when forced public."""
    expected = (
        hmac.compare_digest if cpython.PUBLIC else cpython.load("compare_digest", public=False)
    )
    assert protocol.compare_digest is expected
    with pytest.raises(TypeError):
        protocol.compare_digest("text", b"bytes")


def test_salts_are_fresh_and_full_length() -> None:
    salts = {protocol.new_salt() for _ in range(1000)}
    assert len(salts) == 1000
    assert {len(s) for s in salts} == {protocol.SALT_LEN}


SALT = bytes(range(32))
SECRETS = [b"kill-passphrase", b"first-action", b"second-action", b"first-action-2"]


@pytest.mark.parametrize("index", range(len(SECRETS)))
def test_match_finds_the_one_that_was_proved(index: int) -> None:
    assert protocol.match(protocol.response(SECRETS[index], SALT), SALT, SECRETS) == index


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"\0" * 32,
        protocol.response(b"first-action", SALT)[:31],
        protocol.response(b"first-action", SALT) + b"\0",
        protocol.response(b"first-action", bytes(32)),  # right secret, another salt
        protocol.response(b"first-actio", SALT),
    ],
)
def test_match_refuses_anything_else(answer: bytes) -> None:
    assert protocol.match(answer, SALT, SECRETS) == -1


@pytest.mark.parametrize("index", [-1, 0, 3])
def test_match_compares_against_every_secret_every_time(monkeypatch, index: int) -> None:
    calls: list[bytes] = []

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(protocol, "compare_digest", counting)
    answer = protocol.response(SECRETS[index], SALT) if index >= 0 else b"x" * 32
    assert protocol.match(answer, SALT, SECRETS) == index
    assert calls == [protocol.response(s, SALT) for s in SECRETS]


def test_the_first_of_two_equal_secrets_wins() -> None:
    """The config refuses a passphrase used twice; match() still never runs two."""
    secrets = [b"kill", b"same", b"same"]
    assert protocol.match(protocol.response(b"same", SALT), SALT, secrets) == 1
