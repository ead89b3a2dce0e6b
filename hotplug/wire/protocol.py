"""USB/IP control-phase PDUs: a sans-IO codec (bytes in, PDUs out; PDUs in, bytes out).

No sockets, files or logging here. `encode` turns a PDU into bytes; `Decoder`
turns a byte stream into PDUs, h11-style: feed it with `receive_data`, ask
`next_pdu` for the next PDU or `NEED_DATA`.

Wire format (all integers big-endian): an 8-byte header `version:u16 = 0x0111,
code:u16, status:u32`, then an op-dependent body.

    op        request  reply   request body       reply body
    DEVLIST   0x8005   0x0005  none               ndev:u32, per device: device
                                                  record + bNumInterfaces
                                                  interface records
    IMPORT    0x8003   0x0003  busid char[32]     device record, only if status 0
    EXPORT    0x8006   0x0006  device record      none
    UNEXPORT  0x8007   0x0007  device record      none

EXPORT and UNEXPORT follow the last revision (v14) of the "usbip: exporting
devices" patch series: the reply is the bare 8-byte header and its status
carries the result. Earlier revisions of that series sent a 4-byte
`returncode` after the header; this codec neither sends nor expects one. That
matters: after a status-0 EXPORT reply the kernel's URB stream follows in the
same TCP stream, so the reader must stop exactly at the end of the header.

Device record, 312 bytes: path char[256], busid char[32], busnum u32, devnum
u32, speed u32, idVendor u16, idProduct u16, bcdDevice u16, then the u8s
bDeviceClass, bDeviceSubClass, bDeviceProtocol, bConfigurationValue,
bNumConfigurations, bNumInterfaces. Interface record, 4 bytes: class,
subclass, protocol, padding.

Status is read per op: `ImportStatus` for DEVLIST and IMPORT (mainline),
`ExportStatus` and `UnexportStatus` for the exporting series. Reply PDUs keep
the status as a plain int and the decoder accepts any value, so a peer's
future status code reaches the caller (who treats anything but 0 as failure)
instead of killing the connection.

Decisions where the C sources leave room:
- Character fields must contain a NUL terminator, and every byte after the
  first NUL must be NUL (mainline userspace zero-fills these structs).
- busid: 1 to 31 bytes of printable ASCII other than space and '/'. Kernel
  busids look like `1-1.2` or `usbip-vudc.0`; the application side writes the
  busid into a space-separated record file, so spaces and control bytes from
  a peer must never get that far.
- path: at most 255 bytes of UTF-8 without ASCII control characters; may be
  empty (the kernel's sysfs paths are ASCII in practice).
- speed must be a `Speed` member; bNumInterfaces at most `MAX_INTERFACES`
  (the kernel's USB_MAXINTERFACES); a DEVLIST reply at most `MAX_DEVICES`.
- The interface record's padding byte is ignored on decode (written as 0).
- Requests must carry status 0. A reply with non-zero status has no body, for
  IMPORT (as mainline) and for DEVLIST (mainline's client stops reading
  there; its server never sends one).
- `receive_data(b"")` means end of stream, as in h11. A PDU cut short by it is
  a `ProtocolError`.

Errors: `ProtocolError` means the peer sent bad bytes; the `Decoder` is then
dead and every later call raises again. `LocalProtocolError` means the caller
misused the API (an unencodable PDU, data after end of stream).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, Final, TypeAlias

from hotplug.errors import HotplugError
from hotplug.usb import Speed
from hotplug.wire.address import DEFAULT_PORT  # re-exported: the codec's readers expect it here

__all__ = [
    "DEFAULT_PORT",
    "DEVICE_RECORD_SIZE",
    "HEADER_SIZE",
    "INTERFACE_RECORD_SIZE",
    "MAX_DEVICES",
    "MAX_INTERFACES",
    "NEED_DATA",
    "USBIP_VERSION",
    "Decoder",
    "DeviceRecord",
    "DevlistReply",
    "DevlistRequest",
    "ExportReply",
    "ExportRequest",
    "ExportStatus",
    "Header",
    "ImportReply",
    "ImportRequest",
    "ImportStatus",
    "InterfaceRecord",
    "LocalProtocolError",
    "NeedData",
    "Op",
    "Pdu",
    "ProtocolError",
    "UnexportReply",
    "UnexportRequest",
    "UnexportStatus",
    "data_phase_command",
    "decode_header",
    "encode",
]

USBIP_VERSION: Final = 0x0111
HEADER_SIZE: Final = 8
DEVICE_RECORD_SIZE: Final = 312
INTERFACE_RECORD_SIZE: Final = 4
MAX_DEVICES: Final = 4096
MAX_INTERFACES: Final = 32

REQUEST_BIT: Final = 0x8000
PATH_FIELD_SIZE: Final = 256
BUSID_FIELD_SIZE: Final = 32

_HEADER = struct.Struct(">HHI")
_DEVICE = struct.Struct(">256s32sIIIHHHBBBBBB")
_INTERFACE = struct.Struct(">BBBB")
_U32 = struct.Struct(">I")


class ProtocolError(HotplugError, ValueError):
    """The peer sent bytes that are not a valid USB/IP control PDU."""


class LocalProtocolError(Exception):
    """The caller misused this API (e.g. asked to encode an unencodable PDU)."""


class Op(IntEnum):
    REQ_DEVLIST = 0x8005
    REP_DEVLIST = 0x0005
    REQ_IMPORT = 0x8003
    REP_IMPORT = 0x0003
    REQ_EXPORT = 0x8006
    REP_EXPORT = 0x0006
    REQ_UNEXPORT = 0x8007
    REP_UNEXPORT = 0x0007

    @property
    def is_request(self) -> bool:
        return bool(self & REQUEST_BIT)


class ImportStatus(IntEnum):
    """Reply status of DEVLIST and IMPORT (mainline ST_*)."""

    OK = 0
    NA = 1
    DEV_BUSY = 2
    DEV_ERR = 3
    NODEV = 4
    ERROR = 5


class ExportStatus(IntEnum):
    """Reply status of EXPORT."""

    ATTACHED = 0
    FAILED = 1
    NO_FREE_PORT = 2  # no free vhci port of the speed the device needs


class UnexportStatus(IntEnum):
    """Reply status of UNEXPORT."""

    DETACHED = 0
    FAILED = 1
    NOT_FOUND = 3  # no port holds that busid from that peer


class NeedData(Enum):
    """Type of the `NEED_DATA` sentinel returned by `Decoder.next_pdu`."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True)
class Header:
    version: int
    code: int  # an Op when decoded
    status: int


@dataclass(frozen=True)
class InterfaceRecord:
    klass: int
    subclass: int
    protocol: int


@dataclass(frozen=True)
class DeviceRecord:
    path: str
    busid: str
    busnum: int
    devnum: int
    speed: Speed
    id_vendor: int
    id_product: int
    bcd_device: int
    device_class: int
    device_subclass: int
    device_protocol: int
    configuration_value: int
    num_configurations: int
    num_interfaces: int

    @property
    def devid(self) -> int:
        return (self.busnum << 16) | self.devnum

    @classmethod
    def bare(cls, busid: str, **known: Any) -> DeviceRecord:
        """A record with only what is `known`, every other field zero: what the wire
        carries for "unknown" (an UNEXPORT of a device that is gone is found by
        its busid alone)."""
        return dataclasses.replace(_ZERO_RECORD, busid=busid, **known)


# Every number zero, no path, no busid, speed unknown.
_NUMBERS: dict[str, Any] = {f.name: 0 for f in dataclasses.fields(DeviceRecord) if f.type == "int"}
_ZERO_RECORD = DeviceRecord(path="", busid="", speed=Speed.UNKNOWN, **_NUMBERS)


@dataclass(frozen=True)
class DevlistRequest:
    pass


@dataclass(frozen=True)
class DevlistReply:
    status: int
    devices: tuple[tuple[DeviceRecord, tuple[InterfaceRecord, ...]], ...] = ()


@dataclass(frozen=True)
class ImportRequest:
    busid: str


@dataclass(frozen=True)
class ImportReply:
    status: int
    device: DeviceRecord | None


@dataclass(frozen=True)
class ExportRequest:
    device: DeviceRecord


@dataclass(frozen=True)
class ExportReply:
    status: int


@dataclass(frozen=True)
class UnexportRequest:
    device: DeviceRecord


@dataclass(frozen=True)
class UnexportReply:
    status: int


Pdu: TypeAlias = (
    DevlistRequest
    | DevlistReply
    | ImportRequest
    | ImportReply
    | ExportRequest
    | ExportReply
    | UnexportRequest
    | UnexportReply
)


# ---------------------------------------------------------------------------
# Text field rules, shared by both directions. Each returns a description of
# the problem (to be completed into a message) or None.


def _busid_problem(raw: bytes | bytearray) -> str | None:
    if not raw:
        return "is empty"
    for offset, byte in enumerate(raw):
        if not 0x21 <= byte <= 0x7E or byte == 0x2F:
            return f"contains byte 0x{byte:02x} at offset {offset}"
    return None


def _path_problem(raw: bytes | bytearray) -> str | None:
    for offset, byte in enumerate(raw):
        if byte < 0x20 or byte == 0x7F:
            return f"contains control byte 0x{byte:02x} at offset {offset}"
    return None


# ---------------------------------------------------------------------------
# Encoding. Every check raises LocalProtocolError: the PDU came from our caller.


def _check_uint(name: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise LocalProtocolError(f"{name} {value} does not fit in {bits} bits")


def _encode_busid(busid: str) -> bytes:
    try:
        raw = busid.encode("ascii")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"busid {busid!r} is not ASCII") from None
    if len(raw) >= BUSID_FIELD_SIZE:
        raise LocalProtocolError(
            f"busid {busid!r} is {len(raw)} bytes, limit {BUSID_FIELD_SIZE - 1}"
        )
    problem = _busid_problem(raw)
    if problem is not None:
        raise LocalProtocolError(f"busid {busid!r} {problem}")
    return raw


def _encode_path(path: str) -> bytes:
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"path {path!r} is not encodable as UTF-8") from None
    if len(raw) >= PATH_FIELD_SIZE:
        raise LocalProtocolError(f"path is {len(raw)} bytes, limit {PATH_FIELD_SIZE - 1}")
    problem = _path_problem(raw)
    if problem is not None:
        raise LocalProtocolError(f"path {path!r} {problem}")
    return raw


def _pack_header(code: Op, status: int) -> bytes:
    _check_uint("status", status, 32)
    return _HEADER.pack(USBIP_VERSION, code, status)


def _pack_device(device: DeviceRecord) -> bytes:
    try:
        speed = Speed(device.speed)
    except ValueError:
        raise LocalProtocolError(f"unknown speed {device.speed!r}") from None
    for name, bits in (
        ("busnum", 32),
        ("devnum", 32),
        ("id_vendor", 16),
        ("id_product", 16),
        ("bcd_device", 16),
        ("device_class", 8),
        ("device_subclass", 8),
        ("device_protocol", 8),
        ("configuration_value", 8),
        ("num_configurations", 8),
        ("num_interfaces", 8),
    ):
        _check_uint(name, getattr(device, name), bits)
    if device.num_interfaces > MAX_INTERFACES:
        raise LocalProtocolError(
            f"interface count {device.num_interfaces} exceeds limit {MAX_INTERFACES}"
        )
    return _DEVICE.pack(
        _encode_path(device.path),
        _encode_busid(device.busid),
        device.busnum,
        device.devnum,
        speed,
        device.id_vendor,
        device.id_product,
        device.bcd_device,
        device.device_class,
        device.device_subclass,
        device.device_protocol,
        device.configuration_value,
        device.num_configurations,
        device.num_interfaces,
    )


def _pack_interface(interface: InterfaceRecord) -> bytes:
    _check_uint("interface class", interface.klass, 8)
    _check_uint("interface subclass", interface.subclass, 8)
    _check_uint("interface protocol", interface.protocol, 8)
    return _INTERFACE.pack(interface.klass, interface.subclass, interface.protocol, 0)


def _encode_devlist_reply(pdu: DevlistReply) -> bytes:
    header = _pack_header(Op.REP_DEVLIST, pdu.status)
    if pdu.status != 0:
        if pdu.devices:
            raise LocalProtocolError(f"DevlistReply with status {pdu.status} cannot list devices")
        return header
    if len(pdu.devices) > MAX_DEVICES:
        raise LocalProtocolError(f"device count {len(pdu.devices)} exceeds limit {MAX_DEVICES}")
    parts = [header, _U32.pack(len(pdu.devices))]
    for device, interfaces in pdu.devices:
        if len(interfaces) != device.num_interfaces:
            raise LocalProtocolError(
                f"device {device.busid!r} declares {device.num_interfaces} interfaces"
                f" but {len(interfaces)} are given"
            )
        parts.append(_pack_device(device))
        parts.extend(_pack_interface(interface) for interface in interfaces)
    return b"".join(parts)


def _encode_import_reply(pdu: ImportReply) -> bytes:
    header = _pack_header(Op.REP_IMPORT, pdu.status)
    if pdu.status == 0:
        if pdu.device is None:
            raise LocalProtocolError("ImportReply with status 0 needs a device")
        return header + _pack_device(pdu.device)
    if pdu.device is not None:
        raise LocalProtocolError(f"ImportReply with status {pdu.status} cannot carry a device")
    return header


def encode(pdu: Pdu) -> bytes:
    """Return the wire bytes of `pdu`; raise LocalProtocolError if it cannot be sent."""
    if isinstance(pdu, DevlistRequest):
        return _pack_header(Op.REQ_DEVLIST, 0)
    if isinstance(pdu, DevlistReply):
        return _encode_devlist_reply(pdu)
    if isinstance(pdu, ImportRequest):
        return _pack_header(Op.REQ_IMPORT, 0) + _encode_busid(pdu.busid).ljust(
            BUSID_FIELD_SIZE, b"\0"
        )
    if isinstance(pdu, ImportReply):
        return _encode_import_reply(pdu)
    if isinstance(pdu, ExportRequest):
        return _pack_header(Op.REQ_EXPORT, 0) + _pack_device(pdu.device)
    if isinstance(pdu, ExportReply):
        return _pack_header(Op.REP_EXPORT, pdu.status)
    if isinstance(pdu, UnexportRequest):
        return _pack_header(Op.REQ_UNEXPORT, 0) + _pack_device(pdu.device)
    if isinstance(pdu, UnexportReply):
        return _pack_header(Op.REP_UNEXPORT, pdu.status)
    raise LocalProtocolError(f"not a USB/IP PDU: {pdu!r}")


# ---------------------------------------------------------------------------
# Decoding. Every check raises ProtocolError: the bytes came from the peer.


def _parse_header(data: bytes | bytearray) -> Header:
    version, code, status = _HEADER.unpack_from(data)
    if version != USBIP_VERSION:
        raise ProtocolError(f"bad version 0x{version:04x}, expected 0x{USBIP_VERSION:04x}")
    try:
        op = Op(code)
    except ValueError:
        raise ProtocolError(f"unknown op code 0x{code:04x}") from None
    if op.is_request and status != 0:
        raise ProtocolError(f"request 0x{code:04x} has status {status}, expected 0")
    return Header(version, op, status)


DATA_PHASE_COMMANDS: Final = {
    0x00000001: "USBIP_CMD_SUBMIT",
    0x00000002: "USBIP_CMD_UNLINK",
    0x00000003: "USBIP_RET_SUBMIT",
    0x00000004: "USBIP_RET_UNLINK",
}


def data_phase_command(data: bytes) -> str | None:
    """The data-phase PDU `data` starts with, if it looks like one.

    Data-phase headers start with a 32-bit command where the control phase
    has version 0x0111: a peer that attached before replying sends its first
    URB (USBIP_CMD_SUBMIT) where the reply belongs.
    """
    if len(data) < 4:
        return None
    return DATA_PHASE_COMMANDS.get(int.from_bytes(data[:4], "big"))


def decode_header(data: bytes) -> Header:
    """Decode and validate exactly one 8-byte header."""
    if len(data) > HEADER_SIZE:
        raise LocalProtocolError(f"decode_header takes {HEADER_SIZE} bytes, got {len(data)}")
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"truncated header: got {len(data)} of {HEADER_SIZE} bytes")
    return _parse_header(data)


def _field_content(field: bytes, name: str) -> bytes:
    """The bytes before the NUL terminator; the rest must be NUL padding."""
    end = field.find(0)
    if end < 0:
        raise ProtocolError(f"{name} field is not NUL-terminated")
    rest = field[end:].lstrip(b"\0")
    if rest:
        offset = len(field) - len(rest)
        raise ProtocolError(
            f"{name} field has byte 0x{rest[0]:02x} after its NUL terminator (offset {offset})"
        )
    return field[:end]


def _parse_busid(field: bytes) -> str:
    raw = _field_content(field, "busid")
    problem = _busid_problem(raw)
    if problem is not None:
        raise ProtocolError(f"busid field {problem}")
    return raw.decode("ascii")


def _parse_path(field: bytes) -> str:
    raw = _field_content(field, "path")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"path field is not UTF-8 (byte offset {exc.start})") from None
    problem = _path_problem(raw)
    if problem is not None:
        raise ProtocolError(f"path field {problem}")
    return text


def _parse_device(data: bytearray, offset: int) -> DeviceRecord:
    (
        path,
        busid,
        busnum,
        devnum,
        speed,
        id_vendor,
        id_product,
        bcd_device,
        device_class,
        device_subclass,
        device_protocol,
        configuration_value,
        num_configurations,
        num_interfaces,
    ) = _DEVICE.unpack_from(data, offset)
    try:
        speed_enum = Speed(speed)
    except ValueError:
        raise ProtocolError(f"unknown speed {speed}") from None
    if num_interfaces > MAX_INTERFACES:
        raise ProtocolError(f"interface count {num_interfaces} exceeds limit {MAX_INTERFACES}")
    return DeviceRecord(
        path=_parse_path(path),
        busid=_parse_busid(busid),
        busnum=busnum,
        devnum=devnum,
        speed=speed_enum,
        id_vendor=id_vendor,
        id_product=id_product,
        bcd_device=bcd_device,
        device_class=device_class,
        device_subclass=device_subclass,
        device_protocol=device_protocol,
        configuration_value=configuration_value,
        num_configurations=num_configurations,
        num_interfaces=num_interfaces,
    )


def _parse_interface(data: bytearray, offset: int) -> InterfaceRecord:
    klass, subclass, protocol, _padding = _INTERFACE.unpack_from(data, offset)
    return InterfaceRecord(klass, subclass, protocol)


class Decoder:
    """Incremental decoder for a stream of PDUs.

    The rules of this class:
    - `_buf` holds every byte received and not yet handed out as part of a
      PDU; it starts at the first byte of the PDU being decoded.
    - `_advance` validates as far as the buffer allows and records in
      `_piece` the next piece it waits for as (name, start, end) offsets into
      `_buf`; `end` is the buffer length that lets it make progress. When
      the PDU is complete, `_ready` holds it and `end` is its length.
    - Nothing past the end of the current PDU is ever looked at, so
      `trailing_data` after a PDU is exactly what followed it.
    - The first ProtocolError is kept in `_error`; from then on every call
      except `trailing_data` raises a ProtocolError with the same message.

    `accept`, if given, limits the op codes taken from the peer (e.g. only
    `Op.REP_EXPORT` on the device side), so a wrong reply is refused after
    its header instead of its body being read.
    """

    def __init__(self, accept: Iterable[Op] | None = None) -> None:
        self._accept = frozenset(accept) if accept is not None else None
        self._buf = bytearray()
        self._eof = False
        self._error: ProtocolError | None = None
        self._header: Header | None = None
        self._ndev: int | None = None
        self._devices: list[tuple[DeviceRecord, tuple[InterfaceRecord, ...]]] = []
        self._devlist_end = 0  # end of the last complete entry in `_devices`
        self._piece = ("header", 0, HEADER_SIZE)
        self._ready: Pdu | None = None

    def _start_pdu(self) -> None:
        self._header = None
        self._ndev = None
        self._devices = []
        self._devlist_end = 0
        self._piece = ("header", 0, HEADER_SIZE)
        self._ready = None

    def _check_alive(self) -> None:
        if self._error is not None:
            raise ProtocolError(str(self._error)) from self._error

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; `b""` marks the end of the stream."""
        self._check_alive()
        if not data:
            self._eof = True
        elif self._eof:
            raise LocalProtocolError("data received after end of stream")
        else:
            self._buf += data

    def next_pdu(self) -> Pdu | NeedData:
        """Return the next complete PDU, or NEED_DATA if more bytes are needed."""
        self._check_alive()
        try:
            self._advance()
            if self._ready is None:
                if self._eof:
                    name, start, end = self._piece
                    raise ProtocolError(
                        f"connection closed during {name}:"
                        f" got {len(self._buf) - start} of {end - start} bytes"
                    )
                return NEED_DATA
        except ProtocolError as exc:
            self._error = exc
            raise
        pdu = self._ready
        del self._buf[: self._piece[2]]
        self._start_pdu()
        return pdu

    def bytes_needed(self) -> int:
        """Fewest further bytes after which `next_pdu` can make progress.

        0 means `next_pdu` returns a PDU now. Reading exactly this many bytes
        at a time never reads past the end of a PDU.
        """
        self._check_alive()
        try:
            self._advance()
        except ProtocolError as exc:
            self._error = exc
            raise
        return max(0, self._piece[2] - len(self._buf))

    @property
    def trailing_data(self) -> bytes:
        """Bytes received but not part of any PDU returned so far."""
        return bytes(self._buf)

    def _want(self, name: str, start: int, size: int) -> bool:
        self._piece = (name, start, start + size)
        return len(self._buf) >= start + size

    def _finish(self, pdu: Pdu, length: int) -> None:
        self._piece = ("PDU", 0, length)
        self._ready = pdu

    def _advance(self) -> None:
        if self._ready is not None:
            return
        buf = self._buf
        if self._header is None:
            if not self._want("header", 0, HEADER_SIZE):
                return
            header = _parse_header(buf)
            if self._accept is not None and header.code not in self._accept:
                raise ProtocolError(
                    f"unexpected op code 0x{header.code:04x} ({Op(header.code).name})"
                )
            self._header = header
        code, status = self._header.code, self._header.status
        body = HEADER_SIZE
        if code == Op.REQ_DEVLIST:
            self._finish(DevlistRequest(), body)
        elif code == Op.REP_DEVLIST:
            self._advance_devlist(status)
        elif code == Op.REQ_IMPORT:
            if self._want("busid", body, BUSID_FIELD_SIZE):
                busid = _parse_busid(bytes(buf[body : body + BUSID_FIELD_SIZE]))
                self._finish(ImportRequest(busid), body + BUSID_FIELD_SIZE)
        elif code == Op.REP_IMPORT:
            if status != 0:
                self._finish(ImportReply(status, None), body)
            elif self._want("device record", body, DEVICE_RECORD_SIZE):
                device = _parse_device(buf, body)
                self._finish(ImportReply(status, device), body + DEVICE_RECORD_SIZE)
        elif code in (Op.REQ_EXPORT, Op.REQ_UNEXPORT):
            if self._want("device record", body, DEVICE_RECORD_SIZE):
                device = _parse_device(buf, body)
                request = (
                    ExportRequest(device) if code == Op.REQ_EXPORT else UnexportRequest(device)
                )
                self._finish(request, body + DEVICE_RECORD_SIZE)
        elif code == Op.REP_EXPORT:
            self._finish(ExportReply(status), body)
        else:  # Op.REP_UNEXPORT; _parse_header admits no other code
            self._finish(UnexportReply(status), body)

    def _advance_devlist(self, status: int) -> None:
        if status != 0:
            self._finish(DevlistReply(status, ()), HEADER_SIZE)
            return
        if self._ndev is None:
            if not self._want("device count", HEADER_SIZE, 4):
                return
            (ndev,) = _U32.unpack_from(self._buf, HEADER_SIZE)
            if ndev > MAX_DEVICES:
                raise ProtocolError(f"device count {ndev} exceeds limit {MAX_DEVICES}")
            self._ndev = ndev
            self._devlist_end = HEADER_SIZE + 4
        pos = self._devlist_end
        while len(self._devices) < self._ndev:
            if not self._want("device record", pos, DEVICE_RECORD_SIZE):
                return
            device = _parse_device(self._buf, pos)
            pos += DEVICE_RECORD_SIZE
            size = INTERFACE_RECORD_SIZE * device.num_interfaces
            if not self._want("interface records", pos, size):
                return
            interfaces = tuple(
                _parse_interface(self._buf, at)
                for at in range(pos, pos + size, INTERFACE_RECORD_SIZE)
            )
            pos += size
            self._devices.append((device, interfaces))
            self._devlist_end = pos
        self._finish(DevlistReply(0, tuple(self._devices)), pos)
