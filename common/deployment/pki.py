"""Keys and certificates of a federation, handled as keys.

Every private key is written through `common.deployment.files.write_private` (mode 0600 from
its first byte, never overwritten) and only where its owner runs: a hospital makes its own keys
and a certificate signing request (`make_client_request`); the coordinator's CA signs the
request (`sign_client_request`) without ever seeing the hospital's private key, and revokes a
certificate by listing its serial in a signed revocation list (`make_crl`) that the edge reads.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.deployment.files import write_private, write_public

VALID_DAYS = 825


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


def load_ca(key_path: Path, cert_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not the federation's CA key (an EC private key)")
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ValueError(f"{key_path} is not the key of the CA certificate {cert_path}")
    return key, cert


def make_client_request(folder: Path, common_name: str) -> x509.CertificateSigningRequest:
    """A hospital's TLS client key (`client.key`, 0600) and its signing request (`client.csr`)."""
    key = ec.generate_private_key(ec.SECP384R1())
    request = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name)).sign(key, hashes.SHA384())
    write_private(folder / "client.key", _pem(key))
    write_public(folder / "client.csr", request.public_bytes(serialization.Encoding.PEM))
    return request


def sign_client_request(request_pem: bytes, common_name: str, ca_key: ec.EllipticCurvePrivateKey,
                        ca_cert: x509.Certificate) -> x509.Certificate:
    """The CA's client certificate for a hospital's request, checked: self-signed by its key, named as expected."""
    request = x509.load_pem_x509_csr(request_pem)
    if not request.is_signature_valid:
        raise ValueError("the certificate signing request's signature does not verify")
    names = [a.value for a in request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [common_name]:
        raise ValueError(f"the certificate signing request names {names}, not the hospital {common_name!r}")
    if not isinstance(request.public_key(), ec.EllipticCurvePublicKey):
        raise ValueError("the certificate signing request must hold an EC public key (made by `dermfed node keygen`)")
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(request.public_key()).serial_number(x509.random_serial_number()))
    return (_validity(builder)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))


def make_crl(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, serials: Iterable[int]) -> bytes:
    """The CA's revocation list of these certificate serials, valid as long as the CA itself."""
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - dt.timedelta(minutes=5)).next_update(ca_cert.not_valid_after_utc))
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    return builder.sign(ca_key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM)


def crl_serials(pem: bytes) -> set[int]:
    return {entry.serial_number for entry in x509.load_pem_x509_crl(pem)}


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
