"""Text from outside made safe for a terminal and a log line.

USB strings (product, manufacturer, serial) are whatever the device says. Sent
raw to root's terminal or the log, `Totally Legit\\x1b[8m hidden` hides what
follows it, and a bidi override reorders what is shown. `printable` writes
such characters as Python-style escapes (`\\x1b`, `\\u202e`): C0 controls,
DEL, C1 controls, the bidi embeddings, overrides, isolates and marks, and the
Unicode line and paragraph separators. Everything else (accents, CJK,
emoji) is kept. Used where text leaves the program for a human: command
output and log lines; JSON output carries the exact strings.
"""

from __future__ import annotations

__all__ = ["printable"]

_CONTROLS = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_SEPARATORS = [0x2028, 0x2029]
_TABLE = {
    code: (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    for code in (*_CONTROLS, *_BIDI, *_SEPARATORS)
}
_TABLE.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})


def printable(text: str, keep: str = "") -> str:
    """`text` with control and bidi characters escaped, except those in `keep`
    (e.g. "\\n" for a message of several lines that are all ours)."""
    if not keep:
        return text.translate(_TABLE)
    return text.translate({code: esc for code, esc in _TABLE.items() if chr(code) not in keep})
