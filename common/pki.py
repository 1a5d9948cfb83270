"""A small X.509 PKI for mutual TLS: one CA, and certificates for the server, each worker and
an operator (`byzps status`), written as PEM files by `byzps credentials ca|cert`.

Why our own: under mutual TLS the server binds the worker id of a call to the client's
certificate (byzps.server.auth), so a worker certificate must name exactly one worker, in a form
the server reads back from gRPC's auth context: subject CN `byzps-worker-K` and URI
subjectAltName `spiffe://byzps/worker/K` (formulas in byzps.common.credentials). Making them here
keeps the names right by construction and spares operators an openssl recipe.

Keys are ECDSA P-256 (small, fast to make, accepted by gRPC's TLS stacks), written 0600;
certificates 0644. Nothing is overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from byzps.common.credentials import (
    OPERATOR_NAME,
    private_dir,
    worker_common_name,
    worker_uri,
    write_private,
)

CA_NAME = "byzps-ca"
#: Certificates are back-dated this much, so a peer whose clock runs a little behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """The files of one certificate: its PEM chain and its key."""

    cert: Path
    key: Path


def make_ca(
    directory: Path, *, name: str = CA_NAME, days: int = 3650, overwrite: bool = False
) -> Issued:
    """A self-signed CA as DIRECTORY/ca.pem (give it to every peer: --tls-ca, --tls-client-ca)
    and DIRECTORY/ca.key (keep it where certificates are made, nowhere else)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    cert = (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, "ca", (cert, key), overwrite)


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in DIRECTORY (ca.pem, ca.key); ValueError names a missing or unusable file."""
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{directory}: not a CA made by `byzps credentials ca` ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory}/ca.key: not an EC key")
    return cert, key


def worker_certs(
    ca_dir: Path,
    worker_ids: Sequence[int],
    directory: Path,
    *,
    days: int = 365,
    overwrite: bool = False,
) -> list[Issued]:
    """DIRECTORY/worker-ID.pem/.key for each id: a client certificate naming worker ID and no
    other. Nothing is written when any of the files exists and not `overwrite`."""
    specs = [
        _Spec(f"worker-{i}", worker_common_name(i), [x509.UniformResourceIdentifier(worker_uri(i))])
        for i in worker_ids
    ]
    return _leaves(ca_dir, directory, specs, [ExtendedKeyUsageOID.CLIENT_AUTH], days, overwrite)


def operator_cert(
    ca_dir: Path, directory: Path, *, days: int = 365, overwrite: bool = False
) -> Issued:
    """DIRECTORY/operator.pem/.key: a client certificate naming no worker, for `byzps status`
    under mutual TLS (the server lets it call Status only)."""
    (issued,) = _leaves(ca_dir, directory, [_Spec("operator", OPERATOR_NAME, [])],
                        [ExtendedKeyUsageOID.CLIENT_AUTH], days, overwrite)  # fmt: skip
    return issued


def server_cert(
    ca_dir: Path,
    dns_names: Sequence[str],
    ips: Sequence[str],
    directory: Path,
    *,
    days: int = 365,
    overwrite: bool = False,
) -> Issued:
    """DIRECTORY/server.pem/.key: the server's certificate, valid for the DNS names and IP
    addresses clients dial (the first DNS name is also its CN). ValueError for a bad address.

    It is a client certificate too (clientAuth): the shards of a sharded server present it
    when they call each other under mutual TLS. It names no worker, so on a worker RPC it is
    refused like any certificate naming none (byzps.server.auth)."""
    if not dns_names:
        raise ValueError("a server certificate needs at least one name")
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ValueError(f"--ip: {ip!r} is not an IP address") from None
    (issued,) = _leaves(ca_dir, directory, [_Spec("server", dns_names[0], names)],
                        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                        days, overwrite)  # fmt: skip
    return issued


# --------------------------------------------------------------------------- building blocks


@dataclass(frozen=True)
class _Spec:
    """One leaf certificate to make: file stem, subject CN, subjectAltNames."""

    stem: str
    common_name: str
    alt_names: list[x509.GeneralName]


def _leaves(
    ca_dir: Path,
    directory: Path,
    specs: list[_Spec],
    usage: Sequence[x509.ObjectIdentifier],
    days: int,
    overwrite: bool,
) -> list[Issued]:
    ca, ca_key = load_ca(ca_dir)
    for spec in specs:  # all refusals before any file is written
        _refuse_existing(directory, spec.stem, overwrite)
    return [_write(directory, spec.stem, _sign(spec, ca, ca_key, usage, days), overwrite)
            for spec in specs]  # fmt: skip


def _sign(
    spec: _Spec,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier,
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(spec.common_name), ca.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if spec.alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(spec.alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _refuse_existing(directory: Path, stem: str, overwrite: bool) -> None:
    existing = [str(p) for p in (directory / f"{stem}.pem", directory / f"{stem}.key")
                if p.exists()]  # fmt: skip
    if existing and not overwrite:
        raise FileExistsError(errno.EEXIST, "exists", ", ".join(existing))


def _write(
    directory: Path,
    stem: str,
    pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    overwrite: bool,
) -> Issued:
    cert, key = pair
    _refuse_existing(directory, stem, overwrite)
    private_dir(directory)
    issued = Issued(directory / f"{stem}.pem", directory / f"{stem}.key")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(issued.key, key_pem.decode(), overwrite=overwrite)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    write_private(issued.cert, cert_pem, overwrite=overwrite, mode=0o644)
    return issued
