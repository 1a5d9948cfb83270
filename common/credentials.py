"""Credentials used by both sides of the wire: the token a worker presents, where the master
secret and the token files come from, the identity a worker certificate carries, and the TLS
credentials of the server's port and of client channels.

Every RPC except Status carries the gRPC metadata `byzps-token` =
hex(HMAC-SHA256(secret, b"worker:" + worker_id)). A token binds the caller to one worker id, so a
Byzantine worker holding its own token cannot push as an honest one — provided it holds *only*
its own: the master secret derives every id's token, so it belongs to the server alone, and each
worker gets its token file (`byzps credentials issue`). Workers, the server and the credential
commands take the formulas from this one module (below all of them in the layering), so they
cannot drift apart.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

import grpc

#: gRPC metadata key of the worker token (lower case, as gRPC requires).
TOKEN_METADATA_KEY = "byzps-token"
#: Environment variable holding the shared secret when no secret file is given.
SECRET_ENV = "BYZPS_SECRET"
#: A token as `token_for` writes it: 64 lower-case hex digits.
TOKEN_PATTERN = re.compile(r"[0-9a-f]{64}")
#: Subject common name of worker K's certificate: "byzps-worker-K".
WORKER_CN_PREFIX = "byzps-worker-"
#: The subject CN of an operator's client certificate: it names no worker.
OPERATOR_NAME = "byzps-operator"
#: URI subjectAltName of worker K's certificate (SPIFFE-shaped): "spiffe://byzps/worker/K".
WORKER_URI_PREFIX = "spiffe://byzps/worker/"

#: What a client process authenticates with: the tokens of the ids it holds (by wire id), the
#: master secret (legacy: it derives every id's token), or None (a server run with --no-auth).
ClientCredential = Mapping[str, str] | bytes | None


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


def new_secret() -> str:
    """A fresh 256-bit master secret as hex text."""
    return secrets.token_hex(32)


def write_private(path: Path, text: str, *, overwrite: bool = False, mode: int = 0o600) -> None:
    """Write `text` to a file created with `mode` (owner-only by default), so the content is
    never readable by others, not even for an instant. An existing file raises FileExistsError
    unless `overwrite` (then it is truncated and its mode reset)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), mode)  # an overwritten file keeps its old mode otherwise
        fh.write(text)


def write_secret(path: Path, *, overwrite: bool = False) -> None:
    """A fresh master secret as hex text (no newline) in `path`, mode 0600."""
    write_private(path, new_secret(), overwrite=overwrite)


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can enter (0700), created if missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


# --------------------------------------------------------------------------- per-worker tokens


#: The name an operator's token is derived for (`token_for(secret, OPERATOR)`): no canonical
#: worker id looks like it, so it can call no worker RPC, and Status shows it every worker.
OPERATOR = "operator"
#: An operator's token file in a token directory (`byzps credentials issue --operator`).
OPERATOR_TOKEN_FILE = "operator.token"


def token_file_name(worker_id: int | str) -> str:
    """The file holding worker `worker_id`'s token in a token directory: worker-ID.token."""
    return f"worker-{worker_id}.token"


def read_token(path: Path) -> str:
    """The token in a token file (surrounding whitespace ignored). ValueError names the file
    when it holds no token, e.g. when a master secret or a key was passed by mistake."""
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    if not TOKEN_PATTERN.fullmatch(text):
        raise ValueError(f"{path}: not a worker token (64 hex digits, `byzps credentials issue`)")
    return text


def read_tokens(directory: Path, worker_ids: list[int]) -> dict[str, str]:
    """The tokens of exactly `worker_ids` from DIRECTORY/worker-ID.token; ValueError naming
    every missing file (a cohort must hold each of its ids' tokens, and reads no other)."""
    missing = [i for i in worker_ids if not (directory / token_file_name(i)).is_file()]
    if missing:
        names = ", ".join(token_file_name(i) for i in missing)
        raise ValueError(f"{directory}: no token file for worker(s) {missing} ({names})")
    return {str(i): read_token(directory / token_file_name(i)) for i in worker_ids}


def issue_tokens(
    secret: bytes,
    worker_ids: list[int],
    directory: Path,
    *,
    overwrite: bool = False,
    operator: bool = False,
) -> list[Path]:
    """Write each id's token to DIRECTORY/worker-ID.token (and with `operator` the operator's to
    DIRECTORY/operator.token), 0600 in a 0700 directory. Nothing is written when a file exists
    and not `overwrite` (FileExistsError names them all)."""
    names = {token_file_name(i): str(i) for i in worker_ids}
    if operator:
        names[OPERATOR_TOKEN_FILE] = OPERATOR
    paths = [directory / name for name in names]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(errno.EEXIST, "exists", ", ".join(existing))
    private_dir(directory)
    for name, path in zip(names.values(), paths, strict=True):
        write_private(path, token_for(secret, name), overwrite=overwrite)
    return paths


def token_of(credential: ClientCredential, worker_id: str) -> str | None:
    """The token a client presents for `worker_id`: held (from a token file), derived from the
    master secret, or None without auth. ValueError when the held tokens lack that id."""
    if credential is None:
        return None
    if isinstance(credential, bytes):
        return token_for(credential, worker_id)
    try:
        return credential[worker_id]
    except KeyError:
        raise ValueError(
            f"no token for worker {worker_id}: it is not an id this process holds"
        ) from None


# --------------------------------------------------------------------------- certificate identity


def worker_common_name(worker_id: int | str) -> str:
    """The subject CN of worker `worker_id`'s certificate."""
    return f"{WORKER_CN_PREFIX}{worker_id}"


def worker_uri(worker_id: int | str) -> str:
    """The URI subjectAltName of worker `worker_id`'s certificate."""
    return f"{WORKER_URI_PREFIX}{worker_id}"


def worker_of_name(name: str) -> str | None:
    """The worker id a certificate name (CN or URI SAN) stands for, or None for other names."""
    for prefix in (WORKER_CN_PREFIX, WORKER_URI_PREFIX):
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix) :]
    return None


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
