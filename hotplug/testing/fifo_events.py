"""Device events as JSON lines on a FIFO: the event source tests use in place of udev.

`usbip-hotplug run --events FIFO` (a hidden option) reads it; `write_event`
(or any writer) sends {"action": "add"|"remove", "busid": "1-1"} lines, and
{"action": "waiting"|"driver", "busid": NAME} where udev would report a root
hub, an interface or a driver to a daemon that holds devices back. The
device's details are read from sysfs (the fake tree in tests), as the daemon
does for udev's coldplug.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from pathlib import Path

from hotplug import log
from hotplug.device.events import DeviceEvent
from hotplug.errors import HotplugError
from hotplug.kernel.sysfs import BUSID_RE, DeviceNotFound, SysfsPaths, list_devices, read_device
from hotplug.usb import Device

# The daemon's events logger: these lines tell the same story as udev's.
logger = log.get("hotplug.events")


class NotAFifo(HotplugError):
    """--events names something that is not a FIFO."""


class JsonLinesSource:
    """Events as JSON lines on a FIFO: {"action": "add"|"remove", "busid": "1-1"}.

    The device's details are read from sysfs (the fake tree in tests), as the
    daemon does for udev's coldplug. Hidden `run --events FIFO` option.
    """

    def __init__(self, fifo: Path, paths: SysfsPaths) -> None:
        self.fifo = fifo
        self.paths = paths
        if not fifo.exists():
            os.mkfifo(fifo, 0o600)
        elif not stat.S_ISFIFO(fifo.stat().st_mode):
            raise NotAFifo(f"{fifo} is not a FIFO")
        self._fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        # Hold a writer of our own: without one the FIFO reads as EOF (always
        # readable) each time a test's writer closes, and add_reader would spin.
        self._keepalive = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        self._buffer = b""

    def coldplug(self) -> list[Device]:
        return list_devices(self.paths)

    def fileno(self) -> int:
        return self._fd

    def read_events(self) -> list[DeviceEvent]:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for line in lines:
            event = self._parse(line)
            if event is not None:
                events.append(event)
        return events

    def _parse(self, line: bytes) -> DeviceEvent | None:
        if not line.strip():
            return None
        try:
            data = json.loads(line)
            action, busid = data["action"], data["busid"]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring malformed event line %r", line[:200])
            return None
        if action in ("waiting", "driver") and isinstance(busid, str):
            return DeviceEvent(action, busid)  # as udev reports them while claiming
        if action not in ("add", "remove") or not isinstance(busid, str):
            logger.warning("ignoring event %r: expected action add or remove and a busid", data)
            return None
        if not BUSID_RE.match(busid):
            logger.warning("ignoring event for %r: not a USB busid", busid)
            return None
        if action == "remove":
            return DeviceEvent("remove", busid)
        try:
            device = read_device(self.paths, busid)
        except DeviceNotFound:
            log.event(logger, logging.INFO, f"{busid} left before we could look", busid=busid)
            return None
        return DeviceEvent("add", busid, device)

    def claims(self, on: bool) -> None:
        """The writer sends "waiting" and "driver" lines itself when it wants them."""

    def close(self) -> None:
        for fd in (self._fd, self._keepalive):
            with contextlib.suppress(OSError):
                os.close(fd)


def write_event(fifo: Path, action: str, busid: str) -> None:
    """Send one event to a daemon reading `fifo` (for tests and debugging)."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: no daemon reading
    try:
        os.write(fd, json.dumps({"action": action, "busid": busid}).encode() + b"\n")
    finally:
        os.close(fd)
