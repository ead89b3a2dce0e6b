"""Fixtures for tests that run INSIDE the test VM (as root, real kernel).

Write in-guest tests as plain pytest tests in this directory; the host runs
them in the VM (see tests/vm/conftest.py). Available here:

- `gadget_modules` (session): dummy_hcd (4 UDCs, high speed), libcomposite,
  usb_f_mass_storage loaded, configfs mounted; returns the dummy UDC names.
  A test that loads dummy_hcd anew (`gd.reload_dummy_hcd`, e.g. SuperSpeed)
  carries the marker `reloads_dummy_hcd`, puts the session's parameters back
  in a fixture, and runs with its module after every other module.
- `gadgets` (function): a list; gadgets appended to it (any `gd.Gadget`)
  are unplugged and removed after the test, newest first.
- `usbip_modules` (session): usbip-host and vhci-hcd loaded.
- `make_gadget` (function): factory `make_gadget(**MassStorageGadget kwargs)`
  returning a created (not plugged) gadget with a unique serial; all of them
  are unplugged and removed after the test, in reverse order.
- `make_keyboard` (function): the same for `HidKeyboardGadget` (a boot
  keyboard whose reports are written to /dev/hidgN).
- `plugged_gadget` (function): one 4 MiB mass-storage gadget plugged on a free
  dummy UDC, enumerated (busid known) and with its disk present.
- `usbipd` (function): Debian's classic `usbipd -D` on 127.0.0.1:3240,
  killed after the test.

Helpers live in `hotplug.testing.vm.gadget` (wait_until, MassStorageGadget,
UdevWatcher, block devices, vhci status parsing) and `hotplug.testing.vm.evdev`
(key events). Our programs as the tests run them: `oneshot` (usbipa alone and
the one-shot commands), `daemon_rig` (usbipa and the daemon, restartable, and
the kernel facts the daemon tests judge by), `systemd_rig` (systemd as PID 1
for the shipped units), `programs` (forked children). Test modules import from
those, never from each other.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hotplug.testing.vm import gadget as gd

IN_VM = os.environ.get("USBIP_IN_VM") == "1"
RELOADS_DUMMY_HCD = "reloads_dummy_hcd"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a test that reloads dummy_hcd run last, that test last in its
    module: every other module sees only the session's dummy_hcd, even if putting
    it back failed. The module stays in one piece (its module fixtures once)."""
    if not IN_VM:
        return
    last = {item.path for item in items if item.get_closest_marker(RELOADS_DUMMY_HCD)}
    if not last:
        return
    first_seen: dict[Path, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(item.path, i)
    items.sort(
        key=lambda item: (
            item.path in last,
            first_seen[item.path] if item.path in last else 0,
            item.get_closest_marker(RELOADS_DUMMY_HCD) is not None,
        )
    )


@pytest.fixture(scope="session", autouse=True)
def _only_inside_the_vm() -> None:
    # Session scope + autouse: runs before any other fixture here, so nothing
    # touches the host's kernel if these tests are ever run directly.
    if not IN_VM:
        pytest.skip("runs only inside the test VM (USBIP_IN_VM=1); `pytest -m vm` boots it")
    if os.geteuid() != 0:
        pytest.skip("in-guest tests need root")


@pytest.fixture(scope="session")
def gadget_modules() -> Iterator[list[str]]:
    udcs = gd.load_gadget_modules(dummy_udcs=4)
    yield udcs
    gd.remove_all_gadgets()


@pytest.fixture(scope="session")
def usbip_modules() -> None:
    gd.load_usbip_modules()


@pytest.fixture
def gadgets(gadget_modules: list[str]) -> Iterator[list[gd.Gadget]]:
    """The gadgets a test made; all unplugged and removed after it, newest first."""
    made: list[gd.Gadget] = []
    yield made
    errors: list[str] = []
    for g in reversed(made):
        try:
            g.remove()
        except Exception as e:  # keep cleaning the others
            errors.append(f"{g.name}: {e}")
    if errors:
        raise RuntimeError("gadget clean-up failed: " + "; ".join(errors))


@pytest.fixture
def make_gadget(gadgets: list[gd.Gadget]) -> Callable[..., gd.MassStorageGadget]:
    def factory(**kwargs: Any) -> gd.MassStorageGadget:
        g = gd.MassStorageGadget(**kwargs)
        gadgets.append(g)
        return g.create()

    return factory


@pytest.fixture
def make_keyboard(gadgets: list[gd.Gadget]) -> Callable[..., gd.HidKeyboardGadget]:
    def factory(**kwargs: Any) -> gd.HidKeyboardGadget:
        g = gd.HidKeyboardGadget(**kwargs)
        gadgets.append(g)
        return g.create()

    return factory


@pytest.fixture
def plugged_gadget(
    make_gadget: Callable[..., gd.MassStorageGadget],
) -> gd.MassStorageGadget:
    g = make_gadget(size=4 << 20)
    g.plug()
    g.wait_block_device()
    return g


USBIPD_PORT = 3240


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def usbipd(usbip_modules: None) -> Iterator[int]:
    """Debian's usbipd daemon (-D) on port 3240; yields the port."""
    if shutil.which("usbipd") is None or shutil.which("usbip") is None:
        pytest.skip("usbip/usbipd missing: install the Debian package usbip on the host")
    pidfile = Path("/run/usbipd-test.pid")
    pidfile.unlink(missing_ok=True)
    assert not _listening(USBIPD_PORT), "something already listens on 3240"
    gd.run(["usbipd", "-D", f"--pid={pidfile}", "--tcp-port", str(USBIPD_PORT)])
    gd.wait_until(lambda: _listening(USBIPD_PORT), timeout=30, what="usbipd on 127.0.0.1:3240")
    try:
        yield USBIPD_PORT
    finally:
        pid = int(pidfile.read_text().strip()) if pidfile.is_file() else None
        if pid:
            os.kill(pid, signal.SIGTERM)
            gd.wait_until(lambda: not _alive(pid), timeout=30, what="usbipd to exit")
        pidfile.unlink(missing_ok=True)
