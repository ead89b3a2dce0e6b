"""The device-side policy as data, and what it decides for one device. Pure.

`Policy.decide(device)` is the whole of matching: first matching rule wins,
hubs and devices imported through vhci_hcd are never exported.
`Policy.target_chain(name)` is a target and its fallbacks. Everything here is
data and pure functions: no YAML, no file, no clock (the relay process and
`status` import this module and need nothing more). Reading the files is
files.py, one file's YAML is parse.py, putting files together is merge.py.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, cast

from hotplug.errors import LocatedError
from hotplug.usb import Device
from hotplug.wire.address import Endpoint, Scheme

__all__ = [
    "FOLLOW_MAX",
    "USB_CLASSES",
    "Action",
    "Claim",
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
]

Action = Literal["export", "ignore"]
Claim = Literal["after-probe", "before-probe"]
# The longest `follow:` a rule may have: a window is for one re-enumeration
# (a bootloader, a firmware update), not a standing reservation of a port.
FOLLOW_MAX = 3600.0


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
    def address(self) -> str:
        """Where, as a user reads it: host:port for plain TCP (as usbip shows it),
        the URL for tls:// and wss://."""
        return self.display if self.scheme == "tcp" else self.url

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
    # after-probe: a new device goes to its usual driver first and is taken from
    # it to be exported (the kernel's default). before-probe: the daemon holds
    # back the usual drivers (drivers_autoprobe 0) and decides first.
    claim: Claim = "after-probe"


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
    # Seconds after a device this rule exported leaves during which whatever
    # appears at the same busid goes to the same target (None: no following).
    follow: float | None = None

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
    follow: float | None = None  # the rule's `follow:` (export decisions only)


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
                return Decision(
                    rule.action, rule.name, rule.target, rule.explain(device), rule.follow
                )
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
