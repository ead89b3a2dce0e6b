"""Certificates and TLS contexts for tls:// and wss://: load, check, explain failures.

Everything is stdlib `ssl` (OpenSSL). Certificate files are checked before
use so that a wrong file is one clear line at start, not an obscure handshake
failure later: missing or unreadable, not PEM, key not matching, expired or
not yet valid, unsuitable for its role (a server-only certificate used by a
client), and a CA file that holds no CA.

The expiry and purpose checks run OpenSSL's own verification on our own
certificate: a TLS handshake in memory (no socket) in which the verifying
side trusts exactly that certificate (VERIFY_X509_PARTIAL_CHAIN makes a leaf
a trust anchor). That checks what a real peer will check, and hands back the
decoded certificate (names, dates) without a parsing library.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hotplug.errors import HotplugError
from hotplug.wire.peercert import PeerCert

Role = Literal["client", "server"]
MIN_VERSION = ssl.TLSVersion.TLSv1_2
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME, which the ssl module has no name for:
# used only to read the dates of a certificate that failed its time check.
_NO_CHECK_TIME = 0x200000
# SSL_OP_ENABLE_KTLS (OpenSSL 3.0+; `ssl.OP_ENABLE_KTLS` from Python 3.12): let
# OpenSSL hand the session keys to the kernel's TLS (the `tls` module) when the
# kernel, the cipher and the version allow; it falls back to doing the work
# itself without a word otherwise. channel.py says what that gives the relay.
_ENABLE_KTLS = getattr(ssl, "OP_ENABLE_KTLS", 1 << 3)


class CertError(HotplugError):
    """A certificate, key or CA file cannot be used; the message says which and why."""


@dataclass(frozen=True)
class CertInfo:
    path: str
    subject: str  # 'CN=lab-1,O=Example'
    san: tuple[str, ...]  # ('DNS:lab-1.example.net', 'IP:192.0.2.7')
    not_before: str
    not_after: str
    fingerprint: str  # 'SHA256:AB:CD:…', as `openssl x509 -fingerprint -sha256` prints it

    def describe(self) -> str:
        san = f", SAN {', '.join(self.san)}" if self.san else ""
        return f"{self.subject}{san}, valid until {self.not_after}, {self.fingerprint}"


# --------------------------------------------------------------------------- files


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise CertError(f"{what} {path}: is a directory, not a file") from None
    except PermissionError:
        raise CertError(f"{what} {path}: cannot read: permission denied") from None
    except OSError as exc:
        raise CertError(f"{what} {path}: cannot read: {exc.strerror}") from None


def _require_pem(data: bytes, path: str, what: str, label: bytes) -> None:
    if b"-----BEGIN " not in data or label not in data:
        kind = "certificate" if label == b"CERTIFICATE-----" else "private key"
        raise CertError(f"{what} {path}: not a PEM {kind} (expected '-----BEGIN …' lines)")


def fingerprint(cert_path: str) -> str:
    """SHA-256 of the first certificate in the file (DER), colon-separated hex."""
    data = _read(cert_path, "certificate")
    _require_pem(data, cert_path, "certificate", b"CERTIFICATE-----")
    start = data.index(b"-----BEGIN CERTIFICATE-----")
    end = data.index(b"-----END CERTIFICATE-----", start) + len(b"-----END CERTIFICATE-----")
    try:
        der = ssl.PEM_cert_to_DER_cert(data[start:end].decode("ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CertError(f"certificate {cert_path}: damaged PEM data") from exc
    digest = hashlib.sha256(der).hexdigest().upper()
    return "SHA256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _load_pair(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    cert_data = _read(cert, "certificate")
    key_data = _read(key, "key")
    _require_pem(cert_data, cert, "certificate", b"CERTIFICATE-----")
    _require_pem(key_data, key, "key", b"PRIVATE KEY-----")
    if b"ENCRYPTED" in key_data:
        raise CertError(
            f"key {key}: is encrypted with a passphrase; give an unencrypted key "
            "(protect it with file permissions instead)"
        )
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertError(f"key {key} does not match certificate {cert}") from None
        raise CertError(f"certificate {cert} / key {key}: cannot load: {_reason(exc)}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str, what: str) -> None:
    data = _read(ca, what)
    _require_pem(data, ca, what, b"CERTIFICATE-----")
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise CertError(f"{what} {ca}: cannot load: {_reason(exc)}") from None
    if not ctx.cert_store_stats().get("x509_ca"):
        raise CertError(
            f"{what} {ca}: holds no CA certificate (one with basicConstraints CA:TRUE); "
            "was a server or client certificate given instead of the CA?"
        )


# --------------------------------------------------------------------------- checks


def check_pair(cert: str, key: str, role: Role) -> CertInfo:
    """Check our own certificate and key for `role`; return what they say."""
    _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
    pem = _read(cert, "certificate").decode("ascii", "replace")
    failure, decoded = _self_verify(cert, key, role, cadata=pem, partial=True)
    if failure is not None:
        dates = ""
        if "expired" in failure or "not yet valid" in failure:
            _, undated = _self_verify(cert, key, role, cadata=pem, partial=True, check_time=False)
            if undated is not None:
                dates = f" (valid {undated['notBefore']} to {undated['notAfter']})"
        hint = ""
        if "purpose" in failure:
            usage = "clientAuth" if role == "client" else "serverAuth"
            hint = f" (a {role} certificate needs extendedKeyUsage {usage})"
        raise CertError(f"{cert}: {failure}{dates}{hint}")
    assert decoded is not None
    peer = PeerCert.from_ssl(decoded)
    return CertInfo(
        path=cert,
        subject=peer.name,
        san=tuple(f"{kind}:{value}" for kind, value in peer.san),
        not_before=str(decoded.get("notBefore", "?")),
        not_after=str(decoded.get("notAfter", "?")),
        fingerprint=fingerprint(cert),
    )


def check_ca(ca: str, what: str = "CA file") -> None:
    _load_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ca, what)


def issued_by(cert: str, key: str, role: Role, ca: str) -> str | None:
    """None if `ca` verifies our certificate, else OpenSSL's reason.

    Not an error by itself: the peer may trust another CA than the one we use
    to check it. Callers warn, so a mixed-up CA file is noticed at start.
    """
    failure, _ = _self_verify(cert, key, role, cadata=_read(ca, "CA file").decode(), partial=False)
    return failure


def _self_verify(
    cert: str, key: str, role: Role, *, cadata: str, partial: bool, check_time: bool = True
) -> tuple[str | None, dict[str, Any] | None]:
    """Verify our certificate as a peer in `role` would, in memory.

    Returns (failure reason, None) or (None, the decoded certificate).
    """
    server_proto, client_proto = ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT
    verifier = ssl.SSLContext(server_proto if role == "client" else client_proto)
    prover = ssl.SSLContext(client_proto if role == "client" else server_proto)
    verifier.check_hostname = False
    verifier.verify_mode = ssl.CERT_REQUIRED
    verifier.load_verify_locations(cadata=cadata)
    if partial:
        verifier.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if not check_time:
        verifier.verify_flags |= _NO_CHECK_TIME
    prover.check_hostname = False
    prover.verify_mode = ssl.CERT_NONE
    prover.load_cert_chain(cert, key)
    if role == "client":
        verifier.load_cert_chain(cert, key)  # a server needs some certificate to talk at all
        server, client = verifier, prover
    else:
        server, client = prover, verifier
    try:
        server_end, client_end = _memory_handshake(server, client)
    except ssl.SSLCertVerificationError as exc:
        return str(exc.verify_message or _reason(exc)), None
    except ssl.SSLError as exc:
        return _reason(exc), None
    decoded = (server_end if role == "client" else client_end).getpeercert()
    return None, dict(decoded or {})


def _memory_handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done: set[int] = set()
    for _ in range(8):  # TLS 1.3 needs 2 round trips, 1.2 needs 3
        for end in (client, server):
            if id(end) not in done:
                try:
                    end.do_handshake()
                    done.add(id(end))
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if len(done) == 2:
            # With TLS 1.3 the server checks the client's certificate on the
            # client's last flight, which a read makes it process.
            with contextlib.suppress(ssl.SSLWantReadError):
                server.read(1)
            return server, client
    raise ssl.SSLError("in-memory handshake did not finish")


# --------------------------------------------------------------------------- contexts


def client_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext:
    """For tls:// and wss:// clients: TLS 1.2+, the server verified against
    `ca` (the system's CAs when None) and its name, our certificate shown.

    usbipa requires a client certificate; without one the connection is made
    anyway and its refusal explained, since a TLS front end of another kind
    may authenticate otherwise.
    """
    if bool(cert) != bool(key):
        raise CertError("a client certificate needs its key: give both --cert and --key")
    if cert and key:
        check_pair(cert, key, "client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its name
    ctx.minimum_version = MIN_VERSION
    _offload(ctx)
    if ca:
        _load_ca(ctx, ca, "CA file")
    else:
        ctx.load_default_certs()
    if cert and key:
        _load_pair(ctx, cert, key)
    return ctx


def server_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """For usbipa: TLS 1.2+, and every client must present a certificate `client_ca` issued."""
    check_pair(cert, key, "server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    _offload(ctx)
    _load_pair(ctx, cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, client_ca, "client CA file")
    return ctx


def _offload(ctx: ssl.SSLContext) -> None:
    """kTLS where OpenSSL has it (3.0+; the bit means something else before)."""
    if ssl.OPENSSL_VERSION_INFO >= (3, 0):
        ctx.options |= _ENABLE_KTLS


# --------------------------------------------------------------------------- errors

_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "does not trust the CA that issued our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "says our certificate has expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "rejected our certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "rejected our certificate as unsuitable",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "says our certificate was revoked",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "requires a certificate and we showed none",
    "TLSV1_ALERT_PROTOCOL_VERSION": "has no TLS version in common with us (we need 1.2+)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "found no TLS parameters in common with us",
    "TLSV1_ALERT_DECRYPT_ERROR": "could not check our signature (wrong key?)",
}
_LOCAL = {
    "WRONG_VERSION_NUMBER": "does not speak TLS (a plain USB/IP port?)",
    "HTTP_REQUEST": "sent plain HTTP, not TLS",
    "UNEXPECTED_EOF_WHILE_READING": "closed the connection during the TLS handshake",
    "NO_SHARED_CIPHER": "offered no cipher we accept",
    "UNSUPPORTED_PROTOCOL": "offered only TLS versions older than 1.2",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "showed no certificate",
}


def describe(exc: BaseException, role: Role) -> str:
    """One line for a TLS failure, from our point of view as `role`."""
    peer = "server" if role == "client" else "client"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = str(exc.verify_message or _reason(exc)).rstrip(".")
        return f"{peer} certificate not accepted: {why}"
    if isinstance(exc, ssl.SSLError):
        reason = _reason(exc)
        if reason in _ALERTS:
            return f"the {peer} {_ALERTS[reason]}"
        if reason in _LOCAL:
            return f"the {peer} {_LOCAL[reason]}"
        if "ALERT" in reason:
            return f"the {peer} ended the TLS handshake: {reason.lower().replace('_', ' ')}"
        return f"TLS error: {reason}"
    if isinstance(exc, ConnectionResetError):
        return f"the {peer} reset the connection"
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return str(exc) or type(exc).__name__


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc)
