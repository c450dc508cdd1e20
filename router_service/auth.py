"""The optional API key: read from a file or an environment variable (never a command-line value, which any
user could read in `ps`), presented as `authorization: Bearer KEY` in gRPC metadata or HTTP headers."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

API_KEY_ENV = "SWITCH_SERVE_API_KEY"
API_KEY_FILE_DEFAULT = f"default: ${API_KEY_ENV}, if set"  # where a key file's flag finds the key without one


class Unauthenticated(Exception):
    """A call without the right API key."""


# What an HTTP 401 names as the way to authenticate (RFC 9110: a 401 carries one).
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def load_api_key(path: str | None) -> str | None:
    """The key calls must present: the file's content, else the environment variable; None: no key needed. An empty
    file or variable is an error."""
    if path is not None:
        try:
            key = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"api_key_file: {path}: {getattr(e, 'strerror', None) or e}") from None
        if not key:
            raise ValueError(f"api_key_file: {path} is empty")
        return sendable(key, f"api_key_file: {path}")
    if API_KEY_ENV not in os.environ:
        return None
    key = os.environ[API_KEY_ENV].strip()  # a Secret's value may end in a newline
    if not key:  # a Secret made from an empty value, say: failing beats serving every caller unasked
        raise ValueError(f"{API_KEY_ENV} is set but empty: give it the key, or unset it to need none")
    return sendable(key, API_KEY_ENV)


def sendable(key: str, source: str) -> str:
    """`key`, where a client can send it: gRPC metadata and HTTP headers carry printable ASCII alone (a key of
    other characters would refuse every call)."""
    if not all(" " <= c <= "~" for c in key):
        raise ValueError(f"{source}: the key holds characters other than printable ASCII, which neither gRPC "
                         "metadata nor HTTP headers carry")
    return key


def presented_keys(metadata) -> list[str]:
    """The keys from every `authorization: Bearer KEY` and `x-api-key: KEY` (gRPC metadata or HTTP headers): a
    gateway in front may send a bearer token of its own beside the caller's x-api-key."""
    keys = []
    for name, value in metadata:
        if name.lower() == "authorization":
            scheme, _, key = value.partition(" ")
            if scheme.lower() == "bearer":  # a scheme's case does not count (RFC 9110)
                keys.append(key.strip())
        elif name.lower() == "x-api-key":
            keys.append(value.strip())
    return keys


def is_authorized(metadata, api_key: str) -> bool:
    """Whether any key presented is `api_key`, each compared in constant time."""
    wanted = api_key.encode()
    return any(hmac.compare_digest(key.encode(), wanted) for key in presented_keys(metadata))
