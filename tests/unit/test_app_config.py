"""usbipa's config file as untrusted input: issue 12, findings 12 and 15."""

from __future__ import annotations

import ipaddress
import time

import pytest

from hotplug.app.config import AllowRule, AppdConfig, ConfigError, authorize, parse_config
from hotplug.yamlnodes import MAX_FILE_BYTES


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "usbipa.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port: true\n", "usbipa.yaml:1: port: expected 1..65535, got True"),
        ("port: 3240.5\n", "usbipa.yaml:1: port: expected 1..65535, got 3240.5"),
        (
            "allow:\n  - from: 10.0.0.0/8\n    max_devices: 1.5\n",
            "usbipa.yaml:3: allow[0].max_devices: expected a positive whole number, got 1.5",
        ),
        (
            "allow:\n  - from: 10.0.0.0/8\n    max_devices: true\n",
            "usbipa.yaml:3: allow[0].max_devices: expected a positive whole number, got True",
        ),
        (
            "state_dir: [a, b]\n",
            "usbipa.yaml:1: state_dir: expected an absolute directory path, got ['a', 'b']",
        ),
        (
            "limits:\n  control_timeout: 2\n  max_connections: 2.5\n",
            "usbipa.yaml:3: limits.max_connections: expected a positive whole number, got 2.5",
        ),
        (
            "tls: {cert: /a, key: /b, client_ca: /c}\nwss:\n  port: false\n",
            "usbipa.yaml:3: wss.port: expected 0..65535, got False",
        ),
        (
            "tls:\n  cert: /a\n  key: [/b]\n  client_ca: /c\n",
            "usbipa.yaml:3: tls.key: expected a PEM file path, got ['/b']",
        ),
        (
            "allow:\n  - from: 10.0.0.0/8\n  - form: 10.0.0.0/8\n",
            "usbipa.yaml:3: allow[1]: unknown key 'form' (expected one of client, devices, "
            "from, max_devices, san)",
        ),
    ],
)
def test_wrong_types_are_file_line_errors_naming_the_field(text: str, message: str) -> None:
    """Issue 12, finding 15: `port: true` listened on port 1, `max_devices: 1.5` and
    `state_dir: [a, b]` were taken; each is now an error with file:line and the field."""
    assert config_error(text) == message


def test_anchors_and_aliases_are_refused_with_file_and_line() -> None:
    """Issue 12, finding 12: no anchors or aliases in usbipa's config either."""
    entry = "  - &e {from: 10.0.0.0/8, devices: [" + ", ".join(["'1d6b:*'"] * 200) + "]}\n"
    started = time.process_time()
    assert config_error("allow:\n" + entry + "  - *e\n" * 2000) == (
        "usbipa.yaml:2: YAML anchors (&e) are not supported; write the value out where it is used"
    )
    assert time.process_time() - started < 2.0
    assert config_error("limits: {control_timeout: 2}\nport: *p\n") == (
        "usbipa.yaml:2: YAML aliases (*p) are not supported; write the value out"
    )


def test_merge_keys_are_refused_with_file_and_line() -> None:
    """Issue 12, finding 12: merges are refused in usbipa's config as in the policy."""
    assert config_error("limits:\n  <<: {control_timeout: 2}\n") == (
        "usbipa.yaml:2: limits: YAML merge keys (<<) are not supported; repeat the keys"
    )


def test_an_oversized_config_is_refused() -> None:
    """Issue 12, finding 12: a config over 1 MiB is refused before it is parsed."""
    assert config_error("#" * MAX_FILE_BYTES + "\nport: 1\n") == (
        "usbipa.yaml: file too large: more than 1 MiB (1,048,576 bytes), the limit"
    )


def test_the_shipped_example_still_parses() -> None:
    config = parse_config(
        "listen: [127.0.0.1]\nport: 3241\nstate_dir: /run/usbipa\n"
        "allow:\n  - from: 10.0.0.0/8\n    max_devices: 2\nlimits: {control_timeout: 2.5}\n",
        "usbipa.yaml",
    )
    assert config.port == 3241 and config.allow[0].max_devices == 2
    assert config.state_dir == "/run/usbipa" and config.limits.control_timeout == 2.5


def rule(*nets: str, devices: tuple[str, ...] = (), max_devices: int | None = None) -> AllowRule:
    return AllowRule(tuple(ipaddress.ip_network(n) for n in nets), devices, max_devices)


def test_authorize_default_deny() -> None:
    assert authorize(AppdConfig(), ipaddress.ip_address("127.0.0.1"), 1, 2, 0) == (
        "peer not in any allow list"
    )


def test_authorize_devices_and_limits() -> None:
    config = AppdConfig(allow=(rule("10.0.0.0/8", devices=("0781:*",), max_devices=1),))
    peer = ipaddress.ip_address("10.1.2.3")
    assert authorize(config, peer, 0x0781, 0x5567, 0) is None
    assert "not allowed" in (authorize(config, peer, 0x1234, 0x5678, 0) or "")
    assert "max_devices 1" in (authorize(config, peer, 0x0781, 0x5567, 1) or "")
    assert authorize(config, ipaddress.ip_address("::1"), 0x0781, 0x5567, 0) is not None


def test_parse_config_full() -> None:
    config = parse_config(
        "listen: [127.0.0.1]\nport: 3241\nallow:\n  - from: [127.0.0.0/8, '::1']\n"
        "    devices: ['1d6b:*']\n    max_devices: 2\nlimits: {control_timeout: 2}\n",
        "usbipa.yaml",
    )
    assert config.listen == ("127.0.0.1",) and config.port == 3241
    assert config.allow[0].max_devices == 2 and config.limits.control_timeout == 2.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("allow:\n  - form: 10.0.0.0/8\n", "allow[0]: unknown key 'form'"),
        ("allow:\n  - from: 10.0.0.300/8\n", "expected an address or CIDR network"),
        ("allow:\n  - from: 10.0.0.0/8\n    devices: [zz]\n", "expected vid:pid"),
        ("port: 0\n", "port: expected 1..65535"),
        ("listen: [\n", "usbipa.yaml:2: YAML syntax error"),
        ("limits: {control_timeout: -1}\n", "expected a positive number"),
    ],
)
def test_parse_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(text, "usbipa.yaml")
