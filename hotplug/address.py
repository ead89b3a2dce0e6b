"""Target addresses: `host`, `host:port`, `1.2.3.4:3240`, `[2001:db8::7]:3240`, `::1`. Pure."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hotplug.errors import HotplugError

DEFAULT_PORT = 3240


class AddressError(HotplugError, ValueError):
    pass


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> Endpoint:
    text = text.strip()
    if not text:
        raise AddressError("empty address: expected host[:port]")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise AddressError(f"'{text}': missing ']' after IPv6 address")
        _require_ipv6(host, text)
        if not rest:
            return Endpoint(host, default_port)
        if not rest.startswith(":"):
            raise AddressError(f"'{text}': expected ':port' after ']'")
        return Endpoint(host, _port(rest[1:], text))
    if text.count(":") > 1:
        # A bare IPv6 address: a port can only be given with brackets.
        _require_ipv6(text, text)
        return Endpoint(text, default_port)
    host, sep, port_text = text.partition(":")
    if not host:
        raise AddressError(f"'{text}': missing host")
    if sep:
        return Endpoint(host, _port(port_text, text))
    return Endpoint(host, default_port)


def _require_ipv6(host: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host.split("%")[0])
    except ValueError as exc:
        raise AddressError(f"'{text}': '{host}' is not an IPv6 address") from exc


def _port(port_text: str, text: str) -> int:
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AddressError(f"'{text}': port must be a number from 1 to 65535, got '{port_text}'")
    return int(port_text)


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
