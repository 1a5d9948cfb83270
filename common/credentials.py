"""Credentials used by both sides of the wire: the token a worker presents, where the shared
secret comes from, and the TLS credentials of the server's port and of client channels.

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

import grpc

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


# --------------------------------------------------------------------------- transport security


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path}: not a PEM file")
    return data


def server_tls(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS for the server's port: its certificate chain and key (PEM); with `client_ca`, mutual
    TLS — every client must present a certificate signed by that CA. None (plaintext) when no
    file is given; a ValueError names the option when they do not fit together.

    The HMAC tokens authenticate workers but travel in the clear without TLS, as do the model
    and the updates; across machines, use this.
    """
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca: needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    pair = (_read(key, "--tls-key"), _read(cert, "--tls-cert"))
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read(client_ca, "--tls-client-ca"), require_client_auth=True
    )


def channel_tls(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for a client channel: trust `ca` (default: the system's roots) and, for mutual TLS,
    present `cert` and `key` (both or neither)."""
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else _read(ca, "--tls-ca"),
        private_key=None if key is None else _read(key, "--tls-key"),
        certificate_chain=None if cert is None else _read(cert, "--tls-cert"),
    )
