"""YAML for the files root reads (the policy, usbipa's config): plain and bounded.

Both files are short, hand-written lists of keys. What YAML offers beyond that
only costs: one anchored rule aliased 2,000 times made `check` spend 22 s of
CPU (every alias is walked again) and froze a running daemon past its
watchdog. So anchors and aliases are refused with the line they are on, and a
file may hold at most `MAX_FILE_BYTES` bytes and `MAX_NODES` YAML nodes
(scalars, lists and mappings, keys included). Pure: text in, node tree out;
no file access.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, NodeEvent
from yaml.nodes import Node
from yaml.resolver import Resolver

__all__ = ["MAX_FILE_BYTES", "MAX_NODES", "TOO_LARGE", "YamlRefused", "compose", "read_limited"]

MAX_FILE_BYTES = 1024 * 1024  # 1 MiB: a policy for a whole lab is a few KiB
MAX_NODES = 20_000  # ~2,000 rules of ten values each
MERGE_TAG = "tag:yaml.org,2002:merge"
TOO_LARGE = f"file too large: more than 1 MiB ({MAX_FILE_BYTES:,} bytes), the limit"


class YamlRefused(Exception):
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
