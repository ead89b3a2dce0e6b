"""YAML for the files root reads (the policy, usbipa's config): plain, bounded,
and read key by key with errors that name file, line and key.

Both files are short, hand-written lists of keys. What YAML offers beyond that
only costs: one anchored rule aliased 2,000 times made `check` spend 22 s of
CPU (every alias is walked again) and froze a running daemon past its
watchdog. So anchors and aliases are refused with the line they are on, and a
file may hold at most `MAX_FILE_BYTES` bytes and `MAX_NODES` YAML nodes
(scalars, lists and mappings, keys included).

`NodeReader` then turns the node tree into values: exact types (`0763` stays
text, `yes` is not a boolean), unknown and duplicate keys refused with a
suggestion, every problem collected as a `LocatedError` instead of stopping
at the first. Pure: text in, nodes and values out; no file access.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, Generic, TypeVar, cast

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, NodeEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from hotplug.errors import HotplugError, LocatedError

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "MERGE_TAG",
    "TOO_LARGE",
    "LocatedError",
    "NodeReader",
    "YamlRefused",
    "compose",
    "read_limited",
]

MAX_FILE_BYTES = 1024 * 1024  # 1 MiB: a policy for a whole lab is a few KiB
MAX_NODES = 20_000  # ~2,000 rules of ten values each
MERGE_TAG = "tag:yaml.org,2002:merge"
TOO_LARGE = f"file too large: more than 1 MiB ({MAX_FILE_BYTES:,} bytes), the limit"


class YamlRefused(HotplugError):
    """A construct or a size this reader does not take. `line` is 1-based or None."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(line, message)
        self.line = line
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Limits:
    """The composer half of the loaders below: refuses anchors and aliases, counts nodes."""

    nodes = 0

    def compose_node(self, parent: Node | None, index: object) -> Node | None:
        event = self.peek_event()  # type: ignore[attr-defined]
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if isinstance(event, AliasEvent):
            raise YamlRefused(
                line, f"YAML aliases (*{event.anchor}) are not supported; write the value out"
            )
        if isinstance(event, NodeEvent) and event.anchor is not None:
            raise YamlRefused(
                line,
                f"YAML anchors (&{event.anchor}) are not supported; write the value out "
                "where it is used",
            )
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise YamlRefused(
                line, f"more than {MAX_NODES:,} YAML values in one file; split it or simplify it"
            )
        return super().compose_node(parent, index)  # type: ignore[misc, no-any-return]


class _PyLoader(_Limits, yaml.SafeLoader):
    """All Python: slow (seconds for a few hundred KiB), but its messages are the
    ones users and tests know."""


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _FastLoader(_Limits, Composer, CParser, SafeConstructor, Resolver):
        """libyaml scans and parses (about 15 times faster); the Python composer
        above it sees every node, so the limits hold the same."""

        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            Composer.__init__(self)

else:  # pragma: no cover - PyYAML without libyaml
    _FastLoader = _PyLoader  # type: ignore[misc, assignment]


def _compose_with(loader_class: type[Any], text: str) -> Node | None:
    loader = loader_class(text)
    try:
        return loader.get_single_node()  # type: ignore[no-any-return]
    finally:
        loader.dispose()


def compose(text: str) -> Node | None:
    """The node tree of one YAML document (None for an empty file).

    Raises YamlRefused for a file over `MAX_FILE_BYTES` or `MAX_NODES`, or
    with an anchor or alias; yaml.YAMLError for a syntax error (RecursionError
    for one nested too deeply). The size is checked before any parsing starts.
    Merge keys (`<<`) come through as keys tagged `MERGE_TAG`, for the caller
    to refuse with the key's path.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_BYTES:
        raise YamlRefused(None, TOO_LARGE)
    try:
        return _compose_with(_FastLoader, text)
    except yaml.YAMLError:
        # Broken files only: parse again in Python, for its (familiar, more
        # precise) message; it stops where libyaml did, within the same limits.
        # Should the two disagree, Python's reading is the one this project
        # always had: its result stands.
        return _compose_with(_PyLoader, text)


def read_limited(file: BinaryIO) -> bytes:
    """At most one byte more than the limit: enough for `compose` to refuse a
    large file without reading all of it (or blocking on an endless one)."""
    return file.read(MAX_FILE_BYTES + 1)


# --------------------------------------------------------------------------- reading nodes

TAG = "tag:yaml.org,2002:"
NULL = TAG + "null"
STR = TAG + "str"
INT = TAG + "int"
FLOAT = TAG + "float"
BOOL = TAG + "bool"

T = TypeVar("T")


E = TypeVar("E", bound=LocatedError)


def line_of(node: Node) -> int | None:
    mark = node.start_mark
    return None if mark is None else mark.line + 1


def mark_line(mark: yaml.Mark | None) -> int | None:
    return None if mark is None else mark.line + 1


def describe_node(node: Node) -> str:
    """What a node holds, for "expected X, got Y"."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == NULL:
        return "nothing"
    if node.tag == STR:
        return repr(node.value)
    return str(node.value)


def join_key(path: str | None, key: str) -> str:
    return f"{path}.{key}" if path else key


def closest(word: str, choices: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(word: str, choices: Sequence[str]) -> str:
    close = closest(word, choices)
    return f"; did you mean '{close}'?" if close else ""


class NodeReader(Generic[E]):
    """Reads one file's node tree into values, reporting every problem instead of
    stopping: each is an `E` (file, line, key path, message) appended to `errors`.

    A file's own reader subclasses it and adds the meaning of its keys (the
    policy's is device/policy/parse.py); `make_error` is the error class.
    """

    def __init__(
        self,
        file: str,
        errors: list[E],
        make_error: Callable[[str, int | None, str | None, str], E],
    ) -> None:
        self.file = file
        self.errors = errors
        self.make_error = make_error
        # Keys suggested for misspelt keys by the last `mapping` call. A key
        # in here is not reported again as missing: one mistake, one error.
        self.suggested: set[str] = set()

    def error(self, node: Node | None, key: str | None, message: str) -> None:
        line = None if node is None else line_of(node)
        self.errors.append(self.make_error(self.file, line, key, message))

    def where(self, node: Node) -> str:
        return f"{self.file}:{line_of(node)}"

    def std_tag(self, node: Node, key: str | None) -> bool:
        if node.tag.startswith(TAG):
            return True
        self.error(node, key, f"custom YAML tags are not supported, got {node.tag!r}")
        return False

    def mapping(
        self,
        node: Node,
        key: str | None,
        expected: str,
        allowed: Sequence[str] | None = None,
        nested: tuple[str, Sequence[str]] | None = None,
    ) -> dict[str, tuple[Node, Node]] | None:
        """{key text: (key node, value node)} in file order, or None if not a mapping.

        Bad, duplicate and (if `allowed` is given) unknown keys are reported
        and left out. `nested` = (section, its keys): an unknown key that
        belongs in that sub-section is reported as mis-indented.
        """
        self.suggested = set()
        if not self.std_tag(node, key):
            return None
        if not isinstance(node, MappingNode):
            self.error(node, key, f"expected {expected}, got {describe_node(node)}")
            return None
        items: dict[str, tuple[Node, Node]] = {}
        for knode, vnode in cast("list[tuple[Node, Node]]", node.value):
            if knode.tag == MERGE_TAG:
                self.error(knode, key, "merge keys (<<) are not supported; repeat the keys")
                continue
            if not isinstance(knode, ScalarNode) or knode.tag == NULL:
                self.error(knode, key, f"expected a plain key, got {describe_node(knode)}")
                continue
            name = str(knode.value)
            path = join_key(key, name)
            if name in items:
                first = line_of(items[name][0])
                self.error(knode, path, f"duplicate key '{name}' (first given at line {first})")
                continue
            if allowed is not None and name not in allowed:
                self.suggested.add(closest(name, allowed) or "")
                if nested is not None and name in nested[1]:
                    hint = f"; '{name}' belongs under '{nested[0]}:' (check the indentation)"
                else:
                    hint = suggest(name, allowed)
                self.error(knode, path, f"unknown key{hint} (allowed here: {', '.join(allowed)})")
                continue
            items[name] = (knode, vnode)
        return items

    def text(self, node: Node, key: str, expected: str) -> str | None:
        """A scalar's text exactly as written (so `0763` stays "0763")."""
        if not self.std_tag(node, key):
            return None
        if not isinstance(node, ScalarNode) or node.tag == NULL or node.value == "":
            self.error(node, key, f"expected {expected}, got {describe_node(node)}")
            return None
        return str(node.value)

    def number(
        self, node: Node, key: str, expected: str, ok: Callable[[float], bool]
    ) -> float | None:
        value: float | None = None
        if isinstance(node, ScalarNode) and node.tag in (INT, FLOAT):
            constructor = SafeConstructor()
            try:
                if node.tag == INT:
                    value = float(constructor.construct_yaml_int(node))
                else:
                    value = float(constructor.construct_yaml_float(node))
            except (ValueError, OverflowError, yaml.YAMLError):
                value = None
        if value is None or not math.isfinite(value) or not ok(value):
            self.error(node, key, f"expected {expected}, got {describe_node(node)}")
            return None
        return value

    def boolean(self, node: Node, key: str) -> bool | None:
        if isinstance(node, ScalarNode) and node.tag == BOOL:
            return SafeConstructor().construct_yaml_bool(node)
        self.error(node, key, f"expected true or false, got {describe_node(node)}")
        return None

    def one_or_many(
        self, node: Node, key: str, parse: Callable[[Node, str], T | None]
    ) -> tuple[T, ...] | None:
        """A single value, or a list of values meaning "any of these"."""
        if not isinstance(node, SequenceNode):
            one = parse(node, key)
            return None if one is None else (one,)
        if not self.std_tag(node, key):
            return None
        items = cast("list[Node]", node.value)
        if not items:
            self.error(node, key, "expected at least one value, got an empty list")
            return None
        results = [parse(item, f"{key}[{i}]") for i, item in enumerate(items)]
        good = [r for r in results if r is not None]
        return tuple(good) if len(good) == len(results) else None

    def sequence(self, node: Node, key: str, expected: str) -> list[Node] | None:
        if not self.std_tag(node, key):
            return None
        if node.tag == NULL:
            return []
        if not isinstance(node, SequenceNode):
            self.error(node, key, f"expected {expected}, got {describe_node(node)}")
            return None
        return cast("list[Node]", node.value)

    def compose(self, text: str) -> Node | None:
        try:
            return compose(text)
        except YamlRefused as e:
            self.errors.append(self.make_error(self.file, e.line, None, e.message))
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            message = f"invalid YAML: {e.problem or e.context or 'syntax error'}"
            if e.context and e.problem and e.problem.startswith("but "):
                message = f"invalid YAML: {e.context}, {e.problem}"
            elif e.context and e.problem:
                ctx_line = e.context_mark.line + 1 if e.context_mark else None
                at = f" at line {ctx_line}" if ctx_line and ctx_line != mark_line(mark) else ""
                message += f" ({e.context}{at})"
            if "'\\t'" in message:
                message += "; indent with spaces, not tabs"
            self.errors.append(self.make_error(self.file, mark_line(mark), None, message))
        except yaml.reader.ReaderError as e:
            position = e.position if isinstance(e.position, int) else 0
            line = text.count("\n", 0, position) + 1
            char = e.character
            shown = f"#x{char:04x}" if isinstance(char, int) else repr(char)
            self.errors.append(
                self.make_error(
                    self.file, line, None, f"invalid YAML: character {shown}: {e.reason}"
                )
            )
        except yaml.YAMLError as e:
            self.errors.append(self.make_error(self.file, None, None, f"invalid YAML: {e}"))
        except RecursionError:
            self.errors.append(
                self.make_error(self.file, None, None, "invalid YAML: nested too deeply")
            )
        return None
