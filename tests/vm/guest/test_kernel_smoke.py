"""Smoke tests of the real-kernel harness, run inside the test VM.

They prove the guest has what the product's VM tests rely on: the USB/IP
modules and their sysfs files, configfs gadgets that enumerate as real USB
devices with udev events and a disk, and that Debian's classic usbip tools
move data intact through usbip-host + vhci-hcd on this kernel.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hotplug.testing.vm import gadget as gd

MiB = 1 << 20
SYS = Path("/sys")
USBIP_HOST = SYS / "bus/usb/drivers/usbip-host"
VHCI0 = SYS / "devices/platform/vhci_hcd.0"

# vhci status on Debian 6.1 (drivers/usb/usbip/vhci_sysfs.c), one header per
# status file, then one line per port of that controller:
#   "hub port sta spd dev      sockfd local_busid"
#   "hs  0000 004 000 00000000 000000 0-0"        (free port)
# hub: hs|ss; port: 4 digits, GLOBAL across controllers; sta: 3 digits
# (4 free, 5 not assigned, 6 used, 7 error); spd: 3 digits (USB speed enum);
# dev: 8 hex digits (devid = busnum << 16 | devnum); sockfd: 6 digits;
# local_busid: the attached device's busid on this (vhci) side, or 0-0.
STATUS_HEADER = "hub port sta spd dev      sockfd local_busid"
PORT_LINE = re.compile(r"^(hs|ss)  \d{4} \d{3} \d{3} [0-9a-f]{8} \d{6} \S+$")


def _read(p: Path) -> str:
    return p.read_text().strip()


def test_usbip_modules_and_vhci_layout(
    usbip_modules: None, record_property: Callable[[str, object], None]
) -> None:
    gd.load_vudc()
    assert USBIP_HOST.is_dir()
    for f in ("match_busid", "bind", "unbind", "rebind"):
        assert (USBIP_HOST / f).exists(), f
    for f in ("attach", "detach", "nports", "status"):
        assert (VHCI0 / f).exists(), f
    assert (SYS / "class/udc/usbip-vudc.0").exists()
    vudc = SYS / "devices/platform/usbip-vudc.0"
    assert (vudc / "usbip_sockfd").exists() and (vudc / "usbip_status").exists()

    controllers = sorted(
        (p for p in (SYS / "devices/platform").glob("vhci_hcd.*")),
        key=lambda p: int(p.name.split(".")[1]),
    )
    nports = int(_read(VHCI0 / "nports"))
    files = gd.vhci_status_files()
    # controller 0 has `status`, controller N has `status.N`, all on vhci_hcd.0
    assert len(files) == len(controllers)
    per_controller = nports // len(controllers)
    per_hub = per_controller // 2
    all_ports: list[gd.VhciPort] = []
    for n, f in enumerate(files):
        lines = f.read_text().splitlines()
        assert lines[0] == STATUS_HEADER, f"{f}: {lines[0]!r}"
        assert len(lines) == 1 + per_controller
        for ln in lines[1:]:
            assert PORT_LINE.match(ln), f"{f}: {ln!r}"
        ports = gd.parse_vhci_status(f.read_text())
        # Global numbering: controller n owns ports n*per .. n*per+per-1, its
        # high-speed hub's ports first, then its SuperSpeed hub's.
        assert [p.port for p in ports] == list(range(n * per_controller, (n + 1) * per_controller))
        assert [p.hub for p in ports] == ["hs"] * per_hub + ["ss"] * per_hub
        all_ports += ports
    assert all(p.free and p.local_busid == "0-0" and p.devid == 0 for p in all_ports)
    assert len(all_ports) == nports
    # Each controller registers two root hubs (usb buses): hs then ss.
    for c in controllers:
        hubs = sorted(c.glob("usb[0-9]*"), key=lambda p: int(p.name[3:]))
        assert len(hubs) == 2
        speeds = [_read(h / "speed") for h in hubs]
        assert speeds == ["480", "5000"], (c.name, speeds)
        assert [int(_read(h / "maxchild")) for h in hubs] == [per_hub, per_hub]
    # Debian 6.1: CONFIG_USBIP_VHCI_NR_HCS=8, CONFIG_USBIP_VHCI_HC_PORTS=15,
    # so nports = 8 * 2 * 15 = 240 (record it; the numbers are config).
    record_property("vhci_controllers", len(controllers))
    record_property("vhci_ports_per_hub", per_hub)
    record_property("vhci_nports", nports)


def test_gadget_enumerates_with_udev_and_disk(
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    g = make_gadget(
        size=4 * MiB, id_vendor=0x1D6B, id_product=0x0104, manufacturer="UsbipTest", product="Disk"
    )
    udc = gd.free_udcs()[0]
    with gd.UdevWatcher(subsystem="usb", device_type="usb_device") as watch:
        t0 = time.monotonic()
        g.plug(udc)
        added = watch.wait_for("add", lambda d: gd.udev_serial(d) == g.serial)
        t_udev = time.monotonic() - t0
        busid = g.wait_busid()
        assert added.sys_name == busid
        dev = g.find_device()
        assert dev is not None and not dev.on_vhci
        assert dev.attr("idVendor") == "1d6b" and dev.attr("idProduct") == "0104"
        assert dev.attr("manufacturer") == "UsbipTest" and dev.attr("product") == "Disk"
        # dummy_udc.N pairs with dummy_hcd.N: the device sits behind it.
        assert f"/dummy_hcd.{udc.split('.')[1]}/" in str(dev.path)
        disk = g.wait_block_device()
        t_disk = time.monotonic() - t0
        assert disk.size_bytes == 4 * MiB
        assert set(gd.interface_drivers(busid).values()) == {"usb-storage"}
        assert gd.busid_driver(busid) == "usb"
        links = gd.wait_until(g.by_id_links, timeout=30, what="/dev/disk/by-id link (udev)")
        assert all(os.path.realpath(p) == disk.dev for p in links), links

        t1 = time.monotonic()
        g.unplug()  # waits until the busid is gone from sysfs
        watch.wait_for("remove", lambda d: d.sys_name == busid)
        t_remove = time.monotonic() - t1
    assert g.find_busid() is None
    assert not gd.block_devices(busid)
    assert not os.path.exists(disk.dev) or gd.wait_until(
        lambda: not os.path.exists(disk.dev), timeout=30, what=f"{disk.dev} to go"
    )
    record_property("busid", busid)
    record_property("s_plug_to_udev_add", f"{t_udev:.2f}")
    record_property("s_plug_to_disk", f"{t_disk:.2f}")
    record_property("s_unplug_to_remove", f"{t_remove:.2f}")


def _port_of(local_busid: str) -> gd.VhciPort | None:
    for p in gd.vhci_ports():
        if p.local_busid == local_busid and p.status == 6:
            return p
    return None


def test_classic_usbip_interop_moves_data_intact(
    plugged_gadget: gd.MassStorageGadget,
    usbipd: int,
    record_property: Callable[[str, object], None],
) -> None:
    g = plugged_gadget
    busid = g.wait_busid()
    usual = gd.busid_driver(busid)
    assert usual == "usb"
    sysdev = SYS / "bus/usb/devices" / busid
    bound = False
    attached_port: int | None = None
    timings: dict[str, float] = {}
    try:
        t = time.monotonic()
        gd.run(["usbip", "bind", "-b", busid])
        bound = True
        assert gd.busid_driver(busid) == "usbip-host"
        assert _read(sysdev / "usbip_status") == "1"  # available
        timings["bind"] = time.monotonic() - t

        t = time.monotonic()
        gd.run(["usbip", "attach", "-r", "127.0.0.1", "-b", busid])
        remote = gd.wait_until(g.vhci_devices, what="the device to appear behind vhci_hcd")[0]
        port = gd.wait_until(lambda: _port_of(remote.busid), what="a used vhci port")
        attached_port = port.port
        assert _read(sysdev / "usbip_status") == "2"  # used
        busnum, devnum = int(_read(sysdev / "busnum")), int(_read(sysdev / "devnum"))
        assert port.devid == (busnum << 16) | devnum
        assert port.hub == "hs" and port.speed == 3  # high speed
        assert port.sockfd > 0
        record_property("vhci_used_line", _status_line(port.port))
        disk = gd.wait_block_device(remote.busid)
        timings["attach_to_disk"] = time.monotonic() - t
        assert disk.size_bytes == g.size
        # A second disk with the same serial, through vhci:
        assert remote.serial == g.serial and remote.busid != busid

        data = os.urandom(MiB)
        t = time.monotonic()
        back = gd.odirect_write_read(disk.dev, MiB, data)
        timings["write_read_1MiB"] = time.monotonic() - t
        assert back == data, "read back through vhci differs"
        assert g.read_backing(MiB, MiB) == data, "gadget's backing file differs"

        t = time.monotonic()
        gd.run(["usbip", "detach", "-p", str(attached_port)])
        gd.wait_until(
            lambda: all(p.free for p in gd.vhci_ports() if p.port == attached_port),
            what=f"vhci port {attached_port} to be free",
        )
        attached_port = None
        gd.wait_until(lambda: not g.vhci_devices(), what="the vhci copy to disappear")
        timings["detach"] = time.monotonic() - t

        t = time.monotonic()
        gd.run(["usbip", "unbind", "-b", busid])
        bound = False
        gd.wait_until(lambda: gd.busid_driver(busid) == usual, what=f"{busid} back on {usual}")
        gd.wait_until(
            lambda: set(gd.interface_drivers(busid).values()) == {"usb-storage"},
            what=f"{busid} interfaces back on usb-storage",
        )
        gd.wait_block_device(busid)
        timings["unbind_to_disk"] = time.monotonic() - t
        assert not (sysdev / "usbip_status").exists()
    finally:
        if attached_port is not None:
            gd.run(["usbip", "detach", "-p", str(attached_port)])
        if bound:
            gd.run(["usbip", "unbind", "-b", busid])
    for k, v in timings.items():
        record_property(f"s_{k}", f"{v:.2f}")


def _status_line(port: int) -> str:
    for f in gd.vhci_status_files():
        for ln in f.read_text().splitlines()[1:]:
            if int(ln.split()[1]) == port:
                return ln
    return ""


def test_gadget_on_vudc_is_exportable_not_enumerated(
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    g = make_gadget(size=MiB, id_vendor=0x1D6B, id_product=0x0104, bcd_device=0x0102)
    udc = g.plug_vudc(0)
    assert udc == "usbip-vudc.0" and g.udc == udc
    pdir = g.vudc_platform_dir()
    assert pdir is not None
    # dev_desc: the 18-byte USB device descriptor, little-endian, once bound.
    desc = gd.wait_until(lambda: (pdir / "dev_desc").read_bytes(), timeout=30, what="vudc dev_desc")
    assert len(desc) == 18 and desc[0] == 18 and desc[1] == 1
    assert int.from_bytes(desc[8:10], "little") == 0x1D6B
    assert int.from_bytes(desc[10:12], "little") == 0x0104
    assert int.from_bytes(desc[12:14], "little") == 0x0102
    assert _read(pdir / "usbip_status") == "1"  # available, not yet exported
    speed = _read(SYS / "class/udc" / udc / "current_speed")
    record_property("vudc_current_speed_before_export", speed)
    assert g.find_busid() is None  # nothing enumerates locally
    g.unplug()
    assert g.udc is None


@pytest.mark.parametrize("n", [2])
def test_several_gadgets_at_once(make_gadget: Callable[..., gd.MassStorageGadget], n: int) -> None:
    gadgets = [make_gadget(size=MiB) for _ in range(n)]
    for g in gadgets:
        g.plug()
    busids = {g.wait_busid() for g in gadgets}
    assert len(busids) == n
    for g in gadgets:
        assert g.wait_block_device().size_bytes == MiB
