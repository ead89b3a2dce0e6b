"""Target addresses: `host`, `host:port`, `1.2.3.4:3240`, `[2001:db8::7]:3240`, `::1`. Pure."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_PORT = 3240


class AddressError(ValueError):
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
