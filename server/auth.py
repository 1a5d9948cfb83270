"""Authentication at the door: which worker is calling, and may that id call at all.

The token formula and the secret rules are in byzps.common.credentials, shared with the workers.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence

import grpc

from byzps.common.credentials import TOKEN_METADATA_KEY, token_for
from byzps.server.validation import Rejected


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
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        worker_id: str,
        fallback: bytes = b"",
        peer: Mapping[str, Sequence[bytes]] | None = None,
    ) -> int:
        """The worker's row; Rejected(UNAUTHENTICATED) for a missing or wrong token,
        Rejected(PERMISSION_DENIED) for an id outside [0, n). `fallback` is a token carried in
        the request itself (RegisterRequest.token), used when the metadata has none. `peer` is
        the call's gRPC auth context (`context.auth_context()`: the TLS peer's certificate
        properties), which binds the id to a client certificate under mutual TLS."""
        del peer  # not yet bound
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
