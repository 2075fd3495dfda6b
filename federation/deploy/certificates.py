"""TLS certificates and SuperNode keys for a Flower deployment, made with `cryptography`.

A federation needs three kinds of key material:

- a certificate authority (CA) that SuperNodes and the `flwr` CLI trust (`--root-certificates`,
  `root-certificates` in `$FLWR_HOME/config.toml`) and the SuperLink presents
  (`--ssl-ca-certfile`);
- the SuperLink's server certificate, signed by the CA, whose subject alternative names (SANs)
  must cover every address clients dial (`IP:127.0.0.1` for a local deployment);
- one ECDSA P-384 key pair per SuperNode: the private key in OpenSSH format
  (`flower-supernode --auth-supernode-private-key` loads it with `load_ssh_private_key`) and the
  public key as an OpenSSH line (`flwr supernode register` loads it with `load_ssh_public_key`).

Private keys are written with mode 0600 from their first byte on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import CertificateError

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
NODE_PUBLIC_KEY_SUFFIX = ".pub"

# One year for the CA and the server: long enough for a study, short enough to be rotated.
DEFAULT_VALIDITY_DAYS = 365
# Clocks of SuperNodes and the SuperLink differ a little; backdating avoids "not yet valid".
_BACKDATE = dt.timedelta(minutes=5)
_CURVE = ec.SECP384R1()  # P-384: what Flower's node authentication uses and documents


def make_ca(
    out_dir: Path, *, common_name: str = "fedfew CA", validity_days: int = DEFAULT_VALIDITY_DAYS
) -> tuple[Path, Path]:
    """Create a self-signed certificate authority.

    Args:
        out_dir: Folder that receives `ca.crt` and `ca.key` (created if missing).
        common_name: Subject common name of the CA.
        validity_days: Days from now until the certificate expires.

    Returns:
        The paths of the CA certificate (PEM) and of its private key (PEM, mode 0600).
    """
    _check_validity(validity_days)
    key = ec.generate_private_key(_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return _write_pair(Path(out_dir), certificate, key, CA_CERT_FILE, CA_KEY_FILE)


def make_server_certificate(
    out_dir: Path,
    *,
    ca_cert: Path,
    ca_key: Path,
    hosts: Sequence[str],
    validity_days: int = DEFAULT_VALIDITY_DAYS,
    not_valid_before: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Create the SuperLink's TLS certificate, signed by the CA.

    Args:
        out_dir: Folder that receives `server.pem` and `server.key` (created if missing).
        ca_cert: The CA certificate (PEM) from `make_ca`.
        ca_key: The CA private key (PEM) from `make_ca`.
        hosts: Every address clients use to reach the SuperLink. Each IP address becomes an
            `IP:` SAN, each other name a `DNS:` SAN; all of them are included.
        validity_days: Days from `not_valid_before` until the certificate expires.
        not_valid_before: Start of validity (default: a few minutes ago). Tests set a past
            date to make an expired certificate.

    Returns:
        The paths of the certificate (PEM) and of its private key (PEM, mode 0600).

    Raises:
        ValueError: `hosts` is empty.
        CertificateError: The CA certificate or key cannot be read.
    """
    if not hosts:
        raise ValueError("hosts is empty: give every address clients dial, e.g. ['127.0.0.1']")
    _check_validity(validity_days)
    authority = _load_certificate(Path(ca_cert))
    authority_key = _load_private_key(Path(ca_key))
    key = ec.generate_private_key(_CURVE)
    start = not_valid_before or dt.datetime.now(dt.UTC) - _BACKDATE
    san = x509.SubjectAlternativeName([_general_name(host) for host in hosts])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(authority.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(authority_key, hashes.SHA384())
    )
    return _write_pair(Path(out_dir), certificate, key, SERVER_CERT_FILE, SERVER_KEY_FILE)


def make_node_keypair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Create a SuperNode authentication key pair (ECDSA P-384, OpenSSH formats).

    Args:
        out_dir: Folder that receives `<name>` (private key) and `<name>.pub` (public key).
        name: File name of the key, e.g. the site name.

    Returns:
        The private key path (OpenSSH, mode 0600; for `--auth-supernode-private-key`) and the
        public key path (one OpenSSH line; for `flwr supernode register`).

    Raises:
        ValueError: `name` is empty or contains a path separator.
    """
    if not name or "/" in name or name in {".", ".."}:
        raise ValueError(f"name={name!r} must be a plain file name, e.g. 'hospital-a'")
    key = ec.generate_private_key(_CURVE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path = out / name
    public_path = out / f"{name}{NODE_PUBLIC_KEY_SUFFIX}"
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    _write_private(private_path, private_bytes)
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_path.write_bytes(public_line + f" {name}\n".encode())
    return private_path, public_path


def check_certificate(path: Path, *, ca: Path, now: dt.datetime | None = None) -> x509.Certificate:
    """Check that a certificate exists, parses, is currently valid and is signed by the CA.

    Args:
        path: The certificate to check (PEM).
        ca: The CA certificate (PEM) that must have signed it.
        now: The time to check validity at (default: now, UTC).

    Returns:
        The parsed certificate.

    Raises:
        CertificateError: A file is missing or is not a PEM certificate, the certificate is
            expired or not yet valid, or the CA did not sign it. The message names the file.
    """
    certificate = _load_certificate(Path(path))
    authority = _load_certificate(Path(ca))
    check_validity(certificate, path, now=now)
    if certificate.issuer != authority.subject or not _signed_by(certificate, authority):
        raise CertificateError(
            f"certificate {path} is not signed by the CA in {ca}: issue it with this CA's key, "
            "or give nodes the CA that issued it"
        )
    return certificate


def check_validity(
    certificate: x509.Certificate,
    path: Path,
    *,
    now: dt.datetime | None = None,
    what: str = "certificate",
    renew: str = "issue a new one with make_server_certificate and restart the SuperLink",
) -> None:
    """Refuse a certificate outside its validity period: the one expiry check of the project.

    Args:
        certificate: The parsed certificate.
        path: Its file, named in the message.
        now: The time to check validity at (default: now, UTC).
        what: What the certificate is, in the message ("CA certificate", ...).
        renew: What to do about an expired one, in the message.

    Raises:
        CertificateError: expired (with ``renew``) or not yet valid (check the clock).
    """
    moment = now or dt.datetime.now(dt.UTC)
    if moment > certificate.not_valid_after_utc:
        raise CertificateError(
            f"{what} {path} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
            f"{renew}"
        )
    if moment < certificate.not_valid_before_utc:
        raise CertificateError(
            f"{what} {path} is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this machine's clock"
        )


def _load_certificate(path: Path) -> x509.Certificate:
    if not path.is_file():
        raise CertificateError(
            f"certificate file {path} does not exist: create it with make_ca / "
            "make_server_certificate or fix the path"
        )
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CertificateError(
            f"{path} is not a PEM certificate ({err}): give the '.crt'/'.pem' file that starts "
            "with '-----BEGIN CERTIFICATE-----'"
        ) from err


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if not path.is_file():
        raise CertificateError(f"private key file {path} does not exist: fix the path")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise CertificateError(
            f"{path} is not an unencrypted PEM private key ({err}): give the CA key from make_ca"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(f"{path} holds a {type(key).__name__}: expected an EC or RSA key")
    return key


def _signed_by(certificate: x509.Certificate, authority: x509.Certificate) -> bool:
    public_key = authority.public_key()
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None:
        return False
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(
                certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(algorithm)
            )
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(
                certificate.signature,
                certificate.tbs_certificate_bytes,
                padding.PKCS1v15(),
                algorithm,
            )
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_pair(
    out: Path,
    certificate: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    cert_name: str,
    key_name: str,
) -> tuple[Path, Path]:
    """Write a certificate (PEM) and its private key (PEM, mode 0600) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / cert_name, out / key_name
    _write_private(key_path, _pem_private(key))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only, from the first byte on."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _check_validity(validity_days: int) -> None:
    if validity_days < 1:
        raise ValueError(f"validity_days={validity_days} must be >= 1")
