"""In-guest cases for tests/vm/test_kernel_judge.py, not part of the suite
(the file name does not match `test_*.py`): one test that oopses the kernel on
purpose, the way issue 11's rollback did, and one that must still run after it."""

from __future__ import annotations

import os

from hotplug.testing.vm import gadget as gd

STUB = "/sys/bus/usb/drivers/usbip-host"


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def test_rebind_of_an_entry_never_bound_through() -> None:
    """`rebind` on a fresh table entry: NULL dereference in do_rebind (6.1). The
    write kills its process, so it runs in a child."""
    gd.load_usbip_modules()
    _write(f"{STUB}/match_busid", "add 9-9")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child dies in the kernel
        try:
            _write(f"{STUB}/rebind", "9-9")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def test_runs_after_the_fault() -> None:
    with open("/proc/sys/kernel/tainted") as f:
        assert f.read().strip() == "0", "this guest's kernel is tainted: not a fresh guest"
