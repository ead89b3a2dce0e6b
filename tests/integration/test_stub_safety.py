"""Giving a device back never risks an oops (issue 11), against a fake kernel that
keeps usbip-host's table as Linux 6.1 does and records what would have crashed it.

The hazard (docs/PROTOCOL.md, "usbip-host's busid table"): `rebind` calls into
the device usbip-host's probe last recorded for the busid, unchecked: NULL for an
entry no device was bound through, freed memory for one whose device was unplugged
after usbip-host let it go. The `tree` fixture fails a test whose writes would
have done either (FakeTree.kernel_faults).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotplug.kernel.stub import STUB_DRIVER
from hotplug.kernel.sysfs import KernelError, read_device
from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice, FakeUsbipHost
from tests.integration.conftest import DISK
from tests.integration.export_facts import driver


class PulledOutAt(FakeUsbipHost):
    """usbip-host's writer, with the cable pulled (or a write refused) at one step."""

    def __init__(self, tree: FakeTree, step: str, action: str = "unplug") -> None:
        super().__init__(tree.paths, tree.server_socket)
        self.tree, self.step, self.action = tree, step, action

    def write(self, path: Path, text: str) -> None:
        if self.step and path.name == self.step:
            self.step = ""
            if self.action == "unplug":
                self.tree.remove_device(text.strip())
            else:
                raise KernelError(f"writing '{text}' to {path} failed: refused (injected)")
        super().write(path, text)


def table(tree: FakeTree) -> list[str]:
    return tree.stub().table()


@pytest.mark.parametrize("step", ["unbind", "bind"])
def test_pulled_out_mid_bind_rolls_back_without_rebind(tree: FakeTree, step: str) -> None:
    """Issue 11: the device pulled out while usbip-host took it. The old rollback
    wrote `rebind` for an entry no device was ever bound through: NULL dereference
    in do_rebind on 6.1. Now the entry is left (a leftover slot) and nothing oopses."""
    tree.add_device(DISK)
    with pytest.raises(KernelError):
        PulledOutAt(tree, step).bind("1-1")
    assert table(tree) == ["1-1"]
    assert tree.stub().leftovers() == ["1-1"]


def test_failed_bind_after_a_freed_entry_gives_back_safely(tree: FakeTree) -> None:
    """Issue 11: an entry whose device was unplugged while bound points at freed
    memory. A new device at that busid whose bind then fails (driver already taken
    away) used to get `rebind`: general protection fault in __mutex_lock. Now it is
    bound through the entry first, so the entry records it, and given back held."""
    stub = tree.stub()
    tree.add_device(DISK)
    stub.bind("1-1")
    tree.remove_device("1-1")  # unplugged while bound: the entry stays, dangling
    tree.add_device(FakeUsbDevice(busid="1-1", vendor=0x1234, product=0x5678), devnum=3)
    assert driver(tree, "1-1") == "usb"
    with pytest.raises(KernelError, match="injected"):
        PulledOutAt(tree, "bind", action="refuse").bind("1-1")
    assert driver(tree, "1-1") == "usb"
    assert table(tree) == []


def test_release_of_a_bound_device_frees_its_entry(tree: FakeTree) -> None:
    stub = tree.stub()
    tree.add_device(DISK)
    stub.bind("1-1")
    assert driver(tree, "1-1") == STUB_DRIVER
    stub.release("1-1")
    assert driver(tree, "1-1") == "usb"
    assert table(tree) == []


def test_release_of_an_unplugged_device_leaves_its_entry(tree: FakeTree) -> None:
    """The device went while bound: nothing can free its entry safely; release() is a
    no-op, and the slot shows up as a leftover (not an oops, not an error)."""
    stub = tree.stub()
    tree.add_device(DISK)
    stub.bind("1-1")
    tree.remove_device("1-1")
    stub.release("1-1")
    assert stub.leftovers() == ["1-1"]


def test_a_leftover_entry_heals_at_the_next_export_of_its_busid(tree: FakeTree) -> None:
    """Binding a new device through the leftover entry points it at that device, so
    the usual release frees the slot again."""
    stub = tree.stub()
    tree.add_device(DISK)
    stub.bind("1-1")
    tree.remove_device("1-1")
    tree.add_device(DISK, devnum=3)
    stub.bind("1-1")
    stub.release("1-1")
    assert table(tree) == []
    assert driver(tree, "1-1") == "usb"


def _unplug_and_plug_another(tree: FakeTree) -> int:
    """The bound disk at 1-1 pulled out and another device plugged into the same
    socket, caught in the moment before its usual driver probes it (no driver
    yet, as the kernel shows it right after it appears). The disk's devid."""
    stub = tree.stub()
    tree.add_device(DISK)
    stub.bind("1-1")
    exported = read_device(tree.paths, "1-1").devid
    tree.remove_device("1-1")
    tree.add_device(FakeUsbDevice(busid="1-1", vendor=0x1234, product=0x5678), devnum=3)
    stub.write(tree.paths.device_dir("1-1") / "driver/unbind", "1-1")
    assert driver(tree, "1-1") is None
    return exported


def test_release_never_claims_a_device_plugged_in_since(tree: FakeTree) -> None:
    """Withdrawing an unplugged export must not touch the device that took its
    socket. The release used to take a driverless device at a busid in the table
    for one whose bind had not finished, and bound the newcomer to usbip-host (in
    the soak, its usual driver's probe then marked the entry for removal, and the
    busid could never be exported again)."""
    stub = tree.stub()
    exported = _unplug_and_plug_another(tree)
    stub.release("1-1", exported)
    assert driver(tree, "1-1") is None  # left for its usual driver's probe
    assert stub.leftovers() == ["1-1"]
    stub.bind("1-1")  # and it can still be exported, through the same entry
    assert driver(tree, "1-1") == STUB_DRIVER


def test_release_without_knowing_the_device_probes_a_driverless_one(tree: FakeTree) -> None:
    """Not knowing which device it worked on (an old record), release() hands a
    device without a driver to the usual drivers; it never binds it here."""
    stub = tree.stub()
    _unplug_and_plug_another(tree)
    stub.release("1-1")
    assert driver(tree, "1-1") == "usb"
    assert stub.leftovers() == ["1-1"]


def test_held_device_unplugged_during_release_is_safe(tree: FakeTree) -> None:
    """The device goes between usbip-host's unbind and the rebind: the open usbfs
    file keeps it alive, so the rebind touches a dead device, not freed memory."""
    tree.add_device(DISK)
    tree.stub().bind("1-1")
    PulledOutAt(tree, "rebind").release("1-1")
    assert table(tree) == []


def test_the_fake_kernel_oopses_where_linux_does(tree: FakeTree) -> None:
    """The judge itself: the two oopses of issue 11, written on purpose."""
    stub = tree.stub()
    stub.write(tree.paths.stub_driver / "match_busid", "add 7-7")
    with pytest.raises(KernelError):
        stub.write(tree.paths.stub_driver / "rebind", "7-7")
    tree.add_device(DISK)
    stub.bind("1-1")
    stub.write(tree.paths.stub_driver / "unbind", "1-1")
    tree.remove_device("1-1")
    with pytest.raises(KernelError):
        stub.write(tree.paths.stub_driver / "rebind", "1-1")
    faults = tree.kernel_faults()
    assert "NULL pointer dereference" in faults[0]
    assert "general protection fault" in faults[1]
    os.unlink(tree.root / ".fake-kernel-oops")  # judged here, not by the fixture


def test_without_usbfs_the_device_is_not_given_back_blindly(tree: FakeTree) -> None:
    """No /dev/bus/usb (a sandbox that hides it): no reference can be held, so no
    rebind; the error says what the unit needs."""
    tree.add_device(DISK)
    stub = tree.stub()
    stub.bind("1-1")
    for node in (tree.root / "dev/bus/usb").rglob("*"):
        if node.is_file():
            node.unlink()
    with pytest.raises(KernelError, match="DeviceAllow=char-usb_device"):
        stub.release("1-1")
    assert driver(tree, "1-1") == STUB_DRIVER


def test_pulled_out_before_usbip_host_lets_go_frees_the_entry(tree: FakeTree) -> None:
    """Issue 11, fault matrix (release.before-unbind): the device goes just before
    usbip-host's unbind. That write then fails (ENODEV), but the device is gone, so
    there is nothing to give back: no error. The entry still records the device we
    hold open, so the rebind frees it safely instead of leaking the slot."""
    tree.add_device(DISK)
    tree.stub().bind("1-1")
    PulledOutAt(tree, "unbind").release("1-1")
    assert table(tree) == []


def test_table_report_counts_used_and_leaked_slots_and_warns() -> None:
    """`status` says how many of usbip-host's 16 slots are used or leaked, and warns
    before they run out (issue 11, item 3)."""
    from hotplug.device.report import table_report

    class Table:
        def __init__(self, table: list[str], leftovers: list[str]) -> None:
            self._table, self._leftovers = table, leftovers

        def table(self) -> list[str]:
            return self._table

        def leftovers(self) -> list[str]:
            return self._leftovers

    ok = table_report(Table(["1-1", "1-2"], ["1-2"]))  # type: ignore[arg-type]
    assert ok == {
        "slots": 16,
        "used": 2,
        "leaked": 1,
        "leaked_busids": ["1-2"],
        "free": 14,
        "warning": None,
    }
    busids = [f"1-{n}" for n in range(1, 14)]
    low = table_report(Table(busids, busids[1:]))  # type: ignore[arg-type]
    assert low["free"] == 3 and low["leaked"] == 12
    assert low["warning"].startswith("only 3 of usbip-host's 16 busid slots left (12 leaked")


def test_table_report_on_the_fake_kernel(tree: FakeTree) -> None:
    from hotplug.device.report import table_report

    stub = tree.stub()
    tree.add_device(DISK)
    with pytest.raises(KernelError):
        PulledOutAt(tree, "bind").bind("1-1")
    report = table_report(stub)
    assert (report["used"], report["leaked"], report["leaked_busids"]) == (1, 1, ["1-1"])
