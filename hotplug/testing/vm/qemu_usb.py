"""QEMU's own USB host controller and device models in the test VM.

Host side (`host_setup`, called by guest.py): the guest boots with a
`qemu-xhci` controller (USB 2 and USB 3 root ports, nothing plugged), an
audio backend for `usb-audio` (QEMU's `wav` driver writing a file on the
host), and a sparse disk image for `usb-storage`, both in the exchange
directory that the guest sees read-only (`/run/usbip-vm/exchange`), so that a
test can read what QEMU wrote to them.

Guest side (the rest): devices plugged and unplugged over QMP
(`hotplug.testing.vm.qmp.qmp`), found in sysfs by the serial number each is
given, and their copies behind vhci_hcd.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotplug.testing.vm import gadget as gd
from hotplug.testing.vm.qmp import GUEST_EXCHANGE, QmpError, qmp

__all__ = [
    "QemuDevice",
    "QemuUsb",
    "device_with",
    "host_setup",
    "manifest",
    "wait_below",
]

XHCI_ID = "usbipvm-xhci"
XHCI_BUS = f"{XHCI_ID}.0"  # the USB bus of the controller, for device_add
XHCI_PORTS = 4  # USB 2 and USB 3 root ports each
AUDIODEV_ID = "usbipvm-audio"
# The audio backend's format: usb-audio's own (48 kHz, stereo, S16), so QEMU
# neither resamples nor converts what the guest plays.
AUDIO_RATE = 48000
AUDIO_CHANNELS = 2
AUDIO_FILE = "audio.wav"
DISK_FILE = "disk.img"
DISK_BYTES = 64 << 20
# A virtio-serial bus of our own: the far end of usb-serial is a port on it.
VSERIAL_ID = "usbipvm-vser"
MANIFEST = "qemu-usb.json"  # in the exchange directory: where things are on the host


def host_setup(exchange: Path) -> list[str]:
    """Create the disk image and the manifest in the host's `exchange` directory;
    return QEMU's options for the controller and the audio backend."""
    with open(exchange / DISK_FILE, "wb") as f:
        f.truncate(DISK_BYTES)  # sparse: costs nothing until written
    manifest = {
        "host_dir": str(exchange),
        "xhci_bus": XHCI_BUS,
        "vserial_bus": f"{VSERIAL_ID}.0",
        "audiodev": AUDIODEV_ID,
        "audio_file": AUDIO_FILE,
        "audio_rate": AUDIO_RATE,
        "audio_channels": AUDIO_CHANNELS,
        "disk_file": DISK_FILE,
        "disk_bytes": DISK_BYTES,
    }
    (exchange / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    audio = ",".join(
        [
            f"wav,id={AUDIODEV_ID}",
            f"path={exchange / AUDIO_FILE}",
            f"out.frequency={AUDIO_RATE}",
            f"out.channels={AUDIO_CHANNELS}",
            "out.format=s16",
        ]
    )
    return [
        "-device",
        f"qemu-xhci,id={XHCI_ID},p2={XHCI_PORTS},p3={XHCI_PORTS}",
        "-device",
        f"virtio-serial-pci,id={VSERIAL_ID}",
        "-audiodev",
        audio,
    ]


def manifest(exchange: str | Path) -> dict[str, Any]:
    """Inside the guest: what host_setup wrote."""
    data: dict[str, Any] = json.loads((Path(exchange) / MANIFEST).read_text())
    return data


# ---------------------------------------------------------------------------
# guest side

DEFAULT_TIMEOUT = 90.0  # enumeration under emulation on a busy host
SERIAL_PREFIX = "QMP"  # the serial number of every device plugged here
_numbers = itertools.count(1)


@dataclass
class QemuDevice:
    """One QEMU USB device model plugged over QMP, known to the guest by its serial."""

    driver: str  # QEMU's model: usb-kbd, usb-storage, ...
    qdev_id: str  # QEMU's id, for device_del
    serial: str
    port: str  # on the xhci bus: "2" a root port, "1.3" port 3 of the hub on root port 1
    properties: dict[str, Any] = field(default_factory=dict)

    def find_device(self) -> gd.UsbDevice | None:
        """The device behind the guest's xhci (not a copy behind vhci_hcd)."""
        return next((d for d in gd.usb_devices(serial=self.serial) if not d.on_vhci), None)

    def wait_busid(self, *, timeout: float = DEFAULT_TIMEOUT) -> str:
        def busid() -> str | None:
            d = self.find_device()
            return d.busid if d else None

        return gd.wait_until(
            busid,
            timeout=timeout,
            what=f"{self.driver} {self.serial} enumerated by the guest",
        )

    def vhci_devices(self) -> list[gd.UsbDevice]:
        """Copies of this device attached through vhci_hcd (the application side)."""
        return [d for d in gd.usb_devices(serial=self.serial) if d.on_vhci]


class QemuUsb:
    """Inside the guest: QEMU USB devices, drives and character devices added over
    QMP. `close()` takes away whatever is still there, newest first."""

    def __init__(self, exchange: str | Path = GUEST_EXCHANGE) -> None:
        self.exchange = Path(exchange)
        self.manifest = manifest(self.exchange)
        self.host_dir = Path(self.manifest["host_dir"])  # the same directory, seen by QEMU
        self.bus = str(self.manifest["xhci_bus"])
        # QMP commands that take back what was added, in order of addition.
        self._undo: list[tuple[str, dict[str, Any]]] = []

    def _name(self, kind: str) -> str:
        return f"uvm-{kind}-{os.getpid()}-{next(_numbers)}"

    def _add(
        self, command: str, arguments: dict[str, Any], undo: tuple[str, dict[str, Any]]
    ) -> None:
        qmp(command, arguments)
        self._undo.append(undo)

    def host_file(self, name: str) -> Path:
        """A file QEMU wrote in the exchange directory, as the guest sees it."""
        return self.exchange / name

    # -- devices

    def plug(self, driver: str, port: str, **properties: Any) -> QemuDevice:
        """device_add `driver` on `port` of the xhci bus, with a serial of its own."""
        dev = QemuDevice(driver, self._name(driver), "", port, dict(properties))
        dev.serial = f"{SERIAL_PREFIX}{dev.qdev_id.removeprefix('uvm-').replace('-', '')}"
        args = {"driver": driver, "id": dev.qdev_id, "bus": self.bus, "port": port}
        self._add(
            "device_add",
            {**args, "serial": dev.serial, **properties},
            ("device_del", {"id": dev.qdev_id}),
        )
        return dev

    def plug_hub(self, port: str) -> str:
        """A usb-hub (QEMU's is full speed, 8 ports) on `port`; its qdev id."""
        qdev_id = self._name("hub")
        self._add(
            "device_add",
            {"driver": "usb-hub", "id": qdev_id, "bus": self.bus, "port": port},
            ("device_del", {"id": qdev_id}),
        )
        return qdev_id

    def unplug(self, dev: QemuDevice, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """device_del, then wait until the guest's kernel has seen it go."""
        qmp("device_del", {"id": dev.qdev_id})
        with contextlib.suppress(ValueError):
            self._undo.remove(("device_del", {"id": dev.qdev_id}))
        gd.wait_until(
            lambda: dev.find_device() is None,
            timeout=timeout,
            what=f"{dev.driver} {dev.serial} gone from the guest after device_del",
        )

    # -- what devices are backed by

    def add_drive(self) -> str:
        """The host's disk image (DISK_FILE) as a block node; its node name."""
        node = self._name("drive")
        filename = str(self.host_dir / str(self.manifest["disk_file"]))
        self._add(
            "blockdev-add",
            {"driver": "raw", "node-name": node, "file": {"driver": "file", "filename": filename}},
            ("blockdev-del", {"node-name": node}),
        )
        return node

    def add_serial_line(self) -> tuple[str, str]:
        """A character device for usb-serial whose far end is a virtio port in this
        guest: QEMU connects a socket chardev of its own to the device's one and
        gives it to a `virtserialport`. Returns (the chardev for usb-serial's
        `chardev` property, the guest's /dev/virtio-ports/ path of the far end)."""
        device_end, far_end, port_name = (
            self._name("ser"),
            self._name("serpeer"),
            self._name("vport"),
        )
        sock = {"type": "unix", "data": {"path": str(self.host_dir / f"{device_end}.sock")}}
        self._add(
            "chardev-add",
            {
                "id": device_end,
                "backend": {
                    "type": "socket",
                    "data": {"addr": sock, "server": True, "wait": False},
                },
            },
            ("chardev-remove", {"id": device_end}),
        )
        self._add(
            "chardev-add",
            {"id": far_end, "backend": {"type": "socket", "data": {"addr": sock, "server": False}}},
            ("chardev-remove", {"id": far_end}),
        )
        self._add(
            "device_add",
            {
                "driver": "virtserialport",
                "id": port_name,
                "bus": str(self.manifest["vserial_bus"]),
                "chardev": far_end,
                "name": port_name,
            },
            ("device_del", {"id": port_name}),
        )
        path = f"/dev/virtio-ports/{port_name}"
        gd.wait_until(lambda: os.path.exists(path), timeout=DEFAULT_TIMEOUT, what=path)
        return device_end, path

    def close(self, *, timeout: float = 30.0) -> list[str]:
        """Undo everything still added, newest first; the errors, if any. A drive or
        chardev is busy until QEMU has finished deleting its device: retried."""
        errors: list[str] = []
        while self._undo:
            command, arguments = self._undo.pop()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    qmp(command, arguments)
                    break
                except QmpError as e:
                    if "not found" in str(e).lower() or "failed to find" in str(e).lower():
                        break  # gone already (device_del, chardev-remove; blockdev-del)
                    if time.monotonic() > deadline:
                        errors.append(f"{command} {arguments}: {e}")
                        break
                    time.sleep(0.2)  # QEMU finishes a device_del in its own time
        return errors


def device_with(path_glob: str, dev: gd.UsbDevice) -> Path | None:
    """The first sysfs path below `dev` matching `path_glob` (e.g. `*:*/ttyUSB*`)."""
    return next(iter(sorted(dev.path.glob(path_glob))), None)


def wait_below(dev: gd.UsbDevice, path_glob: str, *, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Wait until a driver made `path_glob` below `dev` (a tty, a sound card...)."""
    return gd.wait_until(
        lambda: device_with(path_glob, dev), timeout=timeout, what=f"{dev.busid}/{path_glob}"
    )
