"""Password hashing: argon2id (argon2-cffi's defaults, RFC 9106 low-memory profile)."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()

# A hash of a random password, verified against when the user does not exist, so that a wrong
# username costs as much time as a wrong password (no user enumeration by timing).
_DUMMY = _hasher.hash("llmesh-no-such-user-placeholder")


def hash_password(password: str) -> str:
    """The argon2id hash (with its salt and parameters) to store."""
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when `password` matches; False for a mismatch, a malformed hash or no user."""
    try:
        return _hasher.verify(stored_hash or _DUMMY, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False
