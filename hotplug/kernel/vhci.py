"""vhci_hcd, the virtual host controller on the application side.

Controllers are /sys/devices/platform/vhci_hcd.N; controller 0 carries the
shared `attach`, `detach`, `nports` files and `status` (`status.N` for the
others). Each controller has a high-speed and a SuperSpeed root hub; port
numbers are global. The `status` layout differs between kernels, so the
header line is parsed rather than fixed columns assumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
from collections.abc import Container, Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from hotplug.kernel.sysfs import KernelError, SysfsPaths, SysfsWriter, read_attr
from hotplug.usb import Speed


class PortState(IntEnum):
    # enum usbip_device_status in the kernel's usbip_common.h
    NULL = 4  # free
    NOTASSIGNED = 5
    USED = 6
    ERROR = 7


@dataclass(frozen=True)
class VhciPort:
    hub: str  # "hs" or "ss"
    port: int
    state: int
    speed: int
    devid: int
    sockfd: int
    local_busid: str
    controller: int = 0  # vhci_hcd.N: with `hub`, which root hub the port is on

    @property
    def free(self) -> bool:
        return self.state == PortState.NULL

    @property
    def superspeed(self) -> bool:
        return self.hub == "ss"

    def holds(self, devid: int) -> bool:
        """Whether this port still carries the device `devid` attached to it.

        Right after `attach` the port reads NOTASSIGNED, with devid 0, until the
        hub has reset it (seen on Debian's 6.1 in the VM tests); only a USED
        port shows the devid.
        """
        if self.state == PortState.NOTASSIGNED:
            return True
        return self.state == PortState.USED and self.devid == devid


class VhciStatusError(KernelError):
    pass


_CONTROLLER_RE = re.compile(r"^vhci_hcd\.(\d+)$")


def parse_status(text: str) -> list[VhciPort]:
    """Parse one vhci `status` file (any kernel since the hub column, 4.13)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0].split()
    columns = {name: i for i, name in enumerate(header)}
    needed = ("hub", "port", "sta", "spd", "dev", "local_busid")
    missing = [name for name in needed if name not in columns]
    if missing:
        raise VhciStatusError(
            f"unsupported vhci status header {lines[0]!r} (missing {', '.join(missing)}); "
            "kernels before 4.13 are not supported"
        )
    ports = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) < len(header):
            raise VhciStatusError(f"malformed vhci status line {line!r}")
        sockfd_text = fields[columns["sockfd"]] if "sockfd" in columns else "0"
        ports.append(
            VhciPort(
                hub=fields[columns["hub"]],
                port=int(fields[columns["port"]], 10),
                state=int(fields[columns["sta"]], 10),
                speed=int(fields[columns["spd"]], 10),
                devid=int(fields[columns["dev"]], 16),
                sockfd=int(sockfd_text, 10) if sockfd_text.isdigit() else 0,
                local_busid=fields[columns["local_busid"]],
            )
        )
    return ports


def pick_free_port(
    ports: Iterable[VhciPort], speed: Speed, exclude: Container[int] = ()
) -> VhciPort | None:
    """The lowest free port of the right speed class (SuperSpeed needs an ss hub),
    other than the ports in `exclude` (promised to an export not yet attached)."""
    want_ss = speed.needs_superspeed_port
    for port in sorted(ports, key=lambda p: p.port):
        if port.free and port.superspeed == want_ss and port.port not in exclude:
            return port
    return None


@dataclass(frozen=True)
class PortRecord:
    """The mainline `usbip port` record: who is at the other end of a port."""

    host: str
    tcp_port: str
    busid: str

    def render(self) -> str:
        return f"{self.host} {self.tcp_port} {self.busid}\n"

    @classmethod
    def parse(cls, text: str) -> PortRecord | None:
        fields = text.split()
        if len(fields) != 3:
            return None
        return cls(*fields)


class Vhci(SysfsWriter):
    def __init__(self, paths: SysfsPaths | None = None) -> None:
        self.paths = paths or SysfsPaths.from_env()

    def controllers(self) -> list[Path]:
        try:
            names = os.listdir(self.paths.platform)
        except FileNotFoundError:
            return []
        found = sorted(
            (int(m.group(1)), name) for name in names if (m := _CONTROLLER_RE.match(name))
        )
        return [self.paths.platform / name for _, name in found]

    @property
    def main_controller(self) -> Path:
        return self.paths.platform / "vhci_hcd.0"

    def require_loaded(self) -> None:
        if not (self.main_controller / "attach").exists():
            raise KernelError("vhci-hcd is not loaded: run 'modprobe vhci-hcd' as root")

    def ports(self) -> list[VhciPort]:
        self.require_loaded()
        ports: list[VhciPort] = []
        for index, _ in enumerate(self.controllers()):
            name = "status" if index == 0 else f"status.{index}"
            text = read_attr(self.main_controller / name)
            if text is None:
                continue
            ports.extend(dataclasses.replace(p, controller=index) for p in parse_status(text))
        return ports

    def port(self, number: int) -> VhciPort | None:
        for port in self.ports():
            if port.port == number:
                return port
        return None

    def enumerated(self, port: VhciPort) -> bool:
        """Whether the device on `port` made it through enumeration.

        Not the same as USED: vhci marks a port used when it answers the hub's
        SET_ADDRESS itself, and a device whose descriptors then cannot be read
        stays there, attached, with no USB device behind it (seen on 6.1 in the
        VM tests). Only the device's sysfs directory below the controller's
        root hub (vhci_hcd.N/usbB/B-P) shows it got through.
        """
        if port.state != PortState.USED or "-" not in port.local_busid:
            return False
        bus = port.local_busid.split("-", 1)[0]
        return any((c / f"usb{bus}" / port.local_busid).is_dir() for c in self.controllers())

    def device_dir(self, port: VhciPort) -> Path | None:
        """The USB device behind `port` below its root hub, once enumerated."""
        if "-" not in port.local_busid:
            return None
        bus = port.local_busid.split("-", 1)[0]
        for c in self.controllers():
            path = c / f"usb{bus}" / port.local_busid
            if path.is_dir():
                return path
        return None

    def keep_awake(self, port: VhciPort) -> None:
        """Forbid runtime suspend of the device behind `port` (power/control = on)."""
        path = self.device_dir(port)
        if path is None or not (path / "power/control").exists():
            return
        if read_attr(path / "power/control") != "on":
            self.write(path / "power/control", "on")

    def find_free_port(self, speed: Speed, exclude: Container[int] = ()) -> VhciPort | None:
        return pick_free_port(self.ports(), speed, exclude)

    def device_ids(self, port: VhciPort) -> tuple[int, int] | None:
        """(idVendor, idProduct) of the USB device enumerated behind `port`: what
        its descriptors say, read over the link by the kernel, whatever the
        peer's record claimed. None until it has enumerated."""
        if not self.enumerated(port):
            return None
        bus = port.local_busid.split("-", 1)[0]
        for controller in self.controllers():
            device = controller / f"usb{bus}" / port.local_busid
            vendor, product = read_attr(device / "idVendor"), read_attr(device / "idProduct")
            if vendor and product:
                try:
                    return int(vendor, 16), int(product, 16)
                except ValueError:
                    return None
        return None

    def attach(self, port: int, sock: socket.socket, devid: int, speed: Speed) -> None:
        # The fd is resolved in the writing process: this process must hold `sock`.
        self.write(self.main_controller / "attach", f"{port} {sock.fileno()} {devid} {int(speed)}")

    def detach(self, port: int) -> None:
        self.write(self.main_controller / "detach", str(port))

    # The per-port records of the mainline tools, so that `usbip port` shows the far end.

    def write_record(self, port: int, record: PortRecord) -> None:
        directory = self.paths.vhci_records
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".port{port}.tmp"
        tmp.write_text(record.render())
        os.replace(tmp, directory / f"port{port}")

    def read_record(self, port: int) -> PortRecord | None:
        text = read_attr(self.paths.vhci_records / f"port{port}")
        return PortRecord.parse(text) if text else None

    def remove_record(self, port: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.vhci_records / f"port{port}")
