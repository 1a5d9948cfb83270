"""Authentication at the door: which worker is calling, and may that id call at all.

Two credentials can bind a call to a worker id, and each one that is present must agree:

* the token (`byzps-token` metadata, HMAC of the id under the master secret), always unless the
  server runs with --no-auth;
* under mutual TLS, the client certificate: one naming worker K (CN `byzps-worker-K`, URI SAN
  `spiffe://byzps/worker/K`, as `byzps credentials cert --worker` makes them) may call as K
  only; one naming no worker (an operator's) may call no worker RPC, only Status (which does not
  come here). So a stolen or leaked token of worker 4 is useless without worker 4's key.

What this relies on in the auth context (`context.auth_context()`, grpcio 1.85.1, checked with
a real mutual-TLS call, sync and aio servers alike): `x509_pem_cert` is present exactly when the
peer presented a certificate; `x509_common_name` holds its subject CN and
`x509_subject_alternative_name` all its SANs (URIs among them, as text). The server's port
requires *and verifies* client certificates whenever it has a client CA
(byzps.common.credentials.server_tls, require_client_auth=True), and gRPC's Python API offers no
mode that requests a certificate without verifying it, so a certificate seen here was signed by
that CA. Plaintext and server-only TLS carry no `x509_*` keys: nothing to bind.

The token formula and the secret rules are in byzps.common.credentials, shared with the workers.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence

from byzps.common.credentials import (
    OPERATOR,
    OPERATOR_NAME,
    TOKEN_METADATA_KEY,
    token_for,
    worker_of_name,
)
from byzps.server.validation import Refusal, Rejected

#: The most characters of a caller's worker id that a refusal message repeats.
SHOWN_ID_CHARS = 40


def shown(worker_id: str) -> str:
    """`worker_id` as a refusal message quotes it: cut to SHOWN_ID_CHARS, since the id is
    whatever the caller sent, and a status message must fit in gRPC's header limit (8 KiB by
    default): a 16 KB id echoed whole would turn the refusal into the client's
    RESOURCE_EXHAUSTED instead of its real code."""
    if len(worker_id) <= SHOWN_ID_CHARS:
        return repr(worker_id)
    return f"{worker_id[:SHOWN_ID_CHARS]!r}… ({len(worker_id)} characters)"


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
            Refusal.PERMISSION_DENIED,
            f"worker id {shown(worker_id)} is not a worker of this run",
        )
    row = int(worker_id)
    if row >= num_workers:
        raise Rejected(
            Refusal.PERMISSION_DENIED,
            f"worker id {shown(worker_id)} is outside [0, {num_workers})",
        )
    return row


#: Auth-context keys read here (see the module doc).
PEM_CERT = "x509_pem_cert"
COMMON_NAME = "x509_common_name"
ALT_NAMES = "x509_subject_alternative_name"


def certificate_workers(peer: Mapping[str, Sequence[bytes]]) -> set[str]:
    """The worker ids the peer's certificate names, by its CN and its URI SANs."""
    names = [*peer.get(COMMON_NAME, ()), *peer.get(ALT_NAMES, ())]
    found = {worker_of_name(n.decode(errors="replace")) for n in names}
    return {wid for wid in found if wid is not None}


def check_certificate(peer: Mapping[str, Sequence[bytes]] | None, worker_id: str) -> None:
    """PERMISSION_DENIED unless the call's client certificate, if it has one, names `worker_id`
    and no other worker. Without a client certificate there is nothing to bind."""
    if not peer or PEM_CERT not in peer:
        return
    named = certificate_workers(peer)
    if not named:
        raise Rejected(
            Refusal.PERMISSION_DENIED,
            "the client certificate names no worker (CN byzps-worker-ID): it may call Status only",
        )
    if len(named) > 1:
        raise Rejected(
            Refusal.PERMISSION_DENIED,
            f"the client certificate names several workers {sorted(named)}",
        )
    (holder,) = named
    if holder != worker_id:
        raise Rejected(
            Refusal.PERMISSION_DENIED,
            f"the certificate of worker {shown(holder)} cannot call as worker {shown(worker_id)}",
        )


class Authenticator:
    """Checks the caller's client certificate (under mutual TLS), its token, then its id.
    `secret=None` disables tokens (--no-auth) but still refuses ids outside the run.

    `bind_certificates` (default on): a call that came with a client certificate must be for
    the worker that certificate names (`check_certificate`). It changes nothing without mutual
    TLS, so on by default is on exactly when the server has --tls-client-ca; off suits a
    mutual-TLS deployment whose client certificates come from a PKI that names no byzps worker
    (transport security only; the tokens still bind the ids)."""

    def __init__(
        self, secret: bytes | None, num_workers: int, *, bind_certificates: bool = True
    ) -> None:
        self.secret = secret
        self.num_workers = num_workers
        self.bind_certificates = bind_certificates
        self._tokens: dict[bytes, int] | None = None
        #: The row an operator's credential stands for in `holder` (one past the workers).
        self.operator = num_workers

    def check(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        worker_id: str,
        fallback: bytes = b"",
        peer: Mapping[str, Sequence[bytes]] | None = None,
    ) -> int:
        """The worker's row; Rejected(PERMISSION_DENIED) for a client certificate of another
        worker (or of none), Rejected(UNAUTHENTICATED) for a missing or wrong token,
        Rejected(PERMISSION_DENIED) for an id outside [0, n). `fallback` is a token carried in
        the request itself (RegisterRequest.token), used when the metadata has none. `peer` is
        the call's gRPC auth context (`context.auth_context()`: the TLS peer's certificate
        properties), which binds the id to a client certificate under mutual TLS.

        The certificate comes first: its holder is already authenticated (by the handshake), so
        a wrong id is a permission question, whatever token it presents."""
        if self.bind_certificates:
            check_certificate(peer, worker_id)
        if self.secret is not None:
            presented = _metadata_token(metadata) or fallback
            if not presented:
                raise Rejected(Refusal.UNAUTHENTICATED, f"missing {TOKEN_METADATA_KEY} metadata")
            expected = token_for(self.secret, worker_id).encode()
            if not hmac.compare_digest(presented, expected):
                raise Rejected(Refusal.UNAUTHENTICATED, f"bad token for worker {shown(worker_id)}")
        return parse_worker_id(worker_id, self.num_workers)

    def holder(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        peer: Mapping[str, Sequence[bytes]] | None = None,
    ) -> int | None:
        """For calls that need no worker identity (Status): who presented a valid credential —
        a worker's row, `self.operator` (= n) for the operator's token or certificate — else
        None (anonymous). Never raises: a bad or absent credential only makes the call
        anonymous. Without a secret (--no-auth) there is nothing to present: every caller
        counts as the operator."""
        if self.bind_certificates and peer and PEM_CERT in peer:
            names = {n.decode(errors="replace") for n in peer.get(COMMON_NAME, ())}
            if OPERATOR_NAME in names and not certificate_workers(peer):
                return self.operator
        if self.secret is None:
            return self.operator
        presented = _metadata_token(metadata)
        if not presented:
            return None
        if self._tokens is None:  # n + 1 HMACs once, then one dict lookup per call
            ids = [*map(str, range(self.num_workers)), OPERATOR]
            self._tokens = {
                token_for(self.secret, wid).encode(): row for row, wid in enumerate(ids)
            }
        row = self._tokens.get(presented)
        if row is None or row == self.operator:
            return row
        try:
            if self.bind_certificates:
                check_certificate(peer, str(row))
        except Rejected:
            return None
        return row


def _metadata_token(metadata: Iterable[tuple[str, str | bytes]]) -> bytes:
    for key, value in metadata:
        if key == TOKEN_METADATA_KEY:
            return value.encode() if isinstance(value, str) else value
    return b""
