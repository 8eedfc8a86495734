"""Keys and certificates of a federation, handled as keys.

Every private key is written through `write_private`: the file is created with mode 0600 by
`os.open`, so it is never readable by others, not even for the instant between creation and
a `chmod`. An existing file is never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825
PRIVATE_MODE = 0o600


def write_private(path: Path, data: bytes) -> Path:
    """Create `path` with mode 0600 from its first byte; refuse to replace an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)
    return path


def write_public(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DermFed federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(key_path: Path, cert_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A private CA: its key goes to `key_path` (to be kept offline), its certificate to `cert_path`."""
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (x509.CertificateBuilder().subject_name(_name("DermFed CA")).issuer_name(_name("DermFed CA"))
               .public_key(key.public_key()).serial_number(x509.random_serial_number()))
    cert = (_validity(builder)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    write_private(key_path, _pem(key))
    write_public(cert_path, cert_pem(cert))
    return key, cert


def subject_alternative_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """IP:127.0.0.1 and DNS:localhost always, plus each host as an IP or DNS name."""
    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    for host in hosts:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in names:
            names.append(entry)
    return names


def issue_certificate(folder: Path, stem: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                      common_name: str, usage: str, hosts: Iterable[str] = ()) -> x509.Certificate:
    """`stem.key` (0600) and `stem.crt` signed by the CA: a TLS server (`usage="server"`) or client certificate."""
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number()))
    builder = (_validity(builder)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if usage == "server"
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if usage == "server":
        builder = builder.add_extension(x509.SubjectAlternativeName(subject_alternative_names(hosts)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA384())
    write_private(folder / f"{stem}.key", _pem(key))
    write_public(folder / f"{stem}.crt", cert_pem(cert))
    return cert


def make_node_key(folder: Path) -> None:
    """ECDSA P-384 key pair in OpenSSH format, as Flower's SuperNode authentication reads it."""
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(folder / "auth_key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                         serialization.NoEncryption()))
    write_public(folder / "auth_key.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                        serialization.PublicFormat.OpenSSH) + b"\n")


def make_signing_key(private_path: Path, public_path: Path, comment: str) -> None:
    """Ed25519 key that signs app bundles (OpenSSH format; the public line is what hospitals trust)."""
    key = ed25519.Ed25519PrivateKey.generate()
    write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_public(public_path, public + f" {comment}\n".encode())


def make_loopback_certificate(folder: Path) -> Path:
    """A throwaway self-signed certificate for 127.0.0.1 (a hospital's SuperNode -> its local forwarder).

    Flower's SuperNode authenticates only over TLS, so even the loopback hop is TLS. The key is
    made afresh at every start and trusted by nothing but that SuperNode (`loopback.crt`).
    """
    for stale in ("loopback.key", "loopback.crt"):
        (folder / stale).unlink(missing_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("127.0.0.1")
    cert = (_validity(x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                      .serial_number(x509.random_serial_number()))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA384()))
    write_private(folder / "loopback.key", _pem(key))
    return write_public(folder / "loopback.crt", cert_pem(cert))
