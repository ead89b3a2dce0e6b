"""wire/address.py: one grammar for where to connect (`-r`, a policy target's address)."""

from __future__ import annotations

import pytest

from hotplug.wire.address import AddressError, Endpoint, parse_endpoint


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host", Endpoint("host", 3240)),
        ("host:4000", Endpoint("host", 4000)),
        ("192.0.2.1:3240", Endpoint("192.0.2.1", 3240)),
        ("[2001:db8::7]:3241", Endpoint("2001:db8::7", 3241)),
        ("[::1]", Endpoint("::1", 3240)),
        ("::1", Endpoint("::1", 3240)),
        ("fe80::1%eth0", Endpoint("fe80::1%eth0", 3240)),
        ("host.example.", Endpoint("host.example.", 3240)),
    ],
)
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "'': expected an address like 'host' or 'host:3240', got ''"),
        ("a b", "'a b': expected an address like 'host' or 'host:3240', got 'a b'"),
        ("host:99999", "'host:99999': expected a port number 1-65535, got '99999'"),
        ("host:x", "'host:x': expected a port number 1-65535, got 'x'"),
        ("[2001:db8::7", "'[2001:db8::7': expected ']' after the IPv6 address"),
        ("[nothex]:1", "'[nothex]:1': expected an IPv6 address inside [], got 'nothex'"),
        ("2001:db8::zz", "'[2001:db8::zz]': expected an IPv6 address inside []"),
        (":3240", "':3240': expected a host name or IP address, got ''"),
        ("tls://host", "'tls://host': expected host[:port] without a scheme"),
    ],
)
def test_parse_endpoint_errors(text: str, message: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_endpoint(text)
    assert str(info.value).startswith(message)


def test_endpoint_str_brackets_ipv6() -> None:
    assert str(Endpoint("2001:db8::7", 3240)) == "[2001:db8::7]:3240"
