"""Shared-secret credentials, used by both sides of the wire: the token a worker presents and where
the shared secret comes from.

Every RPC except Status carries the gRPC metadata `byzps-token` =
hex(HMAC-SHA256(secret, b"worker:" + worker_id)). A token binds the caller to one worker id, so a
Byzantine worker holding its own token cannot push as an honest one. Workers and the server take
the formula from this one module (below both in the layering), so it cannot drift apart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

#: gRPC metadata key of the worker token (lower case, as gRPC requires).
TOKEN_METADATA_KEY = "byzps-token"
#: Environment variable holding the shared secret when no secret file is given.
SECRET_ENV = "BYZPS_SECRET"


def token_for(secret: bytes | str, worker_id: str) -> str:
    """The token of `worker_id`: hex(HMAC-SHA256(secret, b"worker:" + worker_id))."""
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, b"worker:" + worker_id.encode(), hashlib.sha256).hexdigest()


def read_secret(path: str | Path) -> bytes:
    """The secret stored in a file, without surrounding whitespace (a trailing newline from an
    editor or `echo` must not change the tokens). Raises ValueError for an empty file."""
    secret = Path(path).read_bytes().strip()
    if not secret:
        raise ValueError(f"{path}: the secret file is empty")
    return secret


def secret_from_env() -> bytes | None:
    """The secret in $BYZPS_SECRET (stripped), or None when unset or empty."""
    value = os.environ.get(SECRET_ENV, "").strip()
    return value.encode() if value else None


def load_secret(secret_file: Path | None) -> bytes | None:
    """The shared secret from `secret_file`, else from $BYZPS_SECRET, else None (no auth)."""
    if secret_file is not None:
        return read_secret(secret_file)
    return secret_from_env()
