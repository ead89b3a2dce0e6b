"""The one base class of every error this package raises on purpose.

Each error's message is ready for a user: it says what did not happen and, where
there is one, what to do. A command line catches `HotplugError` at its top
and prints the message; anything else reaching it is a bug and keeps its
traceback. Subclasses live beside the code that raises them (`KernelError` in
kernel/sysfs.py, `PolicyError` in device/policy, ...), and may also derive
from the built-in class a caller would expect (`AddressError` is a
`ValueError`).
"""

from __future__ import annotations

__all__ = ["HotplugError"]


class HotplugError(Exception):
    """An expected failure, with a message for the user."""
