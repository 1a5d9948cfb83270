"""Shared-secret authentication: which worker is calling, and may that id call at all.

Every RPC except Status carries the gRPC metadata `byzps-token` =
hex(HMAC-SHA256(secret, b"worker:" + worker_id)). A token binds the caller to one worker id, so a
Byzantine worker holding its own token cannot push as an honest one. The worker side imports
`token_for` (and `read_secret`) from here, so both sides derive tokens with the same code.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path

import grpc

from byzps.server.validation import Rejected

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


def parse_worker_id(worker_id: str, num_workers: int) -> int:
    """The row of `worker_id`, which must be a canonical decimal in [0, n): PERMISSION_DENIED
    otherwise (a well-authenticated caller may still not be part of this run)."""
    canonical = (
        len(worker_id) <= 10  # bounds int() below; no run has 10**10 workers
        and worker_id.isascii()
        and worker_id.isdigit()
        and str(int(worker_id)) == worker_id
    )
    if not canonical:
        raise Rejected(
            grpc.StatusCode.PERMISSION_DENIED,
            f"worker id {worker_id!r} is not a worker of this run",
        )
    row = int(worker_id)
    if row >= num_workers:
        raise Rejected(
            grpc.StatusCode.PERMISSION_DENIED,
            f"worker id {worker_id!r} is outside [0, {num_workers})",
        )
    return row


class Authenticator:
    """Checks the caller's token, then its id. `secret=None` disables tokens (--no-auth) but
    still refuses ids outside the run."""

    def __init__(self, secret: bytes | None, num_workers: int) -> None:
        self.secret = secret
        self.num_workers = num_workers

    def check(
        self, metadata: Iterable[tuple[str, str | bytes]], worker_id: str, fallback: bytes = b""
    ) -> int:
        """The worker's row; Rejected(UNAUTHENTICATED) for a missing or wrong token,
        Rejected(PERMISSION_DENIED) for an id outside [0, n). `fallback` is a token carried in
        the request itself (RegisterRequest.token), used when the metadata has none."""
        if self.secret is not None:
            presented = _metadata_token(metadata) or fallback
            if not presented:
                raise Rejected(
                    grpc.StatusCode.UNAUTHENTICATED, f"missing {TOKEN_METADATA_KEY} metadata"
                )
            expected = token_for(self.secret, worker_id).encode()
            if not hmac.compare_digest(presented, expected):
                raise Rejected(
                    grpc.StatusCode.UNAUTHENTICATED, f"bad token for worker {worker_id!r}"
                )
        return parse_worker_id(worker_id, self.num_workers)


def _metadata_token(metadata: Iterable[tuple[str, str | bytes]]) -> bytes:
    for key, value in metadata:
        if key == TOKEN_METADATA_KEY:
            return value.encode() if isinstance(value, str) else value
    return b""
