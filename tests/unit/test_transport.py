"""Remote addresses, proxies and the usbipa side's TLS configuration. Pure: no sockets."""

from __future__ import annotations

import ipaddress

import pytest

from hotplug.app.config import (
    AllowRule,
    AppdConfig,
    ConfigError,
    TlsServer,
    WssListener,
    authorize,
    parse_config,
    with_cli,
)
from hotplug.device.policy.model import Target, TlsOptions
from hotplug.device.transport import (
    Remote,
    bypasses_proxy,
    parse_proxy,
    parse_remote,
    remote_for_target,
    resolve_proxy,
)
from hotplug.wire.address import AddressError, Endpoint
from hotplug.wire.peercert import (
    PatternError,
    PeerCert,
    parse_san_pattern,
    parse_subject_pattern,
)

NO_ENV: dict[str, str] = {}


# --------------------------------------------------------------------------- remotes


def test_plain_remote_is_what_it_always_was() -> None:
    remote = parse_remote("apps.example.net", env=NO_ENV)
    assert remote == Remote("tcp", "apps.example.net", 3240)
    assert not remote.secure and remote.endpoint == Endpoint("apps.example.net", 3240)
    assert str(parse_remote("[2001:db8::7]:3241", env=NO_ENV)) == "[2001:db8::7]:3241"
    assert str(parse_remote("::1", env=NO_ENV)) == "[::1]:3240"


def test_tls_and_wss_remotes() -> None:
    tls = parse_remote("tls://apps.example.net", cert="c.crt", key="c.key", env=NO_ENV)
    assert (tls.scheme, tls.port, tls.path) == ("tls", 3240, None)
    assert tls.tls is not None and tls.tls.cert is not None and tls.tls.cert.endswith("/c.crt")
    assert tls.tls.ca is None
    assert str(tls) == "tls://apps.example.net:3240"
    wss = parse_remote("wss://[2001:db8::7]/usbip", env=NO_ENV)
    assert (wss.host, wss.port, wss.path) == ("2001:db8::7", 443, "/usbip")
    assert str(wss) == "wss://[2001:db8::7]:443/usbip"
    assert str(parse_remote("wss://h:8443", env=NO_ENV)) == "wss://h:8443/"


def test_remote_json_round_trip() -> None:
    remote = parse_remote(
        "wss://h/p", cert="/c", key="/k", ca="/a", proxy="http://p:3128", env=NO_ENV
    )
    assert Remote.from_json(remote.to_json()) == remote


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        ("h:3240", {"cert": "c"}, "--cert applies to tls:// and wss:// remotes, not to plain"),
        ("h", {"proxy": "http://p:1"}, "--proxy needs a tls:// or wss:// remote"),
        ("tls://h/x", {}, "a path is only allowed in wss:// addresses"),
        ("ftp://h", {}, "expected tcp://, tls:// or wss://"),
        ("tls://h:99999", {}, "expected a port number 1-65535"),
        ("wss://h", {"proxy": "https://p:1"}, "only http:// proxies (HTTP CONNECT)"),
        ("wss://h", {"proxy": "http://p"}, "expected http://HOST:PORT"),
    ],
)
def test_remote_errors(text: str, flags: dict[str, str], message: str) -> None:
    with pytest.raises(AddressError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_remote(text, env=NO_ENV, **flags)


def test_remote_for_policy_target() -> None:
    opts = TlsOptions("/etc/c.crt", "/etc/c.key", "/etc/ca.crt")
    target = Target("lab", "apps.example.net", 443, scheme="wss", path="/u", tls=opts)
    env = {"https_proxy": "http://proxy:3128"}
    assert remote_for_target(target, env) == Remote(
        "wss", "apps.example.net", 443, "/u", opts, "http://proxy:3128"
    )
    plain = Target("lab", "apps.example.net", 3240)
    assert remote_for_target(plain, env) == Remote("tcp", "apps.example.net", 3240)


# --------------------------------------------------------------------------- proxies


def test_proxy_parsing() -> None:
    assert parse_proxy("http://u%40x:p%3A@proxy.lan:3128") == parse_proxy(
        "http://u%40x:p%3A@proxy.lan:3128/"
    )
    proxy = parse_proxy("http://u%40x:p%3A@proxy.lan:3128")
    assert (proxy.host, proxy.port, proxy.user, proxy.password) == ("proxy.lan", 3128, "u@x", "p:")
    assert str(parse_proxy("[::1]:8080")) == "http://[::1]:8080"


def test_proxy_from_environment() -> None:
    env = {"HTTPS_PROXY": "proxy.lan:3128", "no_proxy": "localhost,.internal,10.0.0.1:3240"}
    assert resolve_proxy(None, "apps.example.net", env) == "http://proxy.lan:3128"
    assert resolve_proxy(None, "a.internal", env) is None
    assert resolve_proxy(None, "10.0.0.1", env) is None
    assert resolve_proxy("http://other:1", "a.internal", env) == "http://other:1"
    assert resolve_proxy(None, "apps.example.net", {}) is None


@pytest.mark.parametrize(
    ("host", "no_proxy", "bypass"),
    [
        ("a.example.net", "example.net", True),
        ("a.example.net", ".example.net", True),
        ("badexample.net", "example.net", False),
        ("anything", "*", True),
        ("::1", "[::1]:443", True),
        ("h", "", False),
    ],
)
def test_no_proxy(host: str, no_proxy: str, bypass: bool) -> None:
    assert bypasses_proxy(host, no_proxy) is bypass


# --------------------------------------------------------------------------- certificate names


LAB1 = PeerCert.from_ssl(
    {
        "subject": ((("commonName", "lab-1"),), (("organizationName", "Example"),)),
        "subjectAltName": (("DNS", "Lab-1.Example.NET"), ("IP Address", "2001:DB8:0:0:0:0:0:7\n")),
    }
)


def test_peer_cert_names() -> None:
    assert LAB1.name == "CN=lab-1,O=Example"
    assert LAB1.san == (("DNS", "lab-1.example.net"), ("IP", "2001:db8::7"))


@pytest.mark.parametrize(
    ("pattern", "matches"),
    [("CN=lab-1", True), ("cn=lab-*", True), ("CN=lab-1, O=Example", True), ("CN=lab-2", False),
     ("O=Other,CN=lab-1", False)],
)  # fmt: skip
def test_subject_patterns(pattern: str, matches: bool) -> None:
    assert parse_subject_pattern(pattern).matches(LAB1) is matches


@pytest.mark.parametrize(
    ("pattern", "matches"),
    [("lab-1.example.net", True), ("DNS:*.example.net", True), ("IP:2001:db8::7", True),
     ("IP:192.0.2.1", False), ("URI:spiffe://x", False)],
)  # fmt: skip
def test_san_patterns(pattern: str, matches: bool) -> None:
    assert parse_san_pattern(pattern).matches(LAB1) is matches


def test_bad_subject_patterns() -> None:
    with pytest.raises(PatternError, match="unknown attribute 'XX'"):
        parse_subject_pattern("XX=1")
    with pytest.raises(PatternError, match="expected ATTR=VALUE"):
        parse_subject_pattern("lab-1")


# --------------------------------------------------------------------------- usbipa config


def test_config_tls_wss_and_client_rules() -> None:
    config = with_cli(
        parse_config(
            "tls: {cert: /s.crt, key: /s.key, client_ca: /ca.crt}\n"
            "wss: {port: 8443, path: /usbip}\n"
            "allow:\n"
            "  - client: ['CN=lab-1', 'CN=lab-2']\n"
            "    devices: ['1d6b:*']\n"
            "  - san: 'DNS:*.lab.example'\n"
            "    from: 192.0.2.0/24\n",
            "usbipa.yaml",
        ),
        [],
        None,
        [],
        [],
    )
    assert config.tls == TlsServer("/s.crt", "/s.key", "/ca.crt")
    assert config.wss == WssListener(8443, "/usbip")
    lab1 = PeerCert((("CN", "lab-1"),))
    host = ipaddress.ip_address("198.51.100.1")
    assert authorize(config, host, 0x1D6B, 1, 0, lab1) is None
    assert authorize(config, host, 0x0781, 1, 0, lab1) == (
        "device 0781:0001 not allowed for this peer"
    )
    stranger = PeerCert((("CN", "lab-9"),), (("DNS", "x.lab.example"),))
    assert authorize(config, host, 0x1D6B, 1, 0, stranger) == (
        "client CN=lab-9 (from 198.51.100.1) not in any allow entry"
    )
    inside = ipaddress.ip_address("192.0.2.5")
    assert authorize(config, inside, 0x1D6B, 1, 0, stranger) is None
    # Without a certificate (plain TCP), a certificate rule admits nobody.
    assert authorize(config, inside, 0x1D6B, 1, 0) == "peer not in any allow list"


def test_cli_tls_flags() -> None:
    config = with_cli(
        AppdConfig(),
        ["127.0.0.1"],
        3241,
        [],
        ["1d6b:*"],
        allow_clients=["CN=lab-1"],
        tls=("/s.crt", "/s.key", "/ca.crt"),
        wss_port=0,
        wss_path="/u",
    )
    assert config.tls == TlsServer("/s.crt", "/s.key", "/ca.crt")
    assert config.wss == WssListener(0, "/u")
    (rule,) = config.allow
    assert rule.networks == () and rule.devices == ("1d6b:*",)
    assert [p.text for p in rule.clients] == ["CN=lab-1"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wss: {port: 443}\n", "wss needs tls"),
        ("allow: [{client: 'CN=x'}]\n", "need tls"),
        ("tls: {cert: /a, key: /b}\n", "missing 'client_ca'"),
        ("tls: {cert: /a, key: /b, client_ca: /c, ca: /d}\n", "unknown key 'ca'"),
        ("tls: {cert: /a, key: /b, client_ca: /c}\nwss: {path: usbip}\n", "expected a URL path"),
        ("tls: {cert: /a, key: /b, client_ca: /c}\nallow: [{client: 'QQ=1'}]\n", "unknown attr"),
        ("allow: [{devices: ['1d6b:*']}]\n", "missing 'from'"),
    ],
)
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        with_cli(parse_config(text, "usbipa.yaml"), [], None, [], [])


def test_cli_tls_flags_go_together() -> None:
    with pytest.raises(ConfigError, match="go together"):
        with_cli(AppdConfig(), [], None, [], [], tls=("/s.crt", None, None))


def test_old_allow_rules_still_match_by_address() -> None:
    rule = AllowRule((ipaddress.ip_network("10.0.0.0/8"),))
    assert rule.admits_peer(ipaddress.ip_address("10.1.2.3"))
    assert rule.admits_peer(ipaddress.ip_address("10.1.2.3"), PeerCert((("CN", "any"),)))
