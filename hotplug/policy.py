"""The device-side policy: which USB device is exported to which target.

Rules of this file:
- Everything above the "I/O edge" line at the bottom is pure: text in,
  `Policy` out (`parse_policy`); `Device` in, `Decision` out
  (`Policy.decide`). No file, socket, clock or randomness; no logging.
- `load_policy` is the one function that reads files. It finds the policy
  files, reads them and hands (name, text) pairs to `parse_policy`.
- A policy is all-or-nothing: any problem raises `PolicyError` (or
  `PolicyErrors`, which holds every problem found, first one first), and the
  caller keeps the policy it had. Each error names the file, the 1-based line
  and the key path (`rules[0].match.vendor`; list indexes count from 0), and
  says what was expected and what was found.
- Unknown keys are errors, never ignored: a typo must not silently export a
  device, or silently stop exporting one.

Policy files: `/etc/usbip-hotplug/policy.yaml`, then
`/etc/usbip-hotplug/policy.d/*.yaml` in file-name order. Targets are merged by
name (a name may be defined once across all files), rules are concatenated in
file order (first match wins), `settings` may appear in one file only.
"""

from __future__ import annotations

import fnmatch
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, cast

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from hotplug import yamlnodes
from hotplug.usb import Device
from hotplug.wire.address import AddressError, Endpoint, Scheme, parse_address, parse_listen
from hotplug.yamlnodes import (
    INT,
    NULL,
    LocatedError,
    NodeReader,
    closest,
    describe_node,
    join_key,
    line_of,
    suggest,
)

__all__ = [
    "DEFAULT_CONFIG_DIR",
    "USB_CLASSES",
    "Condition",
    "Decision",
    "Policy",
    "PolicyError",
    "PolicyErrors",
    "RetryPolicy",
    "Rule",
    "Settings",
    "Target",
    "TlsOptions",
    "load_policy",
    "parse_policy",
]

DEFAULT_CONFIG_DIR = Path("/etc/usbip-hotplug")
MAIN_FILE = "policy.yaml"
DROPIN_DIR = "policy.d"
SUPPORTED_VERSION = 1
Action = Literal["export", "ignore"]

# USB-IF base class codes by name. Names are matched case-insensitively, with
# '-' and ' ' treated as '_'. The first name listed for a code is the one shown.
USB_CLASSES: Mapping[str, int] = MappingProxyType(
    {
        "per_interface": 0x00,
        "audio": 0x01,
        "comm": 0x02,
        "cdc": 0x02,
        "communications": 0x02,
        "hid": 0x03,
        "physical": 0x05,
        "image": 0x06,
        "still_image": 0x06,
        "printer": 0x07,
        "mass_storage": 0x08,
        "storage": 0x08,
        "hub": 0x09,
        "cdc_data": 0x0A,
        "smart_card": 0x0B,
        "smartcard": 0x0B,
        "content_security": 0x0D,
        "video": 0x0E,
        "personal_healthcare": 0x0F,
        "audio_video": 0x10,
        "billboard": 0x11,
        "type_c_bridge": 0x12,
        "bulk_display": 0x13,
        "mctp": 0x14,
        "i3c": 0x3C,
        "diagnostic": 0xDC,
        "wireless": 0xE0,
        "wireless_controller": 0xE0,
        "misc": 0xEF,
        "miscellaneous": 0xEF,
        "application": 0xFE,
        "application_specific": 0xFE,
        "vendor": 0xFF,
        "vendor_specific": 0xFF,
    }
)
_CLASS_DISPLAY: dict[int, str] = {}
for _name, _code in USB_CLASSES.items():
    _CLASS_DISPLAY.setdefault(_code, _name)


# --------------------------------------------------------------------------
# Errors


class PolicyError(LocatedError):
    """One problem in a policy, located by file, line (1-based) and key path
    (`rules[0].match.vendor`; list indexes count from 0): see `LocatedError`."""


class PolicyErrors(PolicyError):
    """Several problems; `errors` holds them all, in file and line order.

    The `file`, `line`, `key` and `message` attributes are the first error's,
    so code that handles a single `PolicyError` still works. str() is one
    error per line.
    """

    def __init__(self, errors: Sequence[PolicyError]) -> None:
        if not errors:
            raise ValueError("PolicyErrors needs at least one error")
        first = errors[0]
        super().__init__(first.file, first.line, first.key, first.message)
        self.errors: tuple[PolicyError, ...] = tuple(errors)
        self.args = (self.errors,)

    def __str__(self) -> str:
        return "\n".join(PolicyError.__str__(e) for e in self.errors)


# --------------------------------------------------------------------------
# The policy as data


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait between attempts to export to one target."""

    initial: float = 1.0  # seconds before the first retry
    max: float = 60.0  # no wait is longer than this
    factor: float = 2.0  # each wait is this many times the previous one
    jitter: float = 0.1  # each wait is shortened by up to this fraction

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds to wait before retry number `attempt` (1 = the first retry).

        The nominal wait is `initial * factor ** (attempt - 1)`, capped at
        `max`. Jitter then shortens it by `jitter * rand`: rand 0 gives the
        nominal wait, rand 1 gives `nominal * (1 - jitter)`. Waits therefore
        never exceed `max`, and devices that failed together spread out.
        `rand` (in [0, 1]) comes from the caller, e.g. `random.random()`.
        """
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        if not 0.0 <= rand <= 1.0:
            raise ValueError(f"rand must be in [0, 1], got {rand}")
        try:
            nominal = self.initial * self.factor ** (attempt - 1)
        except OverflowError:
            nominal = self.max
        return min(nominal, self.max) * (1.0 - self.jitter * rand)


@dataclass(frozen=True)
class TlsOptions:
    """Client TLS material for tls:// and wss:// targets (absolute paths)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None


@dataclass(frozen=True)
class Target:
    """An application-side host that devices are exported to."""

    name: str
    host: str  # IPv6 addresses without brackets
    port: int
    scheme: Scheme = "tcp"
    path: str | None = None  # wss:// only, e.g. "/usbip"
    fallback: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: TlsOptions | None = None
    # "file:line" of the definition; not part of equality, so a target that
    # only moved within its file compares equal after a reload.
    source: str = field(default="", compare=False)

    @property
    def display(self) -> str:
        """`host:port`, with IPv6 hosts in brackets: `[2001:db8::7]:3240`."""
        return str(Endpoint(self.host, self.port))

    @property
    def url(self) -> str:
        """`scheme://host:port[/path]`."""
        return f"{self.scheme}://{self.display}{self.path or ''}"


@dataclass(frozen=True)
class Settings:
    """Daemon-wide settings from the policy's optional `settings` section."""

    on_stop: Literal["unexport", "keep"] = "unexport"  # what stopping the daemon does
    coldplug: bool = True  # apply the policy to devices present at start
    metrics_listen: Endpoint | None = None  # where to serve Prometheus metrics; None: off


@dataclass(frozen=True)
class Condition:
    """One key of a rule's `match`: the device matches if any pattern does.

    `key` is the match key (`vendor`, `interface_class`, `property`, ...);
    `property_name` is set for `property` conditions. `patterns` are the
    patterns as normalized for display (class codes as 2 hex digits).
    """

    key: str
    patterns: tuple[str, ...]
    regex: re.Pattern[str] = field(repr=False)
    property_name: str | None = None

    def values(self, device: Device) -> tuple[str, ...]:
        """The device's values for this key, as the patterns see them."""
        return _device_values(self, device)

    def first_match(self, device: Device) -> str | None:
        return next((v for v in self.values(device) if self.regex.fullmatch(v)), None)

    def matches(self, device: Device) -> bool:
        return self.first_match(device) is not None

    def describe(self, device: Device) -> str:
        """`vendor 076b`, `interface_class 03 (hid)`: the device value that matched."""
        value = self.first_match(device)
        if value is None:
            return f"{self.label} did not match"
        if self.key in ("device_class", "interface_class"):
            name = _CLASS_DISPLAY.get(int(value, 16))
            return f"{self.label} {value} ({name})" if name else f"{self.label} {value}"
        if self.key in ("serial", "driver", "manufacturer", "product_name", "property"):
            return f"{self.label} {value!r}"
        return f"{self.label} {value}"

    @property
    def label(self) -> str:
        return f"property {self.property_name}" if self.property_name else self.key

    def __str__(self) -> str:
        return f"{self.label}: {' | '.join(self.patterns)}"


def _device_values(cond: Condition, device: Device) -> tuple[str, ...]:
    key = cond.key
    value: str | None
    if key == "vendor":
        return (f"{device.vendor:04x}",)
    if key == "product":
        return (f"{device.product:04x}",)
    if key == "id":
        return (device.vid_pid,)
    if key in ("busid", "port"):
        return (device.busid,)
    if key == "device_class":
        return (f"{device.device_class:02x}",)
    if key == "interface_class":
        return tuple(dict.fromkeys(f"{i.klass:02x}" for i in device.interfaces))
    if key == "property":
        value = device.properties.get(cond.property_name or "")
    else:  # serial, driver, manufacturer, product_name
        value = cast("str | None", getattr(device, key))
    return () if value is None else (value,)


@dataclass(frozen=True)
class Rule:
    """One policy rule. All conditions must match (an empty tuple matches all)."""

    name: str
    conditions: tuple[Condition, ...]
    action: Action
    target: str | None  # the target's name when action == "export"
    source: str = field(default="", compare=False)  # "file:line"

    def matches(self, device: Device) -> bool:
        return all(c.matches(device) for c in self.conditions)

    def explain(self, device: Device) -> str:
        if not self.conditions:
            return f"rule {self.name!r} matches every device"
        return f"rule {self.name!r} matched " + " ".join(
            c.describe(device) for c in self.conditions
        )


@dataclass(frozen=True)
class Decision:
    """What the policy wants for one device, and why (for `check` and logs).

    action "export": export to `target` (then its fallbacks, see
    `Policy.target_chain`); "ignore": a rule (or the hub guard) says leave
    the device alone; "none": no rule matched, leave the device alone.
    """

    action: Literal["export", "ignore", "none"]
    rule: str | None
    target: str | None
    reason: str


@dataclass(frozen=True)
class Policy:
    targets: Mapping[str, Target] = field(default_factory=lambda: MappingProxyType({}))
    rules: tuple[Rule, ...] = ()
    settings: Settings = field(default_factory=Settings)
    sources: tuple[str, ...] = ()  # the files it was built from, in merge order

    def decide(self, device: Device) -> Decision:
        """First matching rule wins; hubs are never exported."""
        if device.is_hub:
            return Decision("ignore", None, None, "hub: never exported")
        if device.on_vhci:
            return Decision(
                "ignore", None, None, "attached through vhci_hcd (imported): never exported again"
            )
        for rule in self.rules:
            if rule.matches(device):
                return Decision(rule.action, rule.name, rule.target, rule.explain(device))
        return Decision("none", None, None, "no rule matched")

    def target_chain(self, name: str) -> list[Target]:
        """The target, then its fallbacks in order, then theirs (breadth first).

        Each target appears once. Raises KeyError for an unknown name.
        """
        if name not in self.targets:
            raise KeyError(name)
        chain: list[Target] = []
        seen = {name}
        queue = deque([name])
        while queue:
            target = self.targets[queue.popleft()]
            chain.append(target)
            for fallback in target.fallback:
                if fallback not in seen and fallback in self.targets:
                    seen.add(fallback)
                    queue.append(fallback)
        return chain


# --------------------------------------------------------------------------
# Parsing one file: YAML nodes -> pieces, errors collected

_TOP_KEYS = ("version", "targets", "rules", "settings")
_TARGET_KEYS = (
    "address",
    "fallback",
    "connect_timeout",
    "handshake_timeout",
    "retry",
    "cert",
    "key",
    "ca",
)
_RETRY_KEYS = ("initial", "max", "factor", "jitter")
_SETTINGS_KEYS = ("on_stop", "coldplug", "metrics")
_METRICS_KEYS = ("listen",)
_RULE_KEYS = ("name", "match", "export", "action")
_MATCH_KEYS = (
    "vendor",
    "product",
    "id",
    "serial",
    "busid",
    "port",
    "device_class",
    "interface_class",
    "driver",
    "manufacturer",
    "product_name",
    "property",
)

_TARGET_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HEX_TOKEN_RE = re.compile(r"[0-9a-f?]|\*|\[!?[0-9a-f-]+\]")
_BUSID_RE = re.compile(r"[0-9.*?!\[\]-]+")
_PROPERTY_RE = re.compile(r"[A-Za-z0-9_.]+")
_HEX_CLASS_RE = re.compile(r"0x([0-9a-f]{1,2})|([0-9a-f]{2})")


@dataclass
class _TargetDef:
    name: str
    file: str
    line: int | None
    target: Target | None  # None if it had errors


@dataclass
class _Ref:
    """A use of a target name (`export:` or `fallback:`), checked after merging."""

    name: str
    file: str
    line: int | None
    key: str
    owner: str | None = None  # the target whose fallback this is


@dataclass
class _RuleDef:
    name: str | None
    file: str
    line: int | None
    key: str
    name_line: int | None
    rule: Rule | None  # None if it had errors; name and source filled in later


@dataclass
class _FileResult:
    targets: list[_TargetDef] = field(default_factory=list)
    rules: list[_RuleDef] = field(default_factory=list)
    refs: list[_Ref] = field(default_factory=list)
    settings: tuple[Settings, int | None] | None = None


class _FileParser(NodeReader[PolicyError]):
    """Walks one policy file's node tree; reports every problem instead of stopping."""

    def __init__(self, file: str, errors: list[PolicyError]) -> None:
        super().__init__(file, errors, PolicyError)
        self.result = _FileResult()

    # -- the file -------------------------------------------------------------

    def parse(self, text: str) -> _FileResult:
        root = self.compose(text)
        if root is None:
            return self.result  # empty, or only comments: contributes nothing
        top = self.mapping(
            root, None, "a mapping with 'version: 1', 'targets' and 'rules'", allowed=None
        )
        if top is None:
            return self.result
        unknown = [(name, knode) for name, (knode, _) in top.items() if name not in _TOP_KEYS]
        suggested = {closest(name, _TOP_KEYS) for name, _ in unknown}
        if "version" not in top:
            if "version" not in suggested:
                self.error(root, "version", "missing; every policy file starts with 'version: 1'")
        else:
            vnode = top["version"][1]
            if not (
                isinstance(vnode, ScalarNode)
                and vnode.tag == INT
                and vnode.value == str(SUPPORTED_VERSION)
            ):
                self.error(
                    vnode,
                    "version",
                    f"expected {SUPPORTED_VERSION} (the only version this usbip-hotplug "
                    f"understands), got {describe_node(vnode)}",
                )
                return self.result  # another version's keys would only add noise
        for name, knode in unknown:
            allowed = ", ".join(_TOP_KEYS)
            self.error(
                knode, name, f"unknown key{suggest(name, _TOP_KEYS)} (allowed here: {allowed})"
            )
        if "targets" in top:
            self.targets(top["targets"][1])
        if "rules" in top:
            self.rules(top["rules"][1])
        if "settings" in top:
            knode, snode = top["settings"]
            settings = self.settings(snode)
            if settings is not None:
                self.result.settings = (settings, line_of(knode))
        return self.result

    # -- targets ------------------------------------------------------------

    def targets(self, node: Node) -> None:
        if node.tag == NULL:
            return
        items = self.mapping(node, "targets", "a mapping of target names to targets")
        for name, (knode, vnode) in (items or {}).items():
            self.result.targets.append(
                _TargetDef(name, self.file, line_of(knode), self.target(name, knode, vnode))
            )

    def target(self, name: str, knode: Node, node: Node) -> Target | None:
        path = join_key("targets", name)
        before = len(self.errors)
        if not _TARGET_NAME_RE.fullmatch(name):
            self.error(
                knode,
                path,
                "expected a target name of letters, digits, '.', '_' and '-' "
                f"(starting with a letter or digit), got {name!r}",
            )
        items = self.mapping(
            node, path, "a mapping with at least 'address'", _TARGET_KEYS, ("retry", _RETRY_KEYS)
        )
        if items is None:
            return None
        suggested = self.suggested
        fields: dict[str, object] = {}

        address: tuple[Scheme, str, int, str | None] | None = None
        address_text: str | None = None
        if "address" not in items:
            if "address" not in suggested:
                self.error(knode, join_key(path, "address"), "missing; expected 'host[:port]'")
        else:
            anode = items["address"][1]
            address_text = self.text(anode, join_key(path, "address"), "'host[:port]'")
            if address_text is not None:
                try:
                    address = parse_address(address_text)
                except ValueError as e:
                    self.error(anode, join_key(path, "address"), str(e))

        if "fallback" in items:
            fkey = join_key(path, "fallback")
            fnode = items["fallback"][1]
            names = self.one_or_many(fnode, fkey, self.fallback_name)
            if names is not None:
                seen: set[str] = set()
                elements = (
                    cast("list[Node]", fnode.value) if isinstance(fnode, SequenceNode) else [fnode]
                )
                for i, (fname, enode) in enumerate(zip(names, elements, strict=True)):
                    ekey = f"{fkey}[{i}]" if isinstance(fnode, SequenceNode) else fkey
                    if fname == name:
                        self.error(enode, ekey, f"target '{name}' cannot fall back to itself")
                    elif fname in seen:
                        self.error(enode, ekey, f"'{fname}' is listed twice")
                    else:
                        self.result.refs.append(_Ref(fname, self.file, line_of(enode), ekey, name))
                    seen.add(fname)
                fields["fallback"] = names

        for tkey in ("connect_timeout", "handshake_timeout"):
            if tkey in items:
                fields[tkey] = self.number(
                    items[tkey][1], join_key(path, tkey), "a number of seconds > 0", lambda v: v > 0
                )

        if "retry" in items:
            fields["retry"] = self.retry(items["retry"][1], join_key(path, "retry"))

        tls: dict[str, str | None] = {}
        for tkey in ("cert", "key", "ca"):
            if tkey in items:
                vnode = items[tkey][1]
                value = self.text(vnode, join_key(path, tkey), "an absolute file path")
                if value is not None and not value.startswith("/"):
                    self.error(
                        vnode,
                        join_key(path, tkey),
                        f"expected an absolute file path, got {value!r}",
                    )
                elif address is not None and address[0] == "tcp":
                    self.error(
                        items[tkey][0],
                        join_key(path, tkey),
                        f"only tls:// and wss:// targets take '{tkey}', "
                        f"got a plain tcp address {address_text!r}",
                    )
                tls[tkey] = value
        if ("cert" in tls) != ("key" in tls):
            have, missing = ("cert", "key") if "cert" in tls else ("key", "cert")
            self.error(
                items[have][0], join_key(path, missing), f"missing; '{have}' needs '{missing}' too"
            )

        if len(self.errors) > before or address is None:
            return None
        scheme, host, port, url_path = address
        return Target(
            name=name,
            host=host,
            port=port,
            scheme=scheme,
            path=url_path,
            fallback=cast("tuple[str, ...]", fields.get("fallback", ())),
            connect_timeout=cast(float, fields.get("connect_timeout", 5.0)),
            handshake_timeout=cast(float, fields.get("handshake_timeout", 5.0)),
            retry=cast(RetryPolicy, fields.get("retry", RetryPolicy())),
            tls=TlsOptions(**tls) if tls else None,
            source=self.where(knode),
        )

    def fallback_name(self, node: Node, key: str) -> str | None:
        return self.text(node, key, "a target name")

    def retry(self, node: Node, path: str) -> RetryPolicy | None:
        items = self.mapping(node, path, "a mapping with initial, max, factor, jitter", _RETRY_KEYS)
        if items is None:
            return None
        default = RetryPolicy()
        checks: dict[str, tuple[str, Callable[[float], bool]]] = {
            "initial": ("a number of seconds > 0", lambda v: v > 0),
            "max": ("a number of seconds > 0", lambda v: v > 0),
            "factor": ("a number >= 1", lambda v: v >= 1),
            "jitter": ("a number from 0 to 1", lambda v: 0 <= v <= 1),
        }
        values: dict[str, float] = {}
        ok = True
        for key, (expected, check) in checks.items():
            if key in items:
                got = self.number(items[key][1], join_key(path, key), expected, check)
                if got is None:
                    ok = False
                else:
                    values[key] = got
        if not ok:
            return None
        policy = RetryPolicy(
            initial=values.get("initial", default.initial),
            max=values.get("max", default.max),
            factor=values.get("factor", default.factor),
            jitter=values.get("jitter", default.jitter),
        )
        if policy.max < policy.initial:
            where = items["max"][1] if "max" in items else items["initial"][1]
            key = "max" if "max" in items else "initial"
            self.error(
                where,
                join_key(path, key),
                f"expected max >= initial, got initial {policy.initial:g} and max {policy.max:g}",
            )
            return None
        return policy

    # -- settings -------------------------------------------------------------

    def settings(self, node: Node) -> Settings | None:
        if node.tag == NULL:
            return None
        items = self.mapping(node, "settings", "a mapping", _SETTINGS_KEYS)
        if items is None:
            return None
        before = len(self.errors)
        on_stop: Literal["unexport", "keep"] = "unexport"
        coldplug = True
        if "on_stop" in items:
            vnode = items["on_stop"][1]
            value = self.text(vnode, "settings.on_stop", "'unexport' or 'keep'")
            if value in ("unexport", "keep"):
                on_stop = cast(Literal["unexport", "keep"], value)
            elif value is not None:
                self.error(
                    vnode, "settings.on_stop", f"expected 'unexport' or 'keep', got {value!r}"
                )
        if "coldplug" in items:
            got = self.boolean(items["coldplug"][1], "settings.coldplug")
            if got is not None:
                coldplug = got
        listen = self.metrics(items["metrics"][1]) if "metrics" in items else None
        if len(self.errors) > before:
            return None
        return Settings(on_stop=on_stop, coldplug=coldplug, metrics_listen=listen)

    def metrics(self, node: Node) -> Endpoint | None:
        key = "settings.metrics"
        if node.tag == NULL:
            return None  # `metrics:` with its keys commented out: off
        items = self.mapping(node, key, "a mapping with 'listen'", _METRICS_KEYS)
        if items is None or "listen" not in items:
            return None
        vnode = items["listen"][1]
        text = self.text(vnode, f"{key}.listen", "host:port, e.g. '127.0.0.1:9100'")
        if text is None:
            return None
        try:
            return parse_listen(text)
        except AddressError as exc:
            self.error(vnode, f"{key}.listen", str(exc))
            return None

    # -- rules ----------------------------------------------------------------

    def rules(self, node: Node) -> None:
        items = self.sequence(node, "rules", "a list of rules")
        for i, item in enumerate(items or []):
            self.rule(item, f"rules[{i}]")

    def rule(self, node: Node, path: str) -> None:
        before = len(self.errors)
        items = self.mapping(
            node,
            path,
            "a mapping with 'match' and 'export' or 'action'",
            _RULE_KEYS,
            ("match", _MATCH_KEYS),
        )
        if items is None:
            return
        suggested = self.suggested
        name: str | None = None
        name_line: int | None = None
        if "name" in items:
            knode, vnode = items["name"]
            name = self.text(vnode, join_key(path, "name"), "a rule name")
            name_line = line_of(knode)

        conditions: tuple[Condition, ...] | None = None
        if "match" not in items:
            if "match" not in suggested:
                message = "missing; use 'match: {}' to match every device"
                self.error(node, join_key(path, "match"), message)
        else:
            conditions = self.match(items["match"][1], join_key(path, "match"))

        action: Action | None = None
        target: str | None = None
        if "export" in items and "action" in items:
            self.error(
                items["action"][0],
                path,
                "expected either 'export: TARGET' or 'action: ignore', got both",
            )
        elif "export" in items:
            enode = items["export"][1]
            target = self.text(enode, join_key(path, "export"), "a target name")
            if target is not None:
                action = "export"
                self.result.refs.append(
                    _Ref(target, self.file, line_of(enode), join_key(path, "export"))
                )
        elif "action" in items:
            anode = items["action"][1]
            value = self.text(anode, join_key(path, "action"), "'ignore'")
            if value == "ignore":
                action = "ignore"
            elif value is not None:
                self.error(
                    anode,
                    join_key(path, "action"),
                    f"expected 'ignore' (to export, write 'export: TARGET'), got {value!r}",
                )
        elif not suggested & {"export", "action"}:
            self.error(node, path, "expected 'export: TARGET' or 'action: ignore', got neither")

        rule: Rule | None = None
        if len(self.errors) == before and conditions is not None and action is not None:
            rule = Rule(name or "", conditions, action, target, self.where(node))
        self.result.rules.append(_RuleDef(name, self.file, line_of(node), path, name_line, rule))

    def match(self, node: Node, path: str) -> tuple[Condition, ...] | None:
        items = self.mapping(
            node, path, "a mapping of match keys (use {} to match every device)", _MATCH_KEYS
        )
        if items is None:
            return None
        before = len(self.errors)
        conditions: list[Condition] = []
        for key, (_, vnode) in items.items():
            kpath = join_key(path, key)
            if key == "property":
                conditions.extend(self.properties(vnode, kpath))
                continue
            cond = self.condition(key, vnode, kpath)
            if cond is not None:
                conditions.append(cond)
        return tuple(conditions) if len(self.errors) == before else None

    def condition(self, key: str, node: Node, path: str) -> Condition | None:
        if key in ("vendor", "product"):
            pats = self.one_or_many(node, path, self.hex_glob)
            return None if pats is None else _condition(key, pats, ignore_case=True)
        if key == "id":
            pats = self.one_or_many(node, path, self.id_glob)
            return None if pats is None else _condition(key, pats, ignore_case=True)
        if key in ("busid", "port"):
            pats = self.one_or_many(node, path, self.busid_glob)
            return None if pats is None else _condition(key, pats, subtree=key == "port")
        if key in ("device_class", "interface_class"):
            codes = self.one_or_many(node, path, self.usb_class)
            if codes is None:
                return None
            hexes = tuple(dict.fromkeys(f"{c:02x}" for c in codes))
            regex = re.compile("|".join(hexes))
            return Condition(key, hexes, regex)
        # serial, driver: case-sensitive globs; manufacturer, product_name: not.
        pats = self.one_or_many(node, path, self.glob)
        if pats is None:
            return None
        return _condition(key, pats, ignore_case=key in ("manufacturer", "product_name"))

    def properties(self, node: Node, path: str) -> list[Condition]:
        items = self.mapping(node, path, "a mapping of udev property names to glob patterns")
        if items is None:
            return []
        if not items and isinstance(node, MappingNode) and not node.value:
            self.error(node, path, "expected at least one udev property, got an empty mapping")
        conditions: list[Condition] = []
        for name, (knode, vnode) in items.items():
            kpath = join_key(path, name)
            if not _PROPERTY_RE.fullmatch(name):
                self.error(
                    knode, kpath, f"expected a udev property name like ID_MODEL, got {name!r}"
                )
                continue
            pats = self.one_or_many(vnode, kpath, self.glob)
            if pats is not None:
                conditions.append(_condition("property", pats, property_name=name))
        return conditions

    # -- single match values -------------------------------------------------

    def glob(self, node: Node, key: str) -> str | None:
        return self.text(node, key, "a glob pattern")

    def hex_glob(self, node: Node, key: str) -> str | None:
        text = self.text(node, key, "4 hex digits (glob allowed)")
        if text is not None and not _is_hex_glob(text):
            self.error(node, key, f"expected 4 hex digits (glob allowed), got {text!r}")
            return None
        return None if text is None else text.lower()

    def id_glob(self, node: Node, key: str) -> str | None:
        expected = "vendor:product like '076b:5321' (4 hex digits each, glob allowed)"
        text = self.text(node, key, expected)
        if text is None:
            return None
        vendor, colon, product = text.partition(":")
        if not (colon and _is_hex_glob(vendor) and _is_hex_glob(product)):
            self.error(node, key, f"expected {expected}, got {text!r}")
            return None
        return text.lower()

    def busid_glob(self, node: Node, key: str) -> str | None:
        expected = "a bus id like '1-1.2' (glob allowed, e.g. '1-1.*')"
        text = self.text(node, key, expected)
        if text is not None and not _BUSID_RE.fullmatch(text):
            self.error(node, key, f"expected {expected}, got {text!r}")
            return None
        return text

    def usb_class(self, node: Node, key: str) -> int | None:
        expected = "a USB class name (hid, mass_storage, audio, ...) or 2 hex digits like '03'"
        text = self.text(node, key, expected)
        if text is None:
            return None
        word = re.sub(r"[-\s]", "_", text.strip().lower())
        if word in USB_CLASSES:
            return USB_CLASSES[word]
        m = _HEX_CLASS_RE.fullmatch(word)
        if m:
            return int(m.group(1) or m.group(2), 16)
        hint = suggest(word, list(USB_CLASSES))
        self.error(node, key, f"expected {expected}, got {text!r}{hint}")
        return None


def _is_hex_glob(text: str) -> bool:
    """4 hex digits where any may be a glob: '076b', '05?c', '07*', '[0-3]abc'."""
    text = text.lower()
    pos = digits = 0
    star = False
    while pos < len(text):
        m = _HEX_TOKEN_RE.match(text, pos)
        if m is None:
            return False
        if m.group() == "*":
            star = True
        else:
            digits += 1
        pos = m.end()
    return digits == 4 or (star and digits <= 4)


def _condition(
    key: str,
    patterns: tuple[str, ...],
    *,
    ignore_case: bool = False,
    subtree: bool = False,
    property_name: str | None = None,
) -> Condition:
    """Compile fnmatch globs into one regex. `subtree` (for `port`) also
    matches anything plugged in below: '1-1.2' matches 1-1.2 and 1-1.2.*."""
    parts: list[str] = []
    for pattern in patterns:
        parts.append(fnmatch.translate(pattern))
        if subtree:
            parts.append(fnmatch.translate(pattern + ".*"))
    regex = re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE if ignore_case else 0)
    return Condition(key, patterns, regex, property_name)


# --------------------------------------------------------------------------
# Merging files


def parse_policy(sources: Sequence[tuple[str, str]]) -> Policy:
    """Build a policy from (display file name, text) pairs, in merge order.

    Pure. Raises PolicyError for one problem, PolicyErrors for several.
    No sources (or only empty files) give the empty policy, which exports
    nothing.
    """
    errors: list[PolicyError] = []
    results = [_FileParser(name, errors).parse(text) for name, text in sources]

    declared: dict[str, str] = {}  # target name -> "file:line", including broken ones
    targets: dict[str, Target] = {}
    settings: tuple[Settings, str] | None = None
    for (name, _), result in zip(sources, results, strict=True):
        for tdef in result.targets:
            here = f"{tdef.file}:{tdef.line}"
            if tdef.name in declared:
                errors.append(
                    PolicyError(
                        tdef.file,
                        tdef.line,
                        join_key("targets", tdef.name),
                        f"target '{tdef.name}' is already defined at {declared[tdef.name]}; "
                        "target names must be unique across all policy files",
                    )
                )
                continue
            declared[tdef.name] = here
            if tdef.target is not None:
                targets[tdef.name] = tdef.target
        if result.settings is not None:
            value, line = result.settings
            if settings is not None:
                errors.append(
                    PolicyError(
                        name,
                        line,
                        "settings",
                        f"already given at {settings[1]}; settings may appear in one file only",
                    )
                )
            else:
                settings = (value, f"{name}:{line}")

    for result in results:
        for ref in result.refs:
            if ref.name not in declared:
                known = sorted(declared)
                listing = (
                    f"defined targets: {', '.join(known)}" if known else "no targets are defined"
                )
                errors.append(
                    PolicyError(
                        ref.file,
                        ref.line,
                        ref.key,
                        f"unknown target '{ref.name}'{suggest(ref.name, known)} ({listing})",
                    )
                )
    errors.extend(_cycle_errors(targets, [r for res in results for r in res.refs if r.owner]))

    rules: list[Rule] = []
    rule_names: dict[str, str] = {}
    for rdef in (r for res in results for r in res.rules):
        number = len(rules) + 1
        name = rdef.name if rdef.name is not None else f"rule {number}"
        where = f"{rdef.file}:{rdef.name_line or rdef.line}"
        if name in rule_names:
            errors.append(
                PolicyError(
                    rdef.file,
                    rdef.name_line or rdef.line,
                    join_key(rdef.key, "name"),
                    f"rule name '{name}' is already used at {rule_names[name]}; "
                    "give each rule its own name",
                )
            )
        rule_names.setdefault(name, where)
        if rdef.rule is not None:
            rules.append(
                Rule(
                    name, rdef.rule.conditions, rdef.rule.action, rdef.rule.target, rdef.rule.source
                )
            )
        else:
            rules.append(Rule(name, (), "ignore", None))  # placeholder keeps numbering

    if errors:
        order = {name: i for i, (name, _) in reversed(list(enumerate(sources)))}
        errors.sort(key=lambda e: (order.get(e.file, len(order)), e.line or 0))
        raise errors[0] if len(errors) == 1 else PolicyErrors(errors)
    return Policy(
        targets=MappingProxyType(targets),
        rules=tuple(rules),
        settings=settings[0] if settings else Settings(),
        sources=tuple(name for name, _ in sources),
    )


def _cycle_errors(targets: Mapping[str, Target], refs: Sequence[_Ref]) -> list[PolicyError]:
    """One error per fallback cycle, at the fallback entry that closes it."""
    graph = {name: [f for f in t.fallback if f in targets] for name, t in targets.items()}
    where = {(r.owner, r.name): r for r in refs}
    errors: list[PolicyError] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in graph:
        if start in state:
            continue
        path: list[str] = [start]
        state[start] = 1
        stack: list[Iterator[str]] = [iter(graph[start])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                state[path.pop()] = 2
            elif state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                ref = where.get((path[-1], nxt))
                if ref is not None:
                    errors.append(
                        PolicyError(
                            ref.file, ref.line, ref.key, "fallback cycle: " + " -> ".join(cycle)
                        )
                    )
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(graph[nxt]))
    return errors


# --------------------------------------------------------------------------
# I/O edge: the only function in this module that touches the file system.


def load_policy(path: str | Path | None = None) -> Policy:
    """Read the policy files and parse them.

    - None: `/etc/usbip-hotplug/policy.yaml` if present, then
      `/etc/usbip-hotplug/policy.d/*.yaml`. None of them present = the empty
      policy (exports nothing).
    - A directory DIR (`-c DIR`): the same layout below DIR; DIR must exist
      and hold policy.yaml or policy.d/.
    - A file (`-c FILE`): that file alone, without drop-ins.

    Drop-ins are `*.yaml` files directly in policy.d, in file-name order;
    hidden files are skipped; a `*.yml` file is an error (rename it), so it
    is not silently ignored. File names in errors are the paths as read.
    """
    explicit = path is not None
    base = Path(path) if path is not None else DEFAULT_CONFIG_DIR
    files: list[Path] = []
    try:
        if base.is_dir():
            main, dropins = base / MAIN_FILE, base / DROPIN_DIR
            if explicit and not main.exists() and not dropins.is_dir():
                raise PolicyError(
                    str(base), None, None, f"no {MAIN_FILE} and no {DROPIN_DIR}/ in this directory"
                )
            if main.exists():
                files.append(main)
            if dropins.is_dir():
                entries = sorted(dropins.iterdir(), key=lambda p: p.name)
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.name.endswith(".yml"):
                        raise PolicyError(
                            str(entry),
                            None,
                            None,
                            f"policy.d files must end in .yaml; rename it to {entry.stem}.yaml",
                        )
                    if entry.name.endswith(".yaml") and not entry.is_dir():
                        files.append(entry)
        elif explicit or base.exists():
            files.append(base)
    except OSError as e:
        raise PolicyError(str(e.filename or base), None, None, f"cannot read: {e.strerror}") from e

    sources: list[tuple[str, str]] = []
    for file in files:
        try:
            with file.open("rb") as f:
                data = yamlnodes.read_limited(f)  # parse_policy refuses a larger file
        except OSError as e:
            raise PolicyError(str(file), None, None, f"cannot read: {e.strerror}") from e
        if len(data) > yamlnodes.MAX_FILE_BYTES:
            raise PolicyError(str(file), None, None, yamlnodes.TOO_LARGE)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise PolicyError(str(file), line, None, "not valid UTF-8") from e
        sources.append((str(file), text))
    return parse_policy(sources)
