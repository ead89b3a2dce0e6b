"""Test certificates, made at test time (keys are never committed).

`make_pki(dir)` writes a small PKI as PEM files and returns their paths: a CA
with a server certificate (for 127.0.0.1 and localhost) and client
certificates, plus every kind of bad certificate the TLS tests need. EC P-256
keeps generation in the milliseconds.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA both sides trust
    other_ca: Path  # a CA nobody here trusts
    server: Pair  # CN=usbipa, SAN 127.0.0.1 + localhost, signed by ca
    client: Pair  # CN=lab-1, signed by ca
    client2: Pair  # CN=lab-2, signed by ca
    client_expired: Pair
    client_self_signed: Pair
    client_other_ca: Pair  # CN=lab-1 but signed by other_ca
    server_expired: Pair
    server_self_signed: Pair
    server_other_ca: Pair
    server_wrong_host: Pair  # valid, but only for other.example
    server_as_client: Pair  # a server-only certificate (EKU serverAuth) used as a client's
    ca_key: Path | None = None  # the CA's key, for `issue_client`


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class _Ca:
    def __init__(self, cn: str) -> None:
        self.key = _key()
        self.name = _name(cn)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .sign(self.key, hashes.SHA256())
        )


def _leaf(
    issuer: _Ca | None,
    cn: str,
    *,
    server: bool,
    hosts: tuple[str, ...] = (),
    expired: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    before, after = (NOW - 10 * DAY, NOW - DAY) if expired else (NOW - DAY, NOW + 30 * DAY)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.name if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer.key if issuer else key, hashes.SHA256()), key


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_pair(
    directory: Path, name: str, made: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> Pair:
    cert, key = made
    key_path = directory / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Pair(_write_cert(directory / f"{name}.crt", cert), key_path)


_OIDS = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
}


def issue_client(
    pki: Pki,
    directory: Path,
    name: str,
    subject: tuple[tuple[str, str], ...],
    dns: tuple[str, ...] = (),
) -> Pair:
    """A client certificate from the test CA with exactly this subject, in this
    order (("CN", "lab-1,O=Example"),) is one CN holding a comma) and DNS SANs."""
    assert pki.ca_key is not None
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(_OIDS[k], v) for k, v in subject]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=not subject
        )
    directory.mkdir(parents=True, exist_ok=True)
    return _write_pair(directory, name, (builder.sign(ca_key, hashes.SHA256()), key))


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = _Ca("Test CA"), _Ca("Other CA")
    local = ("127.0.0.1", "localhost")
    ca_key = directory / "ca.key"
    ca_key.write_bytes(
        ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ca_key.chmod(0o600)
    return Pki(
        ca_key=ca_key,
        ca=_write_cert(directory / "ca.crt", ca.cert),
        other_ca=_write_cert(directory / "other-ca.crt", other.cert),
        server=_write_pair(directory, "server", _leaf(ca, "usbipa", server=True, hosts=local)),
        client=_write_pair(directory, "client", _leaf(ca, "lab-1", server=False)),
        client2=_write_pair(directory, "client2", _leaf(ca, "lab-2", server=False)),
        client_expired=_write_pair(
            directory, "client-expired", _leaf(ca, "lab-1", server=False, expired=True)
        ),
        client_self_signed=_write_pair(
            directory, "client-self", _leaf(None, "lab-1", server=False)
        ),
        client_other_ca=_write_pair(directory, "client-other", _leaf(other, "lab-1", server=False)),
        server_expired=_write_pair(
            directory, "server-expired", _leaf(ca, "usbipa", server=True, hosts=local, expired=True)
        ),
        server_self_signed=_write_pair(
            directory, "server-self", _leaf(None, "usbipa", server=True, hosts=local)
        ),
        server_other_ca=_write_pair(
            directory, "server-other", _leaf(other, "usbipa", server=True, hosts=local)
        ),
        server_wrong_host=_write_pair(
            directory,
            "server-wrong-host",
            _leaf(ca, "other.example", server=True, hosts=("other.example",)),
        ),
        server_as_client=_write_pair(
            directory, "server-as-client", _leaf(ca, "lab-1", server=True, hosts=local)
        ),
    )
