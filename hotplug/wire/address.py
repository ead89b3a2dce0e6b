"""Addresses, one grammar for all of them. Pure.

Where to connect: `[scheme://]host[:port][/path]` (`parse_address`), read the
same way from a policy target's `address:` and from `usbip-hotplug -r`.
Schemes: tcp (the default), tls, wss. Port 3240 for tcp and tls, 443 for
wss. An IPv6 address goes in brackets (`[2001:db8::7]:3240`), because
`2001:db8::7:3240` is itself a valid address and would silently mean another
host; `-r` also takes a bare IPv6 address without a port (`::1`), which
cannot be misread (`parse_endpoint`).

Where to listen (`parse_listen`, the metrics endpoints): `host:port` with the
port required and 0 allowed (a free one), IPv6 in brackets.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal, cast

from hotplug.errors import HotplugError

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_WSS_PORT",
    "AddressError",
    "Endpoint",
    "Scheme",
    "parse_address",
    "parse_endpoint",
    "parse_listen",
]

DEFAULT_PORT = 3240  # USB/IP's port: tcp:// and tls://
DEFAULT_WSS_PORT = 443  # wss://

Scheme = Literal["tcp", "tls", "wss"]


class AddressError(HotplugError, ValueError):
    pass


@dataclass(frozen=True)
class Endpoint:
    host: str  # IPv6 addresses without brackets
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        """`host:port`, with IPv6 hosts in brackets: `[2001:db8::7]:3240`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_NUMERIC_HOST_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*\.?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


def parse_address(text: str) -> tuple[Scheme, str, int, str | None]:
    """`[scheme://]host[:port][/path]` -> (scheme, host, port, path).

    A path is only allowed (and defaults to "/") for wss. Raises AddressError
    (a ValueError) with a message for the user.
    """
    if not text or any(c.isspace() for c in text):
        raise AddressError(f"expected an address like 'host' or 'host:3240', got {text!r}")
    scheme: Scheme = "tcp"
    rest = text
    m = _SCHEME_RE.fullmatch(text)
    if m:
        given = m.group(1).lower()
        if given not in ("tcp", "tls", "wss"):
            raise AddressError(f"expected tcp://, tls:// or wss://, got '{m.group(1)}://'")
        scheme = cast(Scheme, given)
        rest = m.group(2)
    path: str | None = None
    if "/" in rest:
        rest, _, tail = rest.partition("/")
        path = "/" + tail
        if scheme != "wss":
            raise AddressError(f"a path is only allowed in wss:// addresses, got {text!r}")
        if not _PATH_RE.fullmatch(path):
            raise AddressError(f"expected a URL path like '/usbip', got {path!r}")
    elif scheme == "wss":
        path = "/"
    default_port = DEFAULT_WSS_PORT if scheme == "wss" else DEFAULT_PORT

    port_text: str | None = None
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket:
            raise AddressError(f"expected ']' after the IPv6 address, got {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"expected an IPv6 address inside [], got {host!r}") from None
        if after.startswith(":"):
            port_text = after[1:]
        elif after:
            raise AddressError(f"expected ':PORT' or nothing after ']', got {after!r}")
    elif rest.count(":") >= 2:
        raise AddressError(
            f"an IPv6 address needs brackets: write '[{rest}]' (default port) or "
            f"'[ADDRESS]:PORT', got {rest!r}"
        )
    else:
        host, colon, after = rest.partition(":")
        if colon:
            port_text = after
        if not _valid_host(host):
            raise AddressError(f"expected a host name or IP address, got {host!r}")
    port = default_port
    if port_text is not None:
        if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise AddressError(f"expected a port number 1-65535, got {port_text!r}")
        port = int(port_text)
    return scheme, host, port, path


def _valid_host(host: str) -> bool:
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    if _NUMERIC_HOST_RE.fullmatch(name):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return False
        return True
    return all(_LABEL_RE.fullmatch(label) for label in name.split("."))


def parse_endpoint(text: str) -> Endpoint:
    """A plain TCP `host[:port]` (no scheme) by `parse_address`'s grammar, plus a
    bare IPv6 address without a port (`::1`): with no brackets nothing can
    follow it, so it is no guess."""
    text = text.strip()
    if text.count(":") > 1 and not text.startswith("[") and "://" not in text:
        text = f"[{text}]"
    try:
        scheme, host, port, _ = parse_address(text)
    except AddressError as exc:
        raise AddressError(f"'{text}': {exc}") from None
    if scheme != "tcp":
        raise AddressError(f"'{text}': expected host[:port] without a scheme")
    return Endpoint(host, port)


def _require_ipv6(host: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host.split("%")[0])
    except ValueError as exc:
        raise AddressError(f"'{text}': '{host}' is not an IPv6 address") from exc


def parse_listen(text: str) -> Endpoint:
    """Where a server listens: `host:port`, `[v6]:port`. The port is required (0
    picks a free one); an IPv6 address needs brackets, so `::1:9100` is no guess."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise AddressError(f"'{text}': missing ']' after IPv6 address")
        _require_ipv6(host, text)
        port_text = rest[1:] if rest.startswith(":") else None
    elif text.count(":") > 1:
        raise AddressError(f"'{text}': put an IPv6 address in brackets, e.g. '[::1]:9100'")
    else:
        host, sep, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if sep else None
    if not host:
        raise AddressError(
            f"'{text}': missing host (0.0.0.0 for every IPv4 address, [::] for every address)"
        )
    if port_text is None:
        raise AddressError(f"'{text}': expected host:port, e.g. '127.0.0.1:9100'")
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise AddressError(f"'{text}': port must be a number from 0 to 65535, got '{port_text}'")
    return Endpoint(host, int(port_text))
