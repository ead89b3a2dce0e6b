"""usbipa's configuration and its access decision. Pure: no sockets, no files.

Default deny: a peer is served only if an `allow` entry admits it: by its
address (`from`), and on the TLS and WebSocket listeners by the names in its
verified client certificate (`client`: subject attributes, `san`:
subjectAltName entries). Every key an entry gives must match. The entry may
also limit which devices (vid:pid globs) it may export and how many at once.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from hotplug import yamlnodes
from hotplug.errors import HotplugError
from hotplug.wire.address import DEFAULT_PORT, AddressError, Endpoint, parse_listen
from hotplug.wire.peercert import (
    PatternError,
    PeerCert,
    SanPattern,
    SubjectPattern,
    parse_san_pattern,
    parse_subject_pattern,
)
from hotplug.yamlnodes import MERGE_TAG

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


_P = TypeVar("_P", SubjectPattern, SanPattern)


class ConfigError(HotplugError):
    pass


@dataclass(frozen=True)
class AllowRule:
    networks: tuple[IPNetwork, ...]  # empty = any address (only with clients or sans)
    devices: tuple[str, ...] = ()  # "vvvv:pppp" globs, lower case; empty = any
    max_devices: int | None = None
    clients: tuple[SubjectPattern, ...] = ()  # any one must match the certificate's subject
    sans: tuple[SanPattern, ...] = ()  # any one must match a subjectAltName

    def admits_peer(self, peer: IPAddress, cert: PeerCert | None = None) -> bool:
        if self.networks and not any(
            peer.version == net.version and peer in net for net in self.networks
        ):
            return False
        if self.clients and not (cert and any(p.matches(cert) for p in self.clients)):
            return False
        return not self.sans or bool(cert and any(p.matches(cert) for p in self.sans))

    def admits_address(self, peer: IPAddress) -> bool:
        """Whether some certificate (or none) from `peer` could pass this entry:
        all that is known of a connection before its handshake."""
        return not self.networks or any(
            peer.version == net.version and peer in net for net in self.networks
        )

    def admits_device(self, vendor: int, product: int) -> bool:
        if not self.devices:
            return True
        ident = f"{vendor:04x}:{product:04x}"
        return any(fnmatch.fnmatchcase(ident, pattern) for pattern in self.devices)


@dataclass(frozen=True)
class Limits:
    control_timeout: float = 10.0  # whole control phase of one connection
    # Concurrent control connections per address: a device side that coldplugs
    # a lab's worth of devices opens one per device at once (bench/burst.py).
    per_peer_connections: int = 64
    # The same per network prefix (/24 for IPv4, /64 for IPv6): one host has
    # many addresses of its prefix to open connections from.
    per_prefix_connections: int = 128
    max_connections: int = 1024
    # A port whose device has not been enumerated this long after attach is detached.
    enumeration_timeout: float = 30.0


@dataclass(frozen=True)
class TlsServer:
    """With TLS, `port` speaks TLS only, and every client must show a certificate."""

    cert: str
    key: str
    client_ca: str


@dataclass(frozen=True)
class WssListener:
    """A second listener (needs `tls`): USB/IP in binary WebSocket frames at `path`."""

    port: int = 443
    path: str = "/"


@dataclass(frozen=True)
class AppdConfig:
    listen: tuple[str, ...] = ("0.0.0.0", "::")
    port: int = DEFAULT_PORT
    allow: tuple[AllowRule, ...] = ()
    limits: Limits = field(default_factory=Limits)
    state_dir: str | None = None
    tls: TlsServer | None = None
    wss: WssListener | None = None
    metrics_listen: Endpoint | None = None  # where to serve Prometheus metrics; None: off


def peer_address(host: str) -> IPAddress:
    """The peer's address, with IPv4-mapped IPv6 (::ffff:a.b.c.d) unwrapped."""
    addr = ipaddress.ip_address(host.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def could_admit(config: AppdConfig, peer: IPAddress) -> bool:
    """Whether any allow entry could admit a connection from `peer` (decided at
    accept time: a connection that no entry could admit never gets a slot)."""
    return any(rule.admits_address(peer) for rule in config.allow)


def admitted_by_address(config: AppdConfig, peer: IPAddress) -> bool:
    """Whether an entry admits `peer` by its address alone (no certificate asked)."""
    return any(
        rule.networks and not (rule.clients or rule.sans) and rule.admits_peer(peer)
        for rule in config.allow
    )


def prefix_of(peer: IPAddress) -> str:
    """The network a host usually has all of: its /24 (IPv4) or /64 (IPv6)."""
    length = 24 if peer.version == 4 else 64
    return str(ipaddress.ip_network(f"{peer}/{length}", strict=False))


def authorize_peer(config: AppdConfig, peer: IPAddress, cert: PeerCert | None = None) -> str | None:
    """None if some allow entry admits this peer (any device), else why not.

    What a request that touches no device of its own needs (UNEXPORT)."""
    if any(rule.admits_peer(peer, cert) for rule in config.allow):
        return None
    if cert is not None:
        return f"client {cert.name} (from {peer}) not in any allow entry"
    return "peer not in any allow list"


def authorize(
    config: AppdConfig,
    peer: IPAddress,
    vendor: int,
    product: int,
    exported_now: int,
    cert: PeerCert | None = None,
) -> str | None:
    """None if the peer may export this device now, else the reason for refusing."""
    peer_rules = [rule for rule in config.allow if rule.admits_peer(peer, cert)]
    if not peer_rules:
        if cert is not None:
            return f"client {cert.name} (from {peer}) not in any allow entry"
        return "peer not in any allow list"
    for rule in peer_rules:
        if not rule.admits_device(vendor, product):
            continue
        if rule.max_devices is not None and exported_now >= rule.max_devices:
            return f"peer already exports {exported_now} devices (max_devices {rule.max_devices})"
        return None
    return f"device {vendor:04x}:{product:04x} not allowed for this peer"


def parse_network(text: str, where: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise ConfigError(f"{where}: expected an address or CIDR network, got {text!r}") from exc


def parse_device_pattern(text: str, where: str) -> str:
    vendor, sep, product = text.strip().lower().partition(":")

    def ok(part: str) -> bool:
        if not part or len(part) > 4 or any(c not in "0123456789abcdef*?" for c in part):
            return False
        return len(part) == 4 or "*" in part

    if not (sep and ok(vendor) and ok(product)):
        raise ConfigError(
            f"{where}: expected vid:pid as 4 hex digits each (globs allowed), got {text!r}"
        )
    return f"{vendor}:{product}"


_TOP_KEYS = {"listen", "port", "allow", "limits", "state_dir", "tls", "wss", "metrics"}
_METRICS_KEYS = {"listen"}
_ALLOW_KEYS = {"from", "client", "san", "devices", "max_devices"}
_TLS_KEYS = {"cert", "key", "client_ca"}
_WSS_KEYS = {"port", "path"}
_LIMIT_KEYS = {
    "control_timeout",
    "per_peer_connections",
    "per_prefix_connections",
    "max_connections",
    "enumeration_timeout",
}


Path_ = tuple[str | int, ...]


class _Where:
    """Says where a value of the file is: `usbipa.yaml:12: allow[0].max_devices`.

    Built from the node tree, so every error names the file, the line of the
    key (or list item) and the key path."""

    def __init__(self, filename: str, root: Node | None) -> None:
        self.filename = filename
        self.lines: dict[Path_, int] = {}
        if root is not None:
            self._walk(root, (), root.start_mark.line + 1)

    def _walk(self, node: Node, path: Path_, line: int) -> None:
        self.lines[path] = line
        if isinstance(node, MappingNode):
            for knode, vnode in node.value:
                if knode.tag == MERGE_TAG:
                    raise ConfigError(
                        f"{self.at(path, knode.start_mark.line + 1)}: YAML merge keys (<<) "
                        "are not supported; repeat the keys"
                    )
                if isinstance(knode, ScalarNode):
                    self._walk(vnode, (*path, knode.value), knode.start_mark.line + 1)
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, (*path, i), item.start_mark.line + 1)

    def at(self, path: Path_, line: int | None = None) -> str:
        if line is None:
            probe = path
            while probe and probe not in self.lines:
                probe = probe[:-1]
            line = self.lines.get(probe)
        where = self.filename if line is None else f"{self.filename}:{line}"
        name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        return f"{where}: {name}" if name else where

    def error(self, path: Path_, message: str) -> ConfigError:
        return ConfigError(f"{self.at(path)}: {message}")


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: _Where, path: Path_) -> None:
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        line = where.lines.get((*path, unknown[0]))
        raise ConfigError(
            f"{where.at(path, line)}: unknown key {unknown[0]!r} "
            f"(expected one of {', '.join(sorted(allowed))})"
        )


def _list_of_str(value: Any, where: _Where, path: Path_) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) or _is_int(item) for item in items):
        raise where.error(path, "expected a string or a list of strings")
    return [str(item) for item in items]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any, where: _Where, path: Path_) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise where.error(path, f"expected a positive number, got {value!r}")
    if not value < float("inf"):
        raise where.error(path, f"expected a finite number, got {value!r}")
    return float(value)


def _count(value: Any, where: _Where, path: Path_) -> int:
    """A whole number of things: `1.5` and `true` are refused, not rounded or read as 1."""
    if not _is_int(value) or value <= 0:
        raise where.error(path, f"expected a positive whole number, got {value!r}")
    return int(value)


def _port(value: Any, where: _Where, path: Path_, low: int = 1) -> int:
    # bool is an int in Python: `port: true` would listen on port 1.
    if not _is_int(value) or not low <= value < 65536:
        raise where.error(path, f"expected {low}..65535, got {value!r}")
    return int(value)


def _load(text: str, filename: str) -> tuple[Any, _Where]:
    try:
        root = yamlnodes.compose(text)
        where = _Where(filename, root)  # before constructing, which flattens merges
        data = None if root is None else SafeConstructor().construct_document(root)
    except yamlnodes.YamlRefused as exc:
        line = "" if exc.line is None else f":{exc.line}"
        raise ConfigError(f"{filename}{line}: {exc.message}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{filename}{line}: YAML syntax error: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{filename}: YAML syntax error: nested too deeply") from exc
    return data, where


def parse_config(text: str, filename: str) -> AppdConfig:
    data, where = _load(text, filename)
    if data is None:
        return AppdConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"{where.at(())}: expected a mapping at the top level")
    _check_keys(data, _TOP_KEYS, where, ())
    kwargs: dict[str, Any] = {}
    if "listen" in data:
        kwargs["listen"] = tuple(_list_of_str(data["listen"], where, ("listen",)))
    if "port" in data:
        kwargs["port"] = _port(data["port"], where, ("port",))
    kwargs["allow"] = tuple(_parse_allow(data.get("allow") or [], where))
    kwargs["limits"] = _parse_limits(data.get("limits") or {}, where)
    if "state_dir" in data:
        state_dir = data["state_dir"]
        if not isinstance(state_dir, str) or not state_dir.startswith("/"):
            raise where.error(
                ("state_dir",), f"expected an absolute directory path, got {state_dir!r}"
            )
        kwargs["state_dir"] = state_dir
    if data.get("tls") is not None:
        kwargs["tls"] = _parse_tls(data["tls"], where)
    if data.get("wss") is not None:
        kwargs["wss"] = _parse_wss(data["wss"], where)
    if data.get("metrics") is not None:
        kwargs["metrics_listen"] = _parse_metrics(data["metrics"], where)
    return AppdConfig(**kwargs)


def _parse_allow(allow: Any, where: _Where) -> list[AllowRule]:
    if not isinstance(allow, list):
        raise where.error(("allow",), "expected a list of entries")
    rules = []
    for i, entry in enumerate(allow):
        path: Path_ = ("allow", i)
        if not isinstance(entry, dict):
            raise where.error(path, "expected a mapping with 'from', 'client' or 'san'")
        _check_keys(entry, _ALLOW_KEYS, where, path)
        if not {"from", "client", "san"} & set(entry):
            raise where.error(
                path,
                "missing 'from' (address or CIDR network), 'client' (certificate "
                "subject, e.g. 'CN=lab-1') or 'san' (e.g. 'DNS:lab-1.example.net')",
            )

        def strings(key: str, path: Path_ = path, entry: dict[str, Any] = entry) -> list[str]:
            return _list_of_str(entry.get(key, []), where, (*path, key))

        networks = tuple(parse_network(n, where.at((*path, "from"))) for n in strings("from"))
        clients = tuple(
            _pattern(parse_subject_pattern, c, where.at((*path, "client")))
            for c in strings("client")
        )
        sans = tuple(
            _pattern(parse_san_pattern, c, where.at((*path, "san"))) for c in strings("san")
        )
        if not (networks or clients or sans):
            raise where.error(path, "'from', 'client' and 'san' are all empty")
        devices = tuple(
            parse_device_pattern(d, where.at((*path, "devices"))) for d in strings("devices")
        )
        max_devices = entry.get("max_devices")
        if max_devices is not None:
            max_devices = _count(max_devices, where, (*path, "max_devices"))
        rules.append(AllowRule(networks, devices, max_devices, clients, sans))
    return rules


def _parse_limits(limits: Any, where: _Where) -> Limits:
    if not isinstance(limits, dict):
        raise where.error(("limits",), "expected a mapping")
    _check_keys(limits, _LIMIT_KEYS, where, ("limits",))

    def seconds(key: str) -> float:
        return _positive(limits.get(key, getattr(Limits, key)), where, ("limits", key))

    def count(key: str) -> int:
        return _count(limits.get(key, getattr(Limits, key)), where, ("limits", key))

    return Limits(
        control_timeout=seconds("control_timeout"),
        per_peer_connections=count("per_peer_connections"),
        per_prefix_connections=count("per_prefix_connections"),
        max_connections=count("max_connections"),
        enumeration_timeout=seconds("enumeration_timeout"),
    )


def _parse_metrics(data: Any, where: _Where) -> Endpoint | None:
    if not isinstance(data, dict):
        raise where.error(("metrics",), "expected a mapping with listen")
    _check_keys(data, _METRICS_KEYS, where, ("metrics",))
    if data.get("listen") is None:
        return None
    if not isinstance(data["listen"], str):
        raise where.error(("metrics", "listen"), "expected host:port, e.g. '127.0.0.1:9101'")
    try:
        return parse_listen(data["listen"])
    except AddressError as exc:
        raise where.error(("metrics", "listen"), str(exc)) from None


def _pattern(parse: Callable[[str], _P], text: str, where: str) -> _P:
    try:
        return parse(text)
    except PatternError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _parse_tls(data: Any, where: _Where) -> TlsServer:
    if not isinstance(data, dict):
        raise where.error(("tls",), "expected a mapping with cert, key, client_ca")
    _check_keys(data, _TLS_KEYS, where, ("tls",))
    for key in ("cert", "key", "client_ca"):
        if key not in data:
            raise where.error(("tls",), f"missing '{key}' (a PEM file path)")
        if not isinstance(data[key], str) or not data[key]:
            raise where.error(("tls", key), f"expected a PEM file path, got {data[key]!r}")
    return TlsServer(data["cert"], data["key"], data["client_ca"])


def _parse_wss(data: Any, where: _Where) -> WssListener:
    if not isinstance(data, dict):
        raise where.error(("wss",), "expected a mapping with port and path")
    _check_keys(data, _WSS_KEYS, where, ("wss",))
    port = _port(data.get("port", WssListener.port), where, ("wss", "port"), low=0)
    path = parse_wss_path(data.get("path", WssListener.path), where.at(("wss", "path")))
    return WssListener(port, path)


def parse_wss_path(path: Any, where: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " ?#"):
        raise ConfigError(f"{where}: expected a URL path like '/usbip', got {path!r}")
    return path


def _check_secure(config: AppdConfig, where: str) -> None:
    if config.wss is not None and config.tls is None:
        raise ConfigError(
            f"{where}: wss needs tls (cert, key, client_ca): the WebSocket listener is TLS only"
        )
    if config.tls is None and any(r.clients or r.sans for r in config.allow):
        raise ConfigError(
            f"{where}: allow entries with 'client' or 'san' need tls (cert, key, client_ca): "
            "without TLS no client shows a certificate"
        )


def with_cli(
    config: AppdConfig,
    listen: Sequence[str],
    port: int | None,
    allow: Sequence[str],
    devices: Sequence[str],
    *,
    allow_clients: Sequence[str] = (),
    tls: tuple[str | None, str | None, str | None] = (None, None, None),
    wss_port: int | None = None,
    wss_path: str | None = None,
    metrics_listen: Endpoint | None = None,
) -> AppdConfig:
    """Command-line flags add to (allow) or override (listen, port, tls, wss) the file's.

    `tls` is (--tls-cert, --tls-key, --tls-client-ca): all three or none.
    """
    rules = list(config.allow)
    pats = tuple(parse_device_pattern(d, "--device") for d in devices)
    if allow:
        rules.append(AllowRule(tuple(parse_network(a, "--allow") for a in allow), pats))
    if allow_clients:
        subjects = tuple(
            _pattern(parse_subject_pattern, c, "--allow-client") for c in allow_clients
        )
        rules.append(AllowRule((), pats, clients=subjects))
    if devices and not (allow or allow_clients):
        raise ConfigError(
            "--device limits the peers given with --allow or --allow-client; give one too"
        )
    server = config.tls
    if any(tls):
        if not all(tls):
            raise ConfigError("--tls-cert, --tls-key and --tls-client-ca go together")
        server = TlsServer(*tls)  # type: ignore[arg-type]
    wss = config.wss
    if wss_port is not None or wss_path is not None:
        base = wss or WssListener()
        wss = WssListener(
            wss_port if wss_port is not None else base.port,
            parse_wss_path(wss_path, "--wss-path") if wss_path is not None else base.path,
        )
    result = AppdConfig(
        listen=tuple(listen) or config.listen,
        port=port if port is not None else config.port,
        allow=tuple(rules),
        limits=config.limits,
        state_dir=config.state_dir,
        tls=server,
        wss=wss,
        metrics_listen=metrics_listen or config.metrics_listen,
    )
    _check_secure(result, "configuration")
    return result
