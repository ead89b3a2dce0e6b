"""One policy file: YAML nodes -> targets, rules and settings, every problem collected.

The generic half (exact scalar types, strict keys, file:line:key errors) is
hotplug.yamlnodes.NodeReader; this file adds what each key of a policy means.
Pure: text in, pieces out. Rules of the policy (all-or-nothing, unknown keys
are errors) are in device/policy/__init__.py.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from hotplug.device.policy.model import (
    FOLLOW_MAX,
    USB_CLASSES,
    Action,
    Claim,
    Condition,
    PolicyError,
    RetryPolicy,
    Rule,
    Settings,
    Target,
    TlsOptions,
)
from hotplug.wire.address import AddressError, Endpoint, Scheme, parse_address, parse_listen
from hotplug.yamlnodes import (
    INT,
    NULL,
    NodeReader,
    closest,
    describe_node,
    join_key,
    line_of,
    suggest,
)

SUPPORTED_VERSION = 1

# --------------------------------------------------------------------------
# Parsing one file: YAML nodes -> pieces, errors collected

TOP_KEYS = ("version", "targets", "rules", "settings")
TARGET_KEYS = (
    "address",
    "fallback",
    "connect_timeout",
    "handshake_timeout",
    "retry",
    "cert",
    "key",
    "ca",
)
RETRY_KEYS = ("initial", "max", "factor", "jitter")
SETTINGS_KEYS = ("on_stop", "coldplug", "metrics", "claim")
CLAIMS: tuple[Claim, ...] = ("after-probe", "before-probe")
METRICS_KEYS = ("listen",)
RULE_KEYS = ("name", "match", "export", "action", "follow")
MATCH_KEYS = (
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
class Ref:
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
class FileResult:
    targets: list[_TargetDef] = field(default_factory=list)
    rules: list[_RuleDef] = field(default_factory=list)
    refs: list[Ref] = field(default_factory=list)
    settings: tuple[Settings, int | None] | None = None


class FileParser(NodeReader[PolicyError]):
    """Walks one policy file's node tree; reports every problem instead of stopping."""

    def __init__(self, file: str, errors: list[PolicyError]) -> None:
        super().__init__(file, errors, PolicyError)
        self.result = FileResult()

    # -- the file -------------------------------------------------------------

    def parse(self, text: str) -> FileResult:
        root = self.compose(text)
        if root is None:
            return self.result  # empty, or only comments: contributes nothing
        top = self.mapping(
            root, None, "a mapping with 'version: 1', 'targets' and 'rules'", allowed=None
        )
        if top is None:
            return self.result
        unknown = [(name, knode) for name, (knode, _) in top.items() if name not in TOP_KEYS]
        suggested = {closest(name, TOP_KEYS) for name, _ in unknown}
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
            allowed = ", ".join(TOP_KEYS)
            self.error(
                knode, name, f"unknown key{suggest(name, TOP_KEYS)} (allowed here: {allowed})"
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
            node, path, "a mapping with at least 'address'", TARGET_KEYS, ("retry", RETRY_KEYS)
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
                        self.result.refs.append(Ref(fname, self.file, line_of(enode), ekey, name))
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
        items = self.mapping(node, path, "a mapping with initial, max, factor, jitter", RETRY_KEYS)
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
        items = self.mapping(node, "settings", "a mapping", SETTINGS_KEYS)
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
        claim: Claim = "after-probe"
        if "claim" in items:
            vnode = items["claim"][1]
            expected = " or ".join(f"'{c}'" for c in CLAIMS)
            value = self.text(vnode, "settings.claim", expected)
            if value in CLAIMS:
                claim = value
            elif value is not None:
                self.error(vnode, "settings.claim", f"expected {expected}, got {value!r}")
        if len(self.errors) > before:
            return None
        return Settings(on_stop=on_stop, coldplug=coldplug, metrics_listen=listen, claim=claim)

    def metrics(self, node: Node) -> Endpoint | None:
        key = "settings.metrics"
        if node.tag == NULL:
            return None  # `metrics:` with its keys commented out: off
        items = self.mapping(node, key, "a mapping with 'listen'", METRICS_KEYS)
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
            RULE_KEYS,
            ("match", MATCH_KEYS),
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
                    Ref(target, self.file, line_of(enode), join_key(path, "export"))
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

        follow: float | None = None
        if "follow" in items:
            knode, fnode = items["follow"]
            follow = self.number(
                fnode,
                join_key(path, "follow"),
                f"a number of seconds > 0 and at most {FOLLOW_MAX:g}",
                lambda v: 0 < v <= FOLLOW_MAX,
            )
            if "action" in items and "export" not in items:
                self.error(
                    knode,
                    join_key(path, "follow"),
                    "only a rule that exports ('export: TARGET') can follow a device; "
                    "this one has 'action: ignore'",
                )

        rule: Rule | None = None
        if len(self.errors) == before and conditions is not None and action is not None:
            rule = Rule(name or "", conditions, action, target, self.where(node), follow)
        self.result.rules.append(_RuleDef(name, self.file, line_of(node), path, name_line, rule))

    def match(self, node: Node, path: str) -> tuple[Condition, ...] | None:
        items = self.mapping(
            node, path, "a mapping of match keys (use {} to match every device)", MATCH_KEYS
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
