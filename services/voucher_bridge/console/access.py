"""Who may use the console, and as what: users from CONSOLE_USERS, HTTP Basic.

A password in CONSOLE_USERS may be given as is or as a hash made by `voucher-bridge console
hash-password` (PBKDF2-SHA256, the standard library's; the format is Django's, so existing
tooling can make one too): `pbkdf2_sha256$<iterations>$<salt>$<base64 hash>`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from voucher_bridge.settings import ConsoleUser

Role = Literal["viewer", "operator"]

_SCHEME = "pbkdf2_sha256"
_ITERATIONS = 600_000  # OWASP's figure for PBKDF2-HMAC-SHA256


@dataclass(frozen=True)
class Operator:
    """Who is asking: a console user, or the command line's user (`cli:<name>`)."""

    name: str
    role: Role

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


def hash_password(password: str, iterations: int = _ITERATIONS) -> str:
    salt = secrets.token_hex(12)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"{_SCHEME}${iterations}${salt}${base64.b64encode(digest).decode()}"


def password_matches(given: str, stored: str) -> bool:
    """`given` against a stored password or hash, in constant time either way."""
    if stored.startswith(_SCHEME + "$"):
        try:
            _, iterations, salt, encoded = stored.split("$", 3)
            expected = base64.b64decode(encoded, validate=True)
            digest = hashlib.pbkdf2_hmac("sha256", given.encode(), salt.encode(), int(iterations))
        except (ValueError, binascii.Error):
            return False
        return hmac.compare_digest(digest, expected)
    return hmac.compare_digest(given.encode(), stored.encode())


class Users:
    def __init__(self, users: Mapping[str, ConsoleUser]) -> None:
        self._users = dict(users)
        # Credentials already found good, as keyed digests (never the password): Basic auth
        # sends them with every request, and a hash costs ~0.3 s of CPU to check.
        self._key = secrets.token_bytes(32)
        self._good: set[bytes] = set()

    @property
    def any(self) -> bool:
        return bool(self._users)

    def check(self, authorization: str | None) -> Operator | None:
        """The user an `Authorization: Basic …` header names, when the password matches."""
        if not authorization or not authorization.lower().startswith("basic "):
            return None
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        name, sep, password = decoded.partition(":")
        user = self._users.get(name)
        if not sep or user is None:
            return None
        seen = hmac.digest(self._key, decoded.encode(), "sha256")
        if seen not in self._good:
            if not password_matches(password, user.password.get_secret_value()):
                return None
            self._good.add(seen)
        return Operator(name, user.role)
