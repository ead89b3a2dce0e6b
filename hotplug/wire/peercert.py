"""A TLS peer's certificate as usbipa authorizes it: names in, yes/no out. Pure.

`PeerCert` is what the handshake proved about the client (its subject and
subjectAltName entries, from `ssl.SSLSocket.getpeercert()`, and the SHA-256
fingerprint of the certificate itself); the patterns are what an `allow`
entry's `client:` and `san:` keys say. Only a certificate that the TLS layer
already verified against usbipa's client CA ever gets here, so matching names
is all that is left to do.

Names are for matching and for logs, never for telling clients apart: two
certificates can render to the same text (a CN holding "lab-1,O=Example" and
the subject CN=lab-1,O=Example; two SAN-only certificates). What a client
owns is keyed on its fingerprint (`PeerCert.identity`).

The matching rules (docs/SECURITY.md, "Which certificates an entry admits"):
- subject: for every attribute type a pattern names, the subject's values of
  that type and the pattern's match one for one: each pattern value matches
  some subject value and each subject value matches some pattern value. So
  `CN=lab-1` admits `CN=lab-1,O=Example` but not `CN=intruder,CN=lab-1`.
- case: subject attribute values and DNS names compare case-insensitively
  (X.520's caseIgnoreMatch, DNS); URI and email values exactly; IP addresses
  as addresses.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hotplug.errors import HotplugError

# OpenSSL's long attribute names (as getpeercert() reports them) -> RFC 4514 short names.
_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
    "emailAddress": "emailAddress",
    "serialNumber": "serialNumber",
    "userId": "UID",
}
_ATTRS = {short.lower(): short for short in _SHORT.values()}
# getpeercert()'s subjectAltName types -> the prefixes openssl(1) prints and configs use.
_SAN_TYPES = {"DNS": "DNS", "IP Address": "IP", "URI": "URI", "email": "email"}
_SAN_PREFIXES = {name.lower(): name for name in _SAN_TYPES.values()}


class PatternError(HotplugError, ValueError):
    pass


@dataclass(frozen=True)
class PeerCert:
    subject: tuple[tuple[str, str], ...]  # (short attribute name, value), in order
    san: tuple[tuple[str, str], ...] = ()  # (DNS|IP|URI|email, value)
    fingerprint: str = ""  # SHA-256 of the DER certificate, hex; "" if not known

    @property
    def name(self) -> str:
        """What logs call this client: its subject, e.g. 'CN=lab-1,O=Example'.

        Not unique: see `identity`."""
        return ",".join(f"{k}={v}" for k, v in self.subject) or "(empty subject)"

    @property
    def identity(self) -> str:
        """What this client owns sessions as: its certificate, by fingerprint."""
        return f"sha256:{self.fingerprint}" if self.fingerprint else f"subject:{self.name}"

    @classmethod
    def from_ssl(cls, cert: Mapping[str, Any], der: bytes | None = None) -> PeerCert:
        """From the dict `getpeercert()` returns for a verified peer, and the
        certificate itself (`getpeercert(binary_form=True)`) for its fingerprint."""
        subject = tuple(
            (_SHORT.get(key, key), str(value))
            for rdn in cert.get("subject", ())
            for key, value in rdn
        )
        san = tuple(
            (_SAN_TYPES[kind], _normalize(_SAN_TYPES[kind], str(value)))
            for kind, value in cert.get("subjectAltName", ())
            if kind in _SAN_TYPES
        )
        return cls(subject, san, hashlib.sha256(der).hexdigest() if der else "")


@dataclass(frozen=True)
class SubjectPattern:
    """`CN=lab-*,O=Example`: the subject's values of each attribute type named
    match the pattern's one for one (globs in values, case-insensitive)."""

    parts: tuple[tuple[str, str], ...]  # values lower-cased
    text: str

    def matches(self, cert: PeerCert) -> bool:
        for attr in {a for a, _ in self.parts}:
            globs = [g for a, g in self.parts if a == attr]
            values = [v.lower() for k, v in cert.subject if k == attr]
            # Both ways: `CN=lab-1` must not admit `CN=intruder,CN=lab-1`.
            if not values or not all(any(fnmatch.fnmatchcase(v, g) for g in globs) for v in values):
                return False
            if not all(any(fnmatch.fnmatchcase(v, g) for v in values) for g in globs):
                return False
        return True


@dataclass(frozen=True)
class SanPattern:
    """`DNS:lab-1.example.net`, `IP:192.0.2.7`, `URI:spiffe://…`, `email:…`; bare = DNS."""

    kind: str
    glob: str
    text: str

    def matches(self, cert: PeerCert) -> bool:
        return any(k == self.kind and fnmatch.fnmatchcase(v, self.glob) for k, v in cert.san)


def parse_subject_pattern(text: str) -> SubjectPattern:
    parts = []
    for item in text.split(","):
        attr, sep, value = item.strip().partition("=")
        short = _ATTRS.get(attr.strip().lower())
        if not sep or not value.strip():
            raise PatternError(f"expected ATTR=VALUE pairs like 'CN=lab-1', got {text!r}")
        if short is None:
            known = ", ".join(sorted(_ATTRS.values()))
            raise PatternError(f"unknown attribute {attr.strip()!r} in {text!r} (known: {known})")
        parts.append((short, value.strip().lower()))
    return SubjectPattern(tuple(parts), text)


def parse_san_pattern(text: str) -> SanPattern:
    prefix, sep, value = text.strip().partition(":")
    kind = _SAN_PREFIXES.get(prefix.lower()) if sep else None
    if kind is None:
        # A bare name, or something like 'spiffe://x' whose prefix is no SAN type.
        kind, value = "DNS", text.strip()
    if not value:
        raise PatternError(f"expected a name like 'DNS:lab-1.example.net', got {text!r}")
    return SanPattern(kind, _normalize(kind, value), text)


def _normalize(kind: str, value: str) -> str:
    # getpeercert() spells IPv6 SANs in full upper case ('2001:DB8:0:0:0:0:0:7'):
    # compare addresses, not spellings. DNS names are case-insensitive.
    if kind == "IP":
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            return value.strip()
    if kind == "DNS":
        return value.strip().lower()
    return value.strip()
