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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from hotplug import log
from hotplug.address import Endpoint
from hotplug.device import Device, Speed
from hotplug.faultpoints import reach
from hotplug.kernel.stub import STUB_DRIVER, StubStatus, UsbipHost
from hotplug.kernel.sysfs import DeviceNotFound, KernelError, read_device
from hotplug.kernel.vudc import Vudc
from hotplug.protocol import (
    HEADER_SIZE,
    DeviceRecord,
    ExportRequest,
    ExportStatus,
    Op,
    ProtocolError,
    UnexportRequest,
    UnexportStatus,
    data_phase_command,
    decode_header,
    encode,
)
from hotplug.transport import Remote, TransportError, run_tunnel

logger = log.get("hotplug.export")


class ExportError(Exception):
    """An export or unexport did not happen; the message says why."""


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    handshake: float = 5.0
    # How long the kernel may keep unacknowledged data before it declares the
    # link dead (TCP_USER_TIMEOUT), and keepalive probing for an idle link.
    user_timeout: float = 30.0
    keepalive_idle: int = 10
    keepalive_interval: int = 5
    keepalive_count: int = 3


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


def tune_socket(sock: socket.socket, timeouts: Timeouts) -> None:
    """Set what the kernel needs to notice a dead peer once it owns the socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, timeouts.keepalive_idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, timeouts.keepalive_interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, timeouts.keepalive_count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeouts.user_timeout * 1000))


def connect(endpoint: Endpoint, timeouts: Timeouts) -> socket.socket:
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeouts.connect)
    except TimeoutError as exc:
        raise ExportError(f"{endpoint}: connection timed out after {timeouts.connect:g} s") from exc
    except socket.gaierror as exc:
        raise ExportError(f"{endpoint}: cannot resolve host: {exc.strerror}") from exc
    except OSError as exc:
        raise ExportError(f"{endpoint}: {exc.strerror or exc}") from exc
    tune_socket(sock, timeouts)
    return sock


def recv_exactly(sock: socket.socket, size: int, deadline: float, endpoint: Endpoint) -> bytes:
    """Read exactly `size` bytes and not one more: what follows belongs to the kernel."""
    chunks = bytearray()
    while len(chunks) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ExportError(f"{endpoint}: no reply within the handshake timeout")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(size - len(chunks))
        except TimeoutError as exc:
            raise ExportError(f"{endpoint}: no reply within the handshake timeout") from exc
        except ConnectionResetError as exc:
            if chunks:
                raise ExportError(f"{endpoint}: connection reset while waiting for reply") from exc
            # usbipa closed unread what no allow entry could admit; our request
            # still unread there turns its close into a reset (a race with EOF).
            raise ExportError(
                f"{endpoint}: connection closed before replying (does the application side's "
                "allow list name this machine's address?)"
            ) from exc
        except OSError as exc:
            raise ExportError(f"{endpoint}: {exc.strerror or exc} while waiting for reply") from exc
        if not chunk:
            if chunks:
                raise ExportError(
                    f"{endpoint}: connection closed after {len(chunks)} of {size} bytes"
                )
            # usbipa closes at once, unread, what no allow entry could admit.
            raise ExportError(
                f"{endpoint}: connection closed before replying (does the application side's "
                "allow list name this machine's address?)"
            )
        chunks += chunk
    return bytes(chunks)


def _exchange(
    sock: socket.socket, request: bytes, expected: Op, endpoint: Endpoint, timeouts: Timeouts
) -> int:
    deadline = time.monotonic() + timeouts.handshake
    sock.settimeout(timeouts.handshake)
    try:
        sock.sendall(request)
    except OSError as exc:
        raise ExportError(f"{endpoint}: sending request failed: {exc.strerror or exc}") from exc
    reply = recv_exactly(sock, HEADER_SIZE, deadline, endpoint)
    return _reply_status(reply, expected, endpoint)


def _reply_status(reply: bytes, expected: Op, endpoint: Endpoint | Remote) -> int:
    command = data_phase_command(reply)
    if command is not None:
        # Issue 16: an application side that writes `attach` before its reply
        # lets the kernel's first URB overtake it. Our caller closes the
        # connection, so that side's vhci frees the port, and rolls back.
        code = int.from_bytes(reply[:4], "big")
        raise ExportError(
            f"{endpoint}: bad reply: the application side sent data-phase bytes (looks like "
            f"{command} 0x{code:08x}) before its {expected.name.replace('REP_', 'OP_REP_')}: "
            "it attached before replying; closed the connection (retry, or fix the "
            "application side to reply first)"
        )
    try:
        header = decode_header(reply)
    except ProtocolError as exc:
        raise ExportError(f"{endpoint}: bad reply: {exc}") from exc
    if header.code != expected:
        raise ExportError(
            f"{endpoint}: bad reply: op code 0x{header.code:04x}, not {expected.name}"
        )
    return header.status


def _endpoint(endpoint: Endpoint | Remote) -> Endpoint:
    """A plain (tcp) remote is an Endpoint: it takes the plain path, unchanged."""
    return endpoint.endpoint if isinstance(endpoint, Remote) else endpoint


def _secure_handshake(
    record: DeviceRecord,
    remote: Remote,
    timeouts: Timeouts,
    on_connect: Callable[[socket.socket], None] | None,
) -> socket.socket:
    """handshake_export for tls:// and wss://: the exchange runs in a relay process.

    Returns the kernel's end of this session's loopback pair; the relay process
    holds the other end and the encrypted connection (transport.py). Closing
    the returned socket ends the relay and so the session on the far side:
    that is the rollback. `on_connect` gets the kernel's end: shutting it down
    cancels the wait for the reply.
    """
    from hotplug.relay import loopback_pair  # plain-TCP users never load TLS/WebSocket code

    try:
        kernel_end, relay_end = loopback_pair()
    except OSError as exc:
        raise ExportError(f"cannot make the relay's loopback connection: {exc}") from exc
    try:
        if on_connect is not None:
            on_connect(kernel_end)
        with relay_end:  # the relay process keeps its own copy
            raw, pid = run_tunnel(
                remote,
                encode(ExportRequest(record)),
                asdict(timeouts),
                relay_end.fileno(),
                busid=record.busid,
                cancel_fd=kernel_end.fileno(),
            )
        reply = _reply_status(raw, Op.REP_EXPORT, remote)
        if reply != ExportStatus.ATTACHED:
            reason = EXPORT_REFUSALS.get(reply, f"refused with status {reply}")  # type: ignore[call-overload]
            raise ExportError(f"{remote} refused {record.busid}: {reason}")
    except TransportError as exc:
        kernel_end.close()
        raise ExportError(str(exc)) from None
    except BaseException:
        kernel_end.close()
        raise
    logger.debug("%s: relay process %s carries the session to %s", record.busid, pid, remote)
    return kernel_end


def _secure_exchange(remote: Remote, request: bytes, timeouts: Timeouts) -> int:
    """A control-only exchange (UNEXPORT) over tls:// or wss://, in a relay process."""
    try:
        raw, _ = run_tunnel(remote, request, asdict(timeouts), None)
    except TransportError as exc:
        raise ExportError(str(exc)) from None
    return _reply_status(raw, Op.REP_UNEXPORT, remote)


@dataclass
class Attempt:
    """What one export transaction did to its device, filled in as it goes.

    `bound`: this transaction set out to take the device from its driver. A
    caller that finds the device bound to usbip-host after a failure owns it
    only then (or if it owned it before): a device some other tool bound
    meanwhile is that tool's (issue 12, finding 10).
    """

    bound: bool = False


EXPORT_REFUSALS = {
    ExportStatus.FAILED: "the application side could not attach the device",
    ExportStatus.NO_FREE_PORT: "the application side has no free port of the needed speed",
}


def export(
    stub: UsbipHost,
    busid: str,
    endpoint: Endpoint | Remote,
    timeouts: Timeouts | None = None,
    adopt_bound: bool = False,
    on_connect: Callable[[socket.socket], None] | None = None,
    attempt: Attempt | None = None,
) -> Device:
    """Bind `busid`, export it to `endpoint` and hand the link to the kernel.

    Returns the device as exported. On failure, leaves the device as it found it.
    A device some other tool already bound to usbip-host (`usbip bind` for
    usbipd) is refused unless `adopt_bound`: taking it would cut that tool off.
    `on_connect` sees the socket as soon as it is connected, so that another
    thread can cut a handshake short (shutdown() wakes the blocked recv); if it
    raises, the export is rolled back like any other failure. `attempt` (if
    given) learns whether this transaction bound the device.
    """
    timeouts = timeouts or Timeouts()
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
    fields = {"busid": busid, **log_where(endpoint)}
    bound_here = before.driver != STUB_DRIVER
    attempt.bound = bound_here
    try:
        stub.bind(busid, before)
        # Binding changes the driver, not the ids or bus/dev numbers the record
        # carries: a stat says the device is still there, without reading it all.
        if not stub.paths.device_dir(busid).exists():
            raise DeviceNotFound(busid)
        device = dataclasses.replace(before, driver=STUB_DRIVER)
        with handshake_export(device_record(device), endpoint, timeouts, on_connect) as sock:
            stub.hand_over(busid, sock)
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
                f"{busid} was unplugged while it was being exported to {endpoint};"
                " plug it in again to retry"
            )
            log.event(
                logger, logging.WARNING, f"export failed: {gone}", event="export-failed", **fields
            )
            raise gone from exc
        log.event(logger, logging.WARNING, f"export failed: {exc}", event="export-failed", **fields)
        raise
    log.event(logger, logging.INFO, f"exported {busid} to {endpoint}", event="exported", **fields)
    return device


def handshake_export(
    record: DeviceRecord,
    endpoint: Endpoint | Remote,
    timeouts: Timeouts,
    on_connect: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """Connect, offer `record` and return the socket after a status-0 reply.

    The caller hands the socket to the kernel and closes its own copy (use it
    as a context manager); on any failure the socket is already closed.
    `on_connect` (see `export`) is called with the socket once it is connected.
    """
    if isinstance(endpoint, Remote) and endpoint.secure:
        return _secure_handshake(record, endpoint, timeouts, on_connect)
    endpoint = _endpoint(endpoint)
    sock = connect(endpoint, timeouts)
    try:
        if on_connect is not None:
            on_connect(sock)
        reach("export.after-connect")
        reply = _exchange(sock, encode(ExportRequest(record)), Op.REP_EXPORT, endpoint, timeouts)
        reach("export.after-reply")
        if reply != ExportStatus.ATTACHED:
            reason = EXPORT_REFUSALS.get(reply, f"refused with status {reply}")  # type: ignore[call-overload]
            raise ExportError(f"{endpoint} refused {record.busid}: {reason}")
        sock.settimeout(None)  # the kernel does blocking I/O on it
    except BaseException:
        sock.close()
        raise
    return sock


def unexport(
    stub: UsbipHost,
    busid: str,
    endpoint: Endpoint | Remote,
    timeouts: Timeouts | None = None,
    device: Device | None = None,
    release: bool = True,
    devid: int | None = None,
) -> UnexportStatus:
    """Ask `endpoint` to detach `busid`, then give the device back to its driver.

    Idempotent: an unknown busid on the far side is not an error. The device is
    released even when the target cannot be reached (the kernel then closes the
    link and the far side's port is freed by its own kernel). `devid`, when the
    caller knows which device it exported: a different device plugged in at
    `busid` since is left alone (UsbipHost.release).
    """
    timeouts = timeouts or Timeouts()
    if device is None:
        try:
            device = read_device(stub.paths, busid)
        except KernelError:
            device = None
    record = device_record(device) if device is not None else bare_record(busid)
    try:
        return request_unexport(record, endpoint, timeouts)
    finally:
        if release and device is not None:
            stub.release(busid, devid)
        elif release:
            # Unplugged: usbip-host keeps the busid in match_busid. Ask it to
            # forget (Debian's 6.1 keeps the entry all the same, seen in the VM).
            with contextlib.suppress(KernelError):
                stub.release(busid, devid)


def log_where(endpoint: Endpoint | Remote) -> dict[str, str]:
    """Journal fields for the far end: TARGET is the policy's name for it when there
    is one (so `journalctl USBIP_TARGET=lab` shows the whole story), ADDRESS the address."""
    name = endpoint.name if isinstance(endpoint, Remote) else None
    return {"target": name or str(endpoint), "address": str(endpoint)}


def bare_record(busid: str) -> DeviceRecord:
    """The record of a device that is gone: the far side finds it by busid alone."""
    return DeviceRecord(
        path="",
        busid=busid,
        busnum=0,
        devnum=0,
        speed=Speed.UNKNOWN,
        id_vendor=0,
        id_product=0,
        bcd_device=0,
        device_class=0,
        device_subclass=0,
        device_protocol=0,
        configuration_value=0,
        num_configurations=0,
        num_interfaces=0,
    )


def request_unexport(
    record: DeviceRecord, endpoint: Endpoint | Remote, timeouts: Timeouts
) -> UnexportStatus:
    """Send OP_REQ_UNEXPORT on a new connection; DETACHED or NOT_FOUND, else ExportError."""
    fields = {"busid": record.busid, **log_where(endpoint)}
    try:
        if isinstance(endpoint, Remote) and endpoint.secure:
            raw = _secure_exchange(endpoint, encode(UnexportRequest(record)), timeouts)
        else:
            plain = _endpoint(endpoint)
            with connect(plain, timeouts) as sock:
                raw = _exchange(
                    sock, encode(UnexportRequest(record)), Op.REP_UNEXPORT, plain, timeouts
                )
        known = {int(s) for s in UnexportStatus}
        status = UnexportStatus(raw) if raw in known else UnexportStatus.FAILED
        if status == UnexportStatus.FAILED:
            raise ExportError(f"{endpoint} failed to detach {record.busid}")
    except ExportError as exc:
        log.event(logger, logging.WARNING, f"unexport: {exc}", event="unexport-failed", **fields)
        raise
    log.event(
        logger,
        logging.INFO,
        f"unexported {record.busid} from {endpoint}"
        + (" (it was not attached there)" if status == UnexportStatus.NOT_FOUND else ""),
        event="unexported",
        **fields,
    )
    return status


def export_gadget(
    vudc: Vudc, name: str, endpoint: Endpoint | Remote, timeouts: Timeouts | None = None
) -> DeviceRecord:
    """Export the gadget bound to vUDC `name` (no bind/unbind: it is ours already)."""
    timeouts = timeouts or Timeouts()
    vudc.require(name)
    if vudc.status(name) == 2:
        raise KernelError(f"{name} is already exported; disconnect it first")
    record = vudc.record(name)
    fields = {"busid": name, **log_where(endpoint)}
    try:
        with handshake_export(record, endpoint, timeouts) as sock:
            vudc.hand_over(name, sock)
        if vudc.status(name) != 2:
            raise ExportError(f"{name}: usbip-vudc did not take the connection")
    except BaseException as exc:
        log.event(logger, logging.WARNING, f"export failed: {exc}", event="export-failed", **fields)
        raise
    log.event(logger, logging.INFO, f"exported {name} to {endpoint}", event="exported", **fields)
    return record


def unexport_gadget(
    vudc: Vudc, name: str, endpoint: Endpoint | Remote, timeouts: Timeouts | None = None
) -> UnexportStatus:
    timeouts = timeouts or Timeouts()
    vudc.require(name)
    try:
        record = vudc.record(name)
    except KernelError:
        record = bare_record(name)
    try:
        return request_unexport(record, endpoint, timeouts)
    finally:
        vudc.stop(name)
