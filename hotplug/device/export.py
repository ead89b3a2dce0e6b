"""Device-side transactions: export a device to a target, and withdraw it.

The order is the one checked on the real kernel (PROTOCOL.md, "the export
handshake"): bind to usbip-host, connect, OP_REQ_EXPORT, read exactly the
8-byte reply, and only after a status-0 reply hand the socket to usbip-host.
Anything that fails rolls back what this transaction did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from hotplug import log
from hotplug.device.transport import ExportError as ExportError  # this module's error too
from hotplug.device.transport import Remote, decline_urbs, exchange_unexport, handshake_export
from hotplug.faultpoints import reach
from hotplug.kernel.stub import STUB_DRIVER, StubStatus, UsbipHost
from hotplug.kernel.sysfs import DeviceNotFound, KernelError, read_device
from hotplug.kernel.vudc import Vudc
from hotplug.usb import Device
from hotplug.wire.protocol import (
    DeviceRecord,
    UnexportStatus,
)

logger = log.get("hotplug.export")


def device_record(device: Device) -> DeviceRecord:
    return DeviceRecord(
        path=device.path,
        busid=device.busid,
        busnum=device.busnum,
        devnum=device.devnum,
        speed=device.speed,
        id_vendor=device.vendor,
        id_product=device.product,
        bcd_device=device.bcd_device,
        device_class=device.device_class,
        device_subclass=device.device_subclass,
        device_protocol=device.device_protocol,
        configuration_value=device.configuration_value,
        num_configurations=device.num_configurations,
        num_interfaces=len(device.interfaces),
    )


@dataclass
class Attempt:
    """What one export transaction did to its device, filled in as it goes.

    `bound`: this transaction set out to take the device from its driver. A
    caller that finds the device bound to usbip-host after a failure owns it
    only then (or if it owned it before): a device some other tool bound
    meanwhile is that tool's (issue 12, finding 10).
    """

    bound: bool = False


def export(
    stub: UsbipHost,
    busid: str,
    remote: Remote,
    adopt_bound: bool = False,
    on_connect: Callable[[socket.socket], None] | None = None,
    attempt: Attempt | None = None,
) -> Device:
    """Bind `busid`, export it to `remote` and hand the link to the kernel.

    Returns the device as exported. On failure, leaves the device as it found it.
    A device some other tool already bound to usbip-host (`usbip bind` for
    usbipd) is refused unless `adopt_bound`: taking it would cut that tool off.
    `on_connect` sees the socket as soon as it is connected, so that another
    thread can cut a handshake short (shutdown() wakes the blocked recv); if it
    raises, the export is rolled back like any other failure. `attempt` (if
    given) learns whether this transaction bound the device.
    """
    attempt = attempt if attempt is not None else Attempt()
    reach("export.start")
    stub.require_loaded()
    before = read_device(stub.paths, busid)
    if before.is_hub:
        raise KernelError(f"{busid} is a USB hub; hubs cannot be exported")
    if before.driver == STUB_DRIVER:
        status = stub.status(busid)
        if status == StubStatus.USED:
            raise KernelError(
                f"{busid} is already in use by usbip-host (exported or imported by another "
                "tool); disconnect it first"
            )
        if not adopt_bound:
            raise KernelError(
                f"{busid} is already bound to usbip-host by another tool (usbip bind?); "
                f"'usbip unbind -b {busid}' first, or pass --force to take it over"
            )
    fields = {"busid": busid, **log_where(remote)}
    bound_here = before.driver != STUB_DRIVER
    attempt.bound = bound_here
    try:
        stub.bind(busid, before)
        # Binding changes the driver, not the ids or bus/dev numbers the record
        # carries: a stat says the device is still there, without reading it all.
        if not stub.paths.device_dir(busid).exists():
            raise DeviceNotFound(busid)
        device = dataclasses.replace(before, driver=STUB_DRIVER)
        with handshake_export(device_record(device), remote, on_connect) as sock:
            _hand_over(sock, lambda s: stub.hand_over(busid, s), busid)
            reach("export.after-hand-over")
        if stub.status(busid) != StubStatus.USED:
            raise ExportError(f"{busid}: usbip-host did not take the connection")
    except BaseException as exc:
        if bound_here:
            with contextlib.suppress(KernelError):
                stub.release(busid, before.devid)
        if (
            isinstance(exc, (KernelError, ExportError, OSError))
            and not stub.paths.device_dir(busid).exists()
        ):
            # Pulled out mid-export: whichever write or check came next failed with
            # a message about sysfs, not about what the user did.
            gone = KernelError(
                f"{busid} was unplugged while it was being exported to {remote};"
                " plug it in again to retry"
            )
            log.event(
                logger, logging.WARNING, f"export failed: {gone}", event="export-failed", **fields
            )
            raise gone from exc
        log.event(logger, logging.WARNING, f"export failed: {exc}", event="export-failed", **fields)
        raise
    log.event(logger, logging.INFO, f"exported {busid} to {remote}", event="exported", **fields)
    return device


def unexport(
    stub: UsbipHost,
    busid: str,
    remote: Remote,
    device: Device | None = None,
    release: bool = True,
    devid: int | None = None,
) -> UnexportStatus:
    """Ask `remote` to detach `busid`, then give the device back to its driver.

    Idempotent: an unknown busid on the far side is not an error. The device is
    released even when the target cannot be reached (the kernel then closes the
    link and the far side's port is freed by its own kernel). `devid`, when the
    caller knows which device it exported: a different device plugged in at
    `busid` since is left alone (UsbipHost.release).
    """
    if device is None:
        try:
            device = read_device(stub.paths, busid)
        except KernelError:
            device = None
    record = device_record(device) if device is not None else bare_record(busid)
    try:
        return request_unexport(record, remote)
    finally:
        if release and device is not None:
            stub.release(busid, devid)
        elif release:
            # Unplugged: usbip-host keeps the busid in match_busid. Ask it to
            # forget (Debian's 6.1 keeps the entry all the same, seen in the VM).
            with contextlib.suppress(KernelError):
                stub.release(busid, devid)


def log_where(remote: Remote) -> dict[str, str]:
    """Journal fields for the far end: TARGET is the policy's name for it when there
    is one (so `journalctl USBIP_TARGET=lab` shows the whole story), ADDRESS the address."""
    return {"target": remote.name or str(remote), "address": str(remote)}


def bare_record(busid: str) -> DeviceRecord:
    """The record of a device that is gone: the far side finds it by busid alone."""
    return DeviceRecord.bare(busid)


def request_unexport(record: DeviceRecord, remote: Remote) -> UnexportStatus:
    """Send OP_REQ_UNEXPORT on a new connection; DETACHED or NOT_FOUND, else ExportError."""
    fields = {"busid": record.busid, **log_where(remote)}
    try:
        raw = exchange_unexport(record, remote)
        known = {int(s) for s in UnexportStatus}
        status = UnexportStatus(raw) if raw in known else UnexportStatus.FAILED
        if status == UnexportStatus.FAILED:
            raise ExportError(f"{remote} failed to detach {record.busid}")
    except ExportError as exc:
        log.event(logger, logging.WARNING, f"unexport: {exc}", event="unexport-failed", **fields)
        raise
    log.event(
        logger,
        logging.INFO,
        f"unexported {record.busid} from {remote}"
        + (" (it was not attached there)" if status == UnexportStatus.NOT_FOUND else ""),
        event="unexported",
        **fields,
    )
    return status


def _hand_over(sock: socket.socket, hand: Callable[[socket.socket], None], busid: str) -> None:
    """`hand(sock)` gives the link to the kernel. If that fails, the far side has
    attached already (its reply said so) and its hub is asking for the device:
    its requests are answered before the caller closes the link, or its root hub
    waits seconds on them (hotplug/wire/urbs.py)."""
    try:
        hand(sock)
    except BaseException:
        declined = decline_urbs(sock)
        logger.debug("%s: answered %d requests on the abandoned link", busid, declined)
        raise


def export_gadget(vudc: Vudc, name: str, remote: Remote) -> DeviceRecord:
    """Export the gadget bound to vUDC `name` (no bind/unbind: it is ours already)."""
    vudc.require(name)
    if vudc.status(name) == 2:
        raise KernelError(f"{name} is already exported; disconnect it first")
    record = vudc.record(name)
    fields = {"busid": name, **log_where(remote)}
    try:
        with handshake_export(record, remote) as sock:
            _hand_over(sock, lambda s: vudc.hand_over(name, s), name)
        if vudc.status(name) != 2:
            raise ExportError(f"{name}: usbip-vudc did not take the connection")
    except BaseException as exc:
        log.event(logger, logging.WARNING, f"export failed: {exc}", event="export-failed", **fields)
        raise
    log.event(logger, logging.INFO, f"exported {name} to {remote}", event="exported", **fields)
    return record


def unexport_gadget(vudc: Vudc, name: str, remote: Remote) -> UnexportStatus:
    vudc.require(name)
    try:
        record = vudc.record(name)
    except KernelError:
        record = bare_record(name)
    try:
        return request_unexport(record, remote)
    finally:
        vudc.stop(name)
