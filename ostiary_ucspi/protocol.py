"""The Ostiary 4.0 wire protocol: a 32-byte salt out, a 32-byte HMAC-SHA256 back.

Pure functions only; the handler and the client do the I/O.
"""
import hashlib
import hmac
import os

SALT_LEN = 32
RESPONSE_LEN = 32


def new_salt() -> bytes:
    """Return a fresh salt from the kernel's CSPRNG."""
    return os.urandom(SALT_LEN)


def response(passphrase: bytes, salt: bytes) -> bytes:
    """Return HMAC-SHA256(key=passphrase, msg=salt), what a client sends back."""
    return hmac.new(passphrase, salt, hashlib.sha256).digest()


def match(answer: bytes, salt: bytes, passphrases: list[bytes]) -> int:
    """Return the index of the passphrase whose response is ``answer``, or -1.

    Every passphrase is hashed and compared in constant time, whatever matches,
    so the time taken says nothing about which one did.
    """
    found = -1
    ok = len(answer) == RESPONSE_LEN
    for i, secret in enumerate(passphrases):
        if hmac.compare_digest(response(secret, salt), answer) and ok and found < 0:
            found = i
    return found
