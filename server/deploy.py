"""`dermfed deploy`: what a real federation needs, made and written down.

`init` creates, in one folder:
- `certificates/ca.crt`, `ca.key`: a private certificate authority (keep ca.key offline);
- `certificates/superlink.crt`, `superlink.key`: the SuperLink's TLS certificate, signed by the CA,
  with subject alternative names IP:127.0.0.1, DNS:localhost and the host names given;
- `hospitals/<name>/auth_key` and `auth_key.pub`: one ECDSA (NIST P-384) key pair per hospital
  in OpenSSH format, for Flower's SuperNode authentication; the private key goes to that
  hospital only, the public key is registered at the SuperLink;
- `flwr-home/config.toml`: the operator's `flwr` connection to the SuperLink over TLS;
- `COMMANDS.md`: the exact `flower-superlink`, `flwr supernode register`, `flower-supernode`
  and `flwr run` commands for this federation.

`register` registers every hospital's public key with the running SuperLink (started with
`--enable-supernode-auth`, which then refuses every node whose key is not registered).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CONNECTION = "dermfed"
VALID_DAYS = 825
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class DeployError(RuntimeError):
    """The federation folder cannot be made or used as asked."""


@dataclass(frozen=True)
class FederationLayout:
    root: Path

    @property
    def certificates(self) -> Path:
        return self.root / "certificates"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    def hospital_dir(self, name: str) -> Path:
        return self.root / "hospitals" / name

    def hospitals(self) -> list[str]:
        folder = self.root / "hospitals"
        return sorted(p.name for p in folder.iterdir() if (p / "auth_key.pub").is_file()) if folder.is_dir() else []


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DermFed federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("DermFed CA")).issuer_name(_name("DermFed CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write_private(folder / "ca.key", _key_pem(key))
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
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


def make_server_certificate(folder: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                            hosts: list[str]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "localhost"))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(subject_alternative_names(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(folder / "superlink.key", _key_pem(key))
    (folder / "superlink.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def make_hospital_key(folder: Path) -> None:
    """ECDSA P-384 key pair in OpenSSH format, as Flower's SuperNode authentication reads it."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(folder / "auth_key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                          serialization.NoEncryption()))
    (folder / "auth_key.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")


def write_connection(layout: FederationLayout, address: str) -> Path:
    layout.flwr_home.mkdir(parents=True, exist_ok=True)
    path = layout.flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                    f'address = "{address}"\nroot-certificates = "{(layout.certificates / "ca.crt").resolve()}"\n')
    return path


def commands(layout: FederationLayout, host: str, port: int, hospitals: list[str]) -> str:
    """The exact commands of this federation, as COMMANDS.md."""
    certs = layout.certificates.resolve()
    home = layout.flwr_home.resolve()
    lines = [
        "# DermFed federation: commands",
        "",
        f"SuperLink address: `{host}:{port}` (TLS, SuperNode authentication on).",
        "",
        "## 1. On the server: start the SuperLink",
        "",
        "```bash",
        f"flower-superlink --ssl-ca-certfile {certs}/ca.crt --ssl-certfile {certs}/superlink.crt \\",
        f"    --ssl-keyfile {certs}/superlink.key --enable-supernode-auth \\",
        f"    --disable-runtime-dependency-installation --host 0.0.0.0 --port {port} \\",
        f"    --database {layout.root.resolve()}/superlink-state.db",
        "```",
        "",
        "## 2. On the server: register every hospital's public key",
        "",
        "```bash",
        f"dermfed deploy register --dir {layout.root.resolve()}",
        "# which runs, for each hospital:",
    ]
    for name in hospitals:
        lines.append(f"FLWR_HOME={home} flwr supernode register {layout.hospital_dir(name).resolve()}/auth_key.pub {CONNECTION}")
    lines += ["```", "", "## 3. At each hospital: start its SuperNode (client daemon)", "",
              "Copy to the hospital only `certificates/ca.crt` and its own `hospitals/<name>/auth_key`.",
              "Point `data-root` at the hospital's own image folder; it never leaves the hospital.", ""]
    for index, name in enumerate(hospitals):
        lines += [f"### {name}", "", "```bash",
                  f"flower-supernode --root-certificates ca.crt --superlink {host}:{port} \\",
                  f"    --auth-supernode-private-key hospitals/{name}/auth_key \\",
                  f"    --node-config 'data-root=\"/path/to/{name}/images\" site-name=\"{name}\" site-index={index}' \\",
                  f"    --port {9094 + index}",
                  "```", ""]
    lines += ["## 4. On the server: run federated pretraining", "", "```bash",
              f"FLWR_HOME={home} flwr run . {CONNECTION} --stream \\",
              f"    --run-config 'config-preset=\"configs/paper.yaml\" run-dir=\"{layout.root.resolve()}/runs/pretrain-1\"'",
              "```", "",
              "Resume an interrupted run from its last completed round: add `resume=true` to `--run-config`.",
              ""]
    return "\n".join(lines)


def init_federation(out: Path, hospitals: list[str], hosts: list[str], port: int) -> FederationLayout:
    if not hospitals:
        raise DeployError("name at least one hospital: --hospital NAME [--hospital NAME ...]")
    bad = [h for h in hospitals if not NAME_PATTERN.match(h)]
    if bad or len(set(hospitals)) != len(hospitals):
        raise DeployError(f"hospital names must be unique and use letters, digits, '.', '_', '-': {bad or hospitals}")
    layout = FederationLayout(out)
    if (layout.certificates / "ca.key").exists():
        raise DeployError(f"{out} already holds a federation (certificates/ca.key); choose another --out")
    layout.certificates.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(layout.certificates)
    make_server_certificate(layout.certificates, ca_key, ca_cert, hosts)
    for name in hospitals:
        make_hospital_key(layout.hospital_dir(name))
    host = hosts[0] if hosts else "127.0.0.1"
    write_connection(layout, f"{host}:{port}")
    (out / "COMMANDS.md").write_text(commands(layout, host, port, hospitals))
    return layout


def register_hospitals(root: Path, hospitals: list[str] | None = None) -> list[str]:
    """`flwr supernode register` for each hospital's public key, against the running SuperLink."""
    layout = FederationLayout(root)
    names = hospitals or layout.hospitals()
    unknown = [n for n in names if not (layout.hospital_dir(n) / "auth_key.pub").is_file()]
    if unknown:
        raise DeployError(f"no key for {unknown} in {root}/hospitals; known: {layout.hospitals()}")
    env = {**os.environ, "FLWR_HOME": str(layout.flwr_home.resolve()), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")) or "flwr"
    for name in names:
        result = subprocess.run([flwr, "supernode", "register", str(layout.hospital_dir(name) / "auth_key.pub"),
                                 CONNECTION, "--name", name], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise DeployError(f"registering {name} failed (is the SuperLink running with --enable-supernode-auth?):\n"
                              f"{result.stdout}{result.stderr}")
    return names
