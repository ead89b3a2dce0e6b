"""Named pause points in export and release: a test seam, inert in production.

The real-kernel fault matrix (tests/vm/guest/test_fault_matrix.py) must pull a
device out, kill a process or cut a link at an exact step of a transaction,
not at a moment found by luck with timing. Each step calls `reach(name)`.

Unless the environment variable USBIP_HOTPLUG_FAULTPOINTS names a directory
(read once, at import), `reach` returns at once. With it, and a file
`<dir>/<name>.pause` present, `reach` creates `<dir>/<name>.reached` and
waits until the test removes the `.pause` file (at most MAX_PAUSE seconds,
so a forgotten file cannot wedge a daemon for good). Nothing else changes:
the step then goes on against whatever the kernel looks like by now.

Names: bind.after-match-add, bind.after-driver-unbind, bind.after-stub-bind
(hotplug/kernel/stub.py), export.start (before the device is read),
export.after-connect, export.after-reply,
export.after-hand-over (hotplug/device/export.py; after-connect and
after-reply are in the plain handshake, hotplug/device/transport.py), release.before-unbind,
release.before-rebind (stub.release), run.after-lock (the daemon holds its
instance lock, before anything else: hotplug/device/daemon_cli.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "USBIP_HOTPLUG_FAULTPOINTS"
MAX_PAUSE = 120.0
POLL = 0.005

_DIR = os.environ.get(ENV) or None


def reach(name: str) -> None:
    """Pause here if the test asked for it (see the module's docstring)."""
    if _DIR is None:
        return
    pause = Path(_DIR, f"{name}.pause")
    if not pause.exists():
        return
    Path(_DIR, f"{name}.reached").touch()
    deadline = time.monotonic() + MAX_PAUSE
    while pause.exists() and time.monotonic() < deadline:
        time.sleep(POLL)
