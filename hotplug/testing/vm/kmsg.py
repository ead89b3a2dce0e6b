"""The guest kernel's log as the judge of a test: what a fault looks like, and a
reader of /dev/kmsg from a given moment on.

Used by tests/vm/conftest.py (every in-guest test is judged from its start to
the end of its teardown) and by fixtures that want a verdict on a step of
their own, e.g. reloading a driver between tests.
"""

from __future__ import annotations

import os
import re

# What the kernel prints when it is in trouble: oopses, BUG/WARN, lockups and
# hung tasks, sanitizers, list/refcount corruption.
KERNEL_FAULT = re.compile(
    r"BUG:|Oops|general protection fault|WARNING:|Call Trace|Kernel panic|kernel BUG at"
    r"|blocked for more than \d+ seconds|soft lockup|hard LOCKUP|rcu_sched self-detected"
    r"|UBSAN:|KASAN:|refcount_t:|list_add corruption|list_del corruption|Poison overwritten"
)
# Written into the kernel's log by the guest session around each test, so that
# the log (and the host, reading the serial console) knows which test ran when.
TEST_MARK = "usbip-test:"
# In-guest tests ask the host for QEMU's QMP by a kernel log line with this
# mark (hotplug/testing/vm/qmp.py), carrying whatever text the test passed to
# QEMU: never a fault.
QMP_MARK = "usbip-qmp:"


def is_fault_line(line: str) -> bool:
    """A line of the kernel's log that tells of a fault (not one of our marks)."""
    return bool(KERNEL_FAULT.search(line)) and TEST_MARK not in line and QMP_MARK not in line


def kernel_fault_lines(lines: list[str], limit: int = 60) -> list[str]:
    """From the first fault line on (a trace follows it), at most `limit` lines."""
    for i, line in enumerate(lines):
        if is_fault_line(line):
            return lines[i : i + limit]
    return []


class KmsgReader:
    """The kernel's log from now on (/dev/kmsg, non-blocking); a context manager."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def read(self) -> list[str]:
        """The lines logged since the last read, as `[seconds] text`."""
        lines: list[str] = []
        while True:
            try:
                record = os.read(self.fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                return lines
            except BrokenPipeError:  # overwritten before we read it: go on
                continue
            if not record:
                return lines
            head, _, text = record.partition(";")
            stamp = head.split(",")[2] if head.count(",") >= 2 else "0"
            for part in text.rstrip("\n").split("\n"):
                if not part.startswith(" "):  # continuation dictionaries
                    lines.append(f"[{int(stamp) / 1e6:12.6f}] {part}")

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> KmsgReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
