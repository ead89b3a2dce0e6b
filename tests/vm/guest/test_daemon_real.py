"""The hotplug daemon (`usbip-hotplug run`) on the real kernel, inside the test VM.

The device side and the application side are the same guest: configfs gadgets
on dummy_hcd are the USB devices, `usbipa` on 127.0.0.1 attaches them to
vhci_hcd. The daemon runs as systemd would start it, minus systemd: no
`--events`, so plug and unplug reach it from udev through pyudev's netlink
monitor. Every verdict comes from the kernel (usbip_status, driver links,
match_busid, vhci_hcd's status files) and from the data on the disk behind
vhci_hcd, not from the daemon's own books; logs are only used to tell apart
things the kernel cannot (an OP_UNEXPORT sent, a port attached anew).

One usbipa and one daemon serve the whole module (`rig`); each test states
what it needs running (`rig.ensure`) and leaves its gadgets to `make_gadget`,
whose clean-up unplugs them (the daemon then unexports).

Not covered here: the sandboxing in systemd/usbip-hotplug.service. It needs
systemd as PID 1, and virtme-ng boots without systemd; the daemon runs here
as plain root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hotplug.testing.vm import gadget as gd
from hotplug.testing.vm.evdev import KEY_A, drain, read_keys
from tests.vm.guest.daemon_rig import (
    ENUM,
    SYS,
    TARGET,
    WORK,
    KiB,
    MiB,
    Rig,
    alive,
    assert_disk_works,
    detached_by_unexport,
    in_match_table,
    new_serial,
    plug_and_export,
    policy_text,
    released,
    rig_in,
    serials,
    unexport_seen,
    used_ports,
    vhci_disk,
)
from tests.vm.guest.programs import HOTPLUG, run


@pytest.fixture(scope="module")
def rig(usbip_modules: None, gadget_modules: list[str]) -> Iterator[Rig]:
    with rig_in(WORK, Rig) as r:
        yield r


@pytest.fixture
def show_logs(rig: Rig) -> Iterator[None]:
    """The daemon's and usbipa's logs in the test's captured output (shown on failure)."""
    marks = {log: len(log.read_text()) for log in rig.daemon_logs + rig.usbipa_logs}
    yield
    for log in rig.daemon_logs + rig.usbipa_logs:
        text = log.read_text()[marks.get(log, 0) :]
        if text:
            print(f"----- {log.name} (this test)\n{text}")


# --------------------------------------------------------------------------- cases


@pytest.mark.usefixtures("show_logs")
def test_daemon_real_target_down_at_plug_then_up(
    rig: Rig,
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    """The daemon starts and a matching disk is plugged while usbipa is down;
    once usbipa is up the disk is exported within the retry backoff (max 2 s)."""
    rig.ensure(usbipa=False, daemon=False)
    rig.set_policy(policy_text())
    rig.settle()
    if not alive(rig.daemon):
        rig.start_daemon()
        record_property("s_daemon_start", f"{rig.start_seconds:.2f}")
    g = make_gadget(size=2 * MiB, serial=new_serial())
    g.plug()
    busid = g.wait_busid(timeout=ENUM)
    failed = re.compile(rf"export of {re.escape(busid)} to lab failed: .*Connection refused")
    gd.wait_until(
        lambda: len(failed.findall(rig.daemon_text())) >= 2,
        timeout=ENUM,
        what="two refused export attempts in the daemon's log",
    )
    # Each failed attempt is rolled back: nothing attached, the device its driver's again.
    assert gd.exported_port(busid) is None and not used_ports()
    gd.wait_until(lambda: released(busid), timeout=30, what=f"{busid} given back between tries")
    row = next(d for d in rig.status_now()["devices"] if d["busid"] == busid)
    assert row["state"] in ("retrying", "exporting"), row
    assert "Connection refused" in (row["last_error"] or ""), row

    rig.start_usbipa()
    record_property("s_usbipa_start", f"{rig.start_seconds:.2f}")
    t0 = time.monotonic()
    port = gd.wait_until(
        lambda: gd.exported_port(busid), timeout=ENUM, what=f"{busid} exported once usbipa is up"
    )
    took = time.monotonic() - t0
    record_property("s_up_to_exported", f"{took:.2f}")
    assert port.hub == "hs"
    assert re.search(
        rf"attached {re.escape(busid)} from 127\.0\.0\.1 on port {port.port}", rig.usbipa_text()
    )
    assert took < 30, f"exported {took:.1f} s after usbipa came up (backoff max is 2 s)"


@pytest.mark.usefixtures("show_logs")
def test_daemon_real_plug_exports_and_unplug_unexports(
    rig: Rig,
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    """Vendor + serial glob match: plug -> exported, the disk works through vhci;
    unplug -> OP_UNEXPORT to usbipa, port free, the daemon's record dropped."""
    rig.ensure(usbipa=True)
    rig.set_policy(policy_text())
    rig.settle()
    g = make_gadget(size=4 * MiB, serial=new_serial())
    busid, port, t_export = plug_and_export(g)
    record_property("s_plug_to_exported", f"{t_export:.2f}")
    assert port.hub == "hs" and port.devid == gd.devid_of(busid)
    assert in_match_table(busid)
    assert json.loads(rig.record(busid).read_text())["by"] == "daemon"

    t0 = time.monotonic()
    remote, disk = vhci_disk(g)
    record_property("s_exported_to_vhci_disk", f"{time.monotonic() - t0:.2f}")
    assert remote.serial == g.serial and remote.busid == port.local_busid
    assert_disk_works(g, disk, 1 * MiB)
    # The copy behind vhci_hcd matches the policy too, but is never exported back.
    assert (
        gd.busid_driver(remote.busid) == "usb" and gd.usb_attr(remote.busid, "usbip_status") is None
    )
    assert len(used_ports()) == 1

    t1 = time.monotonic()
    g.unplug(timeout=ENUM)
    gd.wait_until(lambda: not used_ports(), timeout=ENUM, what=f"the port of {busid} freed")
    gd.wait_until(
        lambda: unexport_seen(rig.usbipa_text(), busid), timeout=30, what="OP_UNEXPORT at usbipa"
    )
    gd.wait_until(lambda: not g.vhci_devices(), timeout=ENUM, what="the vhci copy gone")
    gd.wait_until(lambda: not rig.record(busid).exists(), timeout=30, what="the record dropped")
    record_property("s_unplug_to_unexported", f"{time.monotonic() - t1:.2f}")
    assert not any(s["busid"] == busid for s in rig.usbipa_status())
    assert f"{busid} unplugged" in rig.daemon_text()


@pytest.mark.usefixtures("show_logs")
def test_daemon_real_replug_same_socket_then_another_udc(
    rig: Rig,
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    """Unplugged while exported, then plugged back into the same socket (same busid):
    exported again. Then moved to another socket (another dummy UDC, new busid):
    exported again there."""
    rig.ensure(usbipa=True)
    rig.set_policy(policy_text())
    rig.settle()
    g = make_gadget(size=2 * MiB, serial=new_serial())
    first_udc = gd.free_udcs()[0]
    old, _, _ = plug_and_export(g, first_udc)
    g.unplug(timeout=ENUM)
    gd.wait_until(lambda: not used_ports(), timeout=ENUM, what=f"the port of {old} freed")

    # The same socket again. usbip-host on 6.1 keeps a busid that was unplugged
    # while bound in match_busid ("del" is a no-op once its device is gone); the
    # device must still go to its usual driver first and then be exported again.
    same, port, took = plug_and_export(g, first_udc)
    record_property("s_replug_same_socket_to_exported", f"{took:.2f}")
    assert same == old and port.devid == gd.devid_of(same)
    gd.wait_until(g.vhci_devices, timeout=ENUM, what="the re-plugged disk behind vhci")
    g.unplug(timeout=ENUM)
    gd.wait_until(lambda: not used_ports(), timeout=ENUM, what=f"the port of {old} freed")

    other = next(u for u in gd.free_udcs() if u != first_udc)
    new, port, took = plug_and_export(g, other)
    record_property("s_replug_other_socket_to_exported", f"{took:.2f}")
    assert new != old, f"{first_udc} and {other} gave the same busid {new}"
    assert port.devid == gd.devid_of(new)
    remote = gd.wait_until(g.vhci_devices, timeout=ENUM, what="the moved disk behind vhci")[0]
    assert remote.busid == port.local_busid
    assert rig.usbipa_text().count(f"attached {old} from") == 2
    assert rig.usbipa_text().count(f"attached {new} from") == 1


@pytest.mark.usefixtures("show_logs")
def test_daemon_real_usbipa_killed_export_survives_and_is_adopted(
    rig: Rig,
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    """SIGKILL usbipa: the kernel keeps the link (the disk still works); a new usbipa
    adopts the port from its records + vhci status without a new attach."""
    rig.ensure(usbipa=True)
    rig.set_policy(policy_text())
    rig.settle()
    g = make_gadget(size=2 * MiB, serial=new_serial())
    busid, port, _ = plug_and_export(g)
    remote, disk = vhci_disk(g)
    assert_disk_works(g, disk, 0)

    rig.stop_usbipa(signal.SIGKILL)
    assert gd.exported_port(busid) == port
    assert_disk_works(g, disk, 256 * KiB)  # nobody in user space carries the data
    assert gd.exported_port(busid) == port

    t0 = time.monotonic()
    rig.start_usbipa()
    record_property("s_usbipa_restart", f"{time.monotonic() - t0:.2f}")
    log = rig.usbipa_logs[-1].read_text()  # the new usbipa's
    assert f"adopted port {port.port}: {busid} from 127.0.0.1" in log, log
    assert "attached " not in log, log
    (session,) = [s for s in rig.usbipa_status() if s["busid"] == busid]
    assert session["port"] == port.port and session["state"] == "attached"
    assert session["local_busid"] == remote.busid
    assert gd.exported_port(busid) == port
    assert_disk_works(g, disk, 512 * KiB)
    assert rig.daemon_text().count(f"exporting {busid} to lab") == 1

    # Adopted means managed: the unplug's OP_UNEXPORT is handled by the new usbipa.
    g.unplug(timeout=ENUM)
    gd.wait_until(lambda: not used_ports(), timeout=ENUM, what=f"the port of {busid} freed")
    gd.wait_until(
        lambda: unexport_seen(rig.usbipa_text(), busid), timeout=30, what="OP_UNEXPORT at usbipa"
    )


@pytest.mark.usefixtures("show_logs")
def test_daemon_real_link_cut_on_the_application_side_reexports(
    rig: Rig,
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    """`usbip detach` on the application side: usbip-host sees the link die, the daemon
    notices within a poll and exports again; the disk comes back."""
    rig.ensure(usbipa=True)
    rig.set_policy(policy_text())
    rig.settle()
    g = make_gadget(size=2 * MiB, serial=new_serial())
    busid, port, _ = plug_and_export(g)
    vhci_disk(g)
    attaches = f"attached {busid} from"
    assert rig.usbipa_text().count(attaches) == 1

    t0 = time.monotonic()
    gd.run(["usbip", "detach", "-p", str(port.port)])
    gd.wait_until(
        lambda: rig.usbipa_text().count(attaches) == 2, timeout=60, what="a second attach"
    )
    again = gd.wait_until(
        lambda: gd.exported_port(busid), timeout=ENUM, what=f"{busid} exported again"
    )
    took = time.monotonic() - t0
    record_property("s_detach_to_reexported", f"{took:.2f}")
    assert f"{busid}: link to lab lost" in rig.daemon_text()
    remote, disk = vhci_disk(g)
    assert remote.busid == again.local_busid
    assert_disk_works(g, disk, 0)
    record_property("s_detach_to_disk_back", f"{time.monotonic() - t0:.2f}")
    assert took < 30, f"re-exported {took:.1f} s after the detach (poll 0.5 s, backoff max 2 s)"


@pytest.mark.usefixtures("show_logs")
def test_daemon_real_daemon_restart_readopts_without_dropping_the_device(
    rig: Rig,
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    """SIGKILL the daemon and start it again: it adopts the export as the kernel holds
    it; the vhci port, its devid and the disk behind vhci never change."""
    rig.ensure(usbipa=True)
    rig.set_policy(policy_text())
    rig.settle()
    g = make_gadget(size=2 * MiB, serial=new_serial())
    busid, port, _ = plug_and_export(g)
    remote, disk = vhci_disk(g)
    remote_devnum = gd.usb_attr(remote.busid, "devnum")
    disk_dev = (disk.sysfs / "dev").read_text().strip()

    with gd.UdevWatcher() as watcher:
        rig.stop_daemon(signal.SIGKILL)
        assert gd.exported_port(busid) == port
        t0 = time.monotonic()
        rig.start_daemon()
        record_property("s_daemon_restart", f"{time.monotonic() - t0:.2f}")
        log = rig.daemon_logs[-1].read_text()  # the new daemon's
        assert f"adopted {busid}: still exported to lab ({TARGET})" in log, log
        # Watch the kernel while the new daemon polls it (every 0.5 s) a few times.
        events: list[tuple[str, Any]] = []
        window = time.monotonic() + 3.0
        while time.monotonic() < window:
            assert gd.exported_port(busid) == port
            events += watcher.events(0.1)
        row = next(d for d in rig.status_now()["devices"] if d["busid"] == busid)
        assert row["state"] == "exported" and row["target"] == "lab", row
        assert_disk_works(g, disk, 128 * KiB)
        events += watcher.events(0.1)
        removed = [d.sys_name for action, d in events if action in ("remove", "unbind")]
    assert gd.exported_port(busid) == port  # same port, same devid, same local busid
    assert gd.usb_attr(remote.busid, "devnum") == remote_devnum  # never enumerated again
    assert (disk.sysfs / "dev").read_text().strip() == disk_dev
    assert remote.busid not in removed and disk.name not in removed, removed
    assert busid not in removed, removed
    assert rig.usbipa_text().count(f"attached {busid} from") == 1
    assert f"exporting {busid}" not in rig.daemon_logs[-1].read_text()


@pytest.mark.usefixtures("show_logs")
def test_daemon_real_invalid_policy_edit_keeps_old_policy_then_valid_edit_unexports(
    rig: Rig,
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    rig.ensure(usbipa=True)
    rig.set_policy(policy_text())
    rig.settle()
    try:
        broken = policy_text(broken=True)
        line = broken.splitlines().index('      vendor: "zz"') + 1
        where = f"{rig.policy}:{line}: rules[1].match.vendor"
        rig.write_policy(broken)
        gd.wait_until(
            lambda: where in rig.daemon_text(), timeout=30, what="the error logged with file:line"
        )
        assert "the previous one stays in force" in rig.daemon_text()
        status = rig.hotplug_status()["daemon"]
        assert (status["policy_error"] or "").startswith(f"{rig.policy}:{line}:"), status

        # The old policy is the one in force: a newly plugged matching disk is exported.
        g = make_gadget(size=2 * MiB, serial=new_serial())
        busid, port, took = plug_and_export(g)
        record_property("s_plug_to_exported_old_policy", f"{took:.2f}")
        gd.wait_until(g.vhci_devices, timeout=ENUM, what=f"{g.serial} behind vhci_hcd")

        # A valid edit that no longer matches it: unexported (usbipa is told), given back.
        t0 = time.monotonic()
        rig.set_policy(policy_text(serial_glob="NOMATCH*"))
        gd.wait_until(lambda: released(busid), timeout=ENUM, what=f"{busid} given back")
        gd.wait_until(lambda: not used_ports(), timeout=ENUM, what=f"the port of {busid} freed")
        record_property("s_edit_to_unexported", f"{time.monotonic() - t0:.2f}")
        log = rig.usbipa_text()
        assert detached_by_unexport(log, busid, port.port), log
        g.wait_block_device(timeout=ENUM)  # its disk is back on this side
        assert not rig.record(busid).exists()
    finally:
        rig.set_policy(policy_text())


@pytest.mark.usefixtures("show_logs")
def test_daemon_real_sigterm_unexports_and_gives_back(
    rig: Rig,
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    """Default on_stop (unexport): SIGTERM withdraws the device and hands it back."""
    rig.ensure(usbipa=True)
    rig.set_policy(policy_text())
    rig.settle()
    g = make_gadget(size=2 * MiB, serial=new_serial())
    busid, port, _ = plug_and_export(g)
    gd.wait_until(g.vhci_devices, timeout=ENUM, what=f"{g.serial} behind vhci_hcd")

    t0 = time.monotonic()
    assert rig.stop_daemon(signal.SIGTERM) == 0
    record_property("s_sigterm_to_exit", f"{time.monotonic() - t0:.2f}")
    # All of it done before the daemon exited: no waiting here.
    assert released(busid), (gd.busid_driver(busid), gd.interface_drivers(busid), used_ports())
    assert not used_ports()
    assert not rig.record(busid).exists()
    log = rig.usbipa_text()
    assert detached_by_unexport(log, busid, port.port), log
    assert "stopping (unexporting exported devices)" in rig.daemon_text()
    g.wait_block_device(timeout=ENUM)
    gd.wait_until(lambda: not g.vhci_devices(), timeout=ENUM, what="the vhci copy gone")


def test_daemon_real_udev_source_on_a_real_plug(
    make_gadget: Callable[..., gd.MassStorageGadget], usbip_modules: None
) -> None:
    """hotplug.device.udev's real UdevSource (pyudev netlink monitor + udev database) turns a
    real plug and unplug into the `Device` the daemon decides on."""
    from hotplug.device.udev import UdevSource, enumerate_devices
    from hotplug.kernel.sysfs import SysfsPaths

    source = UdevSource()
    try:
        # A serial no test policy matches: a daemon still running must leave it alone.
        serial = f"UDV{os.getpid()}x{next(serials)}"
        g = make_gadget(size=MiB, serial=serial, id_product=0x0105, product="Udev Disk")
        g.plug()
        busid = g.wait_busid(timeout=ENUM)

        def read(timeout: float) -> list[Any]:
            ready, _, _ = select.select([source.fileno()], [], [], timeout)
            return source.read_events() if ready else []

        deadline = time.monotonic() + ENUM
        seen = []
        configured = None
        while configured is None and time.monotonic() < deadline:
            for ev in read(1.0):
                seen.append((ev.action, ev.busid, ev.device.driver if ev.device else None))
                dev = ev.device
                if ev.action == "add" and ev.busid == busid and dev and dev.driver == "usb":
                    configured = dev
        assert configured is not None, f"no add/bind event for {busid} with driver usb: {seen}"
        assert configured.serial == g.serial and configured.vid_pid == "1d6b:0105"
        assert configured.product_name == "Udev Disk" and configured.manufacturer == "usbip-hotplug"
        assert configured.path == str(g.find_device().path)  # type: ignore[union-attr]
        assert configured.devid == gd.devid_of(busid) and not configured.on_vhci
        assert [i.klass for i in configured.interfaces] == [0x08]
        assert configured.properties.get("ID_SERIAL_SHORT") == g.serial

        listed = [d for d in source.coldplug() if d.busid == busid]
        assert len(listed) == 1 and listed[0].serial == g.serial and listed[0].driver == "usb"
        assert listed[0].properties.get("ID_VENDOR_ID") == "1d6b"
        assert all(d.path.startswith("/sys/") for d in source.coldplug())
        assert busid in {d.busid for d in enumerate_devices(SysfsPaths())}

        g.unplug(timeout=ENUM)
        deadline = time.monotonic() + ENUM
        removed = False
        while not removed and time.monotonic() < deadline:
            removed = any(ev.action == "remove" and ev.busid == busid for ev in read(1.0))
        assert removed, f"no remove event for {busid}"
        assert busid not in {d.busid for d in source.coldplug()}
    finally:
        source.close()


# --------------------------------------------------------------------------- issue 14

AUTOPROBE = SYS / "bus/usb/drivers_autoprobe"
FOLLOW = 8  # seconds: an unplug, a configfs write and a plug take 1-3 s here
KEY_REPORT_A = bytes([0, 0, gd.HID_KEY_A, 0, 0, 0, 0, 0])


def follow_policy() -> str:
    """The module's policy, plus a rule that follows its devices (serial FOL*)."""
    return policy_text() + (
        "  - name: firmware\n    match:\n"
        '      id: "1d6b:0104"\n      serial: "FOL*"\n'
        f"    export: lab\n    follow: {FOLLOW}\n"
    )


def claim_policy() -> str:
    return policy_text() + "settings:\n  claim: before-probe\n"


def autoprobe() -> str:
    return AUTOPROBE.read_text().strip()


def key_arrives(kb: gd.HidKeyboardGadget) -> bool:
    """A key pressed on the gadget reaches this machine's own input device for it."""
    (node,) = gd.wait_until(kb.local_event_devices, timeout=ENUM, what="the keyboard's eventN")
    fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
    try:
        drain(fd)
        hidg = kb.wait_hidg_device(timeout=ENUM)
        kb.send_report(hidg, KEY_REPORT_A)
        kb.send_report(hidg, bytes(8))
        return (KEY_A, 1) in read_keys(fd, timeout=30)
    finally:
        os.close(fd)


@pytest.fixture
def autoprobe_back(rig: Rig) -> Iterator[None]:
    """Whatever a claim test leaves, the next test (of any module) finds the kernel's
    default: the module's own policy, autoprobe on, nothing waiting for a driver."""
    for module in ("usbhid", "hid_generic", "evdev"):
        gd.modprobe(module)
    yield
    if alive(rig.daemon):
        with contextlib.suppress(Exception):
            rig.set_policy(policy_text())
    if autoprobe() != "1":
        from hotplug.kernel.autoprobe import UsbBus

        UsbBus().restore()


@pytest.mark.usefixtures("show_logs")
def test_daemon_real_follow_a_device_that_comes_back_as_another_product(
    rig: Rig,
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    """Issue 14, item 2: a disk exported by a rule with `follow:` re-plugs on the same
    UDC as 1d6b:0105 (no rule matches that): within the window it goes to the same
    target, and the daemon logs the ids it came back with; after the window it is
    left to its usual driver."""
    rig.ensure(usbipa=True)
    rig.set_policy(follow_policy())
    rig.settle()
    g = make_gadget(size=2 * MiB, serial=f"FOL{os.getpid()}x{next(serials)}")
    udc = gd.free_udcs()[0]
    busid, _, _ = plug_and_export(g, udc)

    g.unplug(timeout=ENUM)
    g.set_product(0x0105)  # the "bootloader"
    t0 = time.monotonic()
    same, port, _ = plug_and_export(g, udc)
    record_property("s_replug_as_0105_to_exported", f"{time.monotonic() - t0:.2f}")
    assert same == busid and port.devid == gd.devid_of(busid)
    remote = gd.wait_until(g.vhci_devices, timeout=ENUM, what="the 0105 disk behind vhci")[0]
    assert (remote.attr("idVendor"), remote.attr("idProduct")) == ("1d6b", "0105")
    text = rig.daemon_text()
    assert re.search(rf"{re.escape(busid)}: came back as 1d6b:0105 [0-9.]+ s after 1d6b:0104", text)
    assert re.search(rf"plugged in: {re.escape(busid)} \(1d6b:0105 .*follows 1d6b:0104", text)

    # Too late: gone for longer than the window, it comes back as any device would.
    g.unplug(timeout=ENUM)
    gd.wait_until(lambda: not used_ports(), timeout=ENUM, what=f"the port of {busid} freed")
    gd.wait_until(
        lambda: "no longer following it" in rig.daemon_text(),
        timeout=FOLLOW + ENUM,
        what="the follow window to close",
    )
    g.plug(udc)
    gd.wait_until(
        lambda: any(
            d["busid"] == busid and d["state"] == "not matched" for d in rig.status_now()["devices"]
        ),
        timeout=ENUM,
        what=f"the daemon's decision on {busid}",
    )
    g.wait_block_device(timeout=ENUM)  # its own usb-storage
    assert gd.exported_port(busid) is None and gd.busid_driver(busid) == "usb"


@pytest.mark.usefixtures("show_logs", "autoprobe_back")
def test_daemon_real_claim_before_probe_one_enumeration_keyboard_stays(
    rig: Rig,
    make_gadget: Callable[..., gd.MassStorageGadget],
    make_keyboard: Callable[..., gd.HidKeyboardGadget],
    record_property: Callable[[str, object], None],
) -> None:
    """Issue 14, item 3: with settings.claim: before-probe the exported disk reaches
    usbip-host untouched: usbmon on its dummy_hcd bus counts one SET_CONFIGURATION,
    the application side's (three after probe: the generic driver's, its unconfigure
    as it lets go, the application side's; bench/claim_compare.py). A keyboard the
    policy leaves alone gets its drivers at once and types."""
    rig.ensure(usbipa=True)
    rig.set_policy(claim_policy())
    rig.settle()
    assert autoprobe() == "0"
    disk = make_gadget(size=2 * MiB, serial=new_serial())
    udc = gd.free_udcs()[0]
    with gd.SetConfigurationCounter(gd.dummy_busnum(udc)) as usbmon:
        busid, _, took = plug_and_export(disk, udc)
        record_property("s_plug_to_exported", f"{took:.2f}")
        # On one kernel the vhci-side copy is held back too; the daemon hands it over.
        _, vdisk = vhci_disk(disk)
        assert_disk_works(disk, vdisk, offset=MiB)
        devnum = int(gd.usb_attr(busid, "devnum") or 0)
        assert usbmon.count(devnum) == 1, usbmon.seen
    # usbip-host configured it for the application side; no driver here has its interface.
    assert gd.usb_attr(busid, "bConfigurationValue") == "1"
    assert set(gd.interface_drivers(busid).values()) == {None}

    kb = make_keyboard()
    t0 = time.monotonic()
    kb.plug()
    kbusid = kb.wait_busid(timeout=ENUM)
    assert key_arrives(kb)
    record_property("s_keyboard_plug_to_key", f"{time.monotonic() - t0:.2f}")
    assert gd.busid_driver(kbusid) == "usb" and gd.exported_port(kbusid) is None
    assert set(gd.interface_drivers(kbusid).values()) == {"usbhid"}

    rig.set_policy(policy_text())  # back to after-probe: the kernel probes by itself again
    assert autoprobe() == "1"


@pytest.mark.usefixtures("show_logs", "autoprobe_back")
def test_daemon_real_claim_before_probe_survives_sigkill(
    rig: Rig,
    make_keyboard: Callable[..., gd.HidKeyboardGadget],
    record_property: Callable[[str, object], None],
) -> None:
    """Issue 14, item 3, fail-safe: the daemon SIGKILLed while drivers_autoprobe is 0.
    A keyboard plugged then waits with no driver until the next start hands it over;
    stopped (SIGTERM), the daemon puts autoprobe back itself; started and killed
    again, the keyboard waits until `restore-autoprobe` (the unit's ExecStopPost)
    hands it over."""
    rig.ensure(usbipa=True)
    rig.set_policy(claim_policy())
    rig.settle()
    assert autoprobe() == "0"
    rig.stop_daemon(signal.SIGKILL)
    kb = make_keyboard()
    kb.plug()
    busid = kb.wait_busid(timeout=ENUM)
    # Held back, and nobody decides: no driver, no configuration (not a timing
    # question: with autoprobe 0 the kernel never probes it by itself).
    assert gd.busid_driver(busid) is None and not gd.usb_attr(busid, "bConfigurationValue")

    rig.start_daemon()  # the next start
    record_property("s_daemon_start", f"{rig.start_seconds:.2f}")
    assert gd.busid_driver(busid) == "usb" and key_arrives(kb)
    assert autoprobe() == "0"  # and holding back again
    assert "a previous run did not end cleanly" in rig.daemon_text()

    assert rig.stop_daemon(signal.SIGTERM) == 0
    assert autoprobe() == "1"
    rig.start_daemon()
    assert autoprobe() == "0"
    rig.stop_daemon(signal.SIGKILL)
    kb.unplug(timeout=ENUM)
    kb.plug()
    busid = kb.wait_busid(timeout=ENUM)
    assert gd.busid_driver(busid) is None
    t0 = time.monotonic()
    result = run(HOTPLUG, ["restore-autoprobe"], rig.env(), timeout=90, work=rig.work)
    record_property("s_restore_autoprobe", f"{time.monotonic() - t0:.2f}")
    assert result.returncode == 0, result.stderr
    assert autoprobe() == "1" and gd.busid_driver(busid) == "usb" and key_arrives(kb)
    assert f"handed to their drivers: {busid}" in result.stderr
