"""Test certificates made at test time (the `cryptography` package): a CA, a server certificate for
127.0.0.1 and localhost, and client certificates. No key is ever committed."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class PKI:
    ca: Path           # the CA certificate clients and brokers trust
    server_cert: Path  # for 127.0.0.1 and localhost
    server_key: Path
    client_cert: Path  # a client certificate signed by the CA
    client_key: Path
    ca_certificate: x509.Certificate  # to issue more certificates in a test (the CA key stays in memory)
    ca_key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moeworks tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _sign(subject: str, public_key, issuer: x509.Name, issuer_key, *, ca: bool,
          sans: list[x509.GeneralName] | None = None, usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_ca(folder: Path, name: str = "moeworks test CA") -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _sign(name, key.public_key(), _name(name), key, ca=True)
    path = folder / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def issue(folder: Path, stem: str, ca_cert: x509.Certificate, ca_key, *, server: bool,
          names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[Path, Path]:
    """A certificate for a server (by default for 127.0.0.1 and localhost) or a client, signed by the
    CA: (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [_san(name) for name in names] if server else None
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = _sign(names[0] if server else stem, key.public_key(), ca_cert.subject, ca_key, ca=False, sans=sans,
                 usage=usage)
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_pki(folder: Path) -> PKI:
    ca, ca_cert, ca_key = make_ca(folder)
    server_cert, server_key = issue(folder, "server", ca_cert, ca_key, server=True)
    client_cert, client_key = issue(folder, "client", ca_cert, ca_key, server=False)
    return PKI(ca=ca, server_cert=server_cert, server_key=server_key, client_cert=client_cert,
                   client_key=client_key, ca_certificate=ca_cert, ca_key=ca_key)
