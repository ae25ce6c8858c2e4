"""The Ostiary 4.0 wire protocol: a 32-byte salt out, a 32-byte HMAC-SHA256 back.

Pure functions only; the handler and the client do the I/O.

The handler starts once per connection, and importing ``hmac`` loads
OpenSSL's libcrypto through ``_hashlib``: about 3.5 MB and 2-3 ms, more than
the rest of the handler together. So this module builds HMAC (RFC 2104) on
CPython's own SHA-256 (see :mod:`.cpython`), as ``hmac.HMAC`` itself does when
handed a hash constructor, and compares with the constant-time routine that is
``hmac.compare_digest``. tests/test_protocol.py holds both to the RFC 4231
vectors, to ``hmac.new`` and to ``hmac.compare_digest``.
"""

import os

from .cpython import compare_digest, sha256

SALT_LEN = 32
RESPONSE_LEN = 32
BLOCK = 64  # SHA-256's block size: the HMAC key is padded (or first hashed) to it
# translate() tables: every byte XOR 0x36 (0x5C), built as one XOR of the 256 bytes
# read as a number (a generator over them costs the handler's start-up more).
_ALL = int.from_bytes(bytes(range(256)), "big")
IPAD = (_ALL ^ int("36" * 256, 16)).to_bytes(256, "big")
OPAD = (_ALL ^ int("5c" * 256, 16)).to_bytes(256, "big")


def new_salt() -> bytes:
    """Return a fresh salt from the kernel's CSPRNG."""
    return os.urandom(SALT_LEN)


def response(passphrase: bytes, salt: bytes) -> bytes:
    """Return HMAC-SHA256(key=passphrase, msg=salt), what a client sends back."""
    key = sha256(passphrase).digest() if len(passphrase) > BLOCK else passphrase
    key = key.ljust(BLOCK, b"\0")
    inner = sha256(key.translate(IPAD) + salt).digest()
    return sha256(key.translate(OPAD) + inner).digest()


def match(answer: bytes, salt: bytes, passphrases: list[bytes]) -> int:
    """Return the index of the passphrase whose response is ``answer``, or -1.

    Every passphrase is hashed and compared in constant time, whatever matches,
    so the time taken says nothing about which one did.
    """
    found = -1
    ok = len(answer) == RESPONSE_LEN
    for i, secret in enumerate(passphrases):
        if compare_digest(response(secret, salt), answer) and ok and found < 0:
            found = i
    return found
