"""The one base class of every error this package raises on purpose.

Each error's message is ready for a user: it says what did not happen and, where
there is one, what to do. A command line catches `HotplugError` at its top
and prints the message; anything else reaching it is a bug and keeps its
traceback. Subclasses live beside the code that raises them (`KernelError` in
kernel/sysfs.py, `PolicyError` in device/policy, ...), and may also derive
from the built-in class a caller would expect (`AddressError` is a
`ValueError`). `LocatedError` is one for a place in a file (the policy's
and usbipa.yaml's readers).
"""

from __future__ import annotations

__all__ = ["HotplugError", "LocatedError"]


class HotplugError(Exception):
    """An expected failure, with a message for the user."""


class LocatedError(HotplugError):
    """One problem in a file, located by file, line (1-based) and key path.

    str() is ready for a user: `policy.d/20-lab.yaml:12: rules[1].match.vendor:
    expected 4 hex digits (glob allowed), got 'zz'`. `line` is None for
    problems with a whole file (cannot read it), `key` is None for problems
    not tied to a key (YAML syntax).
    """

    def __init__(self, file: str, line: int | None, key: str | None, message: str) -> None:
        super().__init__(file, line, key, message)
        self.file = file
        self.line = line
        self.key = key
        self.message = message

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return ": ".join(part for part in (where, self.key, self.message) if part)
