"""Answering a data phase we abandon: refuse every URB the far side's vhci sent.

Pure (bytes in, bytes out), like protocol.py. The one use: the device side got
a status-0 EXPORT reply, so the far side attached the port and its root hub
started enumerating, and then the export failed before usbip-host took the
socket (the device was pulled out, a signal, a fault). Closing at once leaves
the hub's GET_DESCRIPTOR unanswered: vhci's connection shutdown gives back
only URBs with an unlink pending, so the hub waits out its control timeout
(5 s per try) or waits for an unlink nobody answers, and meanwhile it
enumerates nothing else on that root hub (docs/PROTOCOL.md, "A failed export
and vhci's root hub"). Answering each request with an error first lets the
hub fail fast.

Data-phase layout (all integers big-endian; Documentation/usb/usbip_protocol.rst):
a 48-byte header, `command:u32 seqnum:u32 devid:u32 direction:u32 ep:u32`,
then per command:
- CMD_SUBMIT (1): `transfer_flags:u32 transfer_buffer_length:i32
  start_frame:i32 number_of_packets:i32 interval:i32 setup:8 bytes`, then the
  transfer buffer if the direction is OUT (0), then `number_of_packets`
  16-byte isochronous descriptors if it is positive.
- CMD_UNLINK (2): `unlink_seqnum:u32`, padding to 48.
- RET_SUBMIT (3): `status:i32 actual_length:i32 start_frame:i32
  number_of_packets:i32 error_count:i32`, padding to 48, then data (none here).
- RET_UNLINK (4): `status:i32`, padding to 48.
"""

from __future__ import annotations

import errno
import struct
from typing import Final

__all__ = ["URB_HEADER_SIZE", "decline"]

URB_HEADER_SIZE: Final = 48
CMD_SUBMIT: Final = 1
CMD_UNLINK: Final = 2
RET_SUBMIT: Final = 3
RET_UNLINK: Final = 4
DIR_OUT: Final = 0
ISO_DESCRIPTOR_SIZE: Final = 16

_BASIC = struct.Struct(">IIIII")
_SUBMIT = struct.Struct(">IiiiI")
_RET_SUBMIT = struct.Struct(">iiiii")
_RET_UNLINK = struct.Struct(">i")


def _pad(body: bytes) -> bytes:
    return body + bytes(URB_HEADER_SIZE - len(body))


def decline(data: bytes, status: int = -errno.ENODEV) -> tuple[bytes, int, bool]:
    """The answers to the complete requests at the start of `data`.

    Every USBIP_CMD_SUBMIT gets a USBIP_RET_SUBMIT with `status` (a negative
    errno, as the kernel gives it back to the URB's owner) and no data; every
    USBIP_CMD_UNLINK gets a USBIP_RET_UNLINK with -ECONNRESET, the status of
    an unlinked URB. Returns (the answers, the bytes of `data` they consumed,
    whether to stop): a request cut short at the end is left for more data;
    anything that is not a request vhci sends (garbage, a reply) stops the
    decline there, and the caller just closes.
    """
    answers = bytearray()
    used = 0
    while len(data) - used >= URB_HEADER_SIZE:
        command, seqnum, _devid, direction, _ep = _BASIC.unpack_from(data, used)
        if command == CMD_SUBMIT:
            _flags, length, _frame, packets, _interval = _SUBMIT.unpack_from(data, used + 20)
            if length < 0:
                return bytes(answers), used, True
            payload = length if direction == DIR_OUT else 0
            if packets > 0:
                payload += packets * ISO_DESCRIPTOR_SIZE
            if len(data) - used < URB_HEADER_SIZE + payload:
                break
            used += URB_HEADER_SIZE + payload
            reply = _BASIC.pack(RET_SUBMIT, seqnum, 0, 0, 0) + _RET_SUBMIT.pack(status, 0, 0, 0, 0)
            answers += _pad(reply)
        elif command == CMD_UNLINK:
            used += URB_HEADER_SIZE
            reply = _BASIC.pack(RET_UNLINK, seqnum, 0, 0, 0) + _RET_UNLINK.pack(-errno.ECONNRESET)
            answers += _pad(reply)
        else:
            return bytes(answers), used, True
    return bytes(answers), used, False
