"""Tests for hotplug.wire.urbs: refusing the URBs of an abandoned data phase.

The vectors are written out field by field from the data-phase layout in the
module's docstring (Documentation/usb/usbip_protocol.rst), not built with the
module's own structs.
"""

from __future__ import annotations

import errno

from hypothesis import given
from hypothesis import strategies as st

from hotplug.wire.urbs import decline


def u32(n: int) -> bytes:
    return (n & 0xFFFFFFFF).to_bytes(4, "big")


# The hub's first request, as vhci sends it: GET_DESCRIPTOR(DEVICE), 64 bytes in,
# endpoint 0, seqnum 7, devid 0x00110003.
GET_DESCRIPTOR = (
    u32(1)  # USBIP_CMD_SUBMIT
    + u32(7)  # seqnum
    + u32(0x00110003)  # devid
    + u32(1)  # direction: in
    + u32(0)  # ep
    + u32(0x200)  # transfer_flags
    + u32(64)  # transfer_buffer_length
    + u32(0)  # start_frame
    + u32(0)  # number_of_packets
    + u32(0)  # interval
    + bytes([0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x40, 0x00])  # setup
)

REFUSED_7 = (
    u32(3)  # USBIP_RET_SUBMIT
    + u32(7)  # seqnum
    + u32(0) * 3  # devid, direction, ep: 0 in replies
    + u32(-errno.ENODEV)  # status
    + u32(0) * 4  # actual_length, start_frame, number_of_packets, error_count
    + bytes(8)  # padding
)


def out_submit(seqnum: int, payload: bytes, packets: int = 0) -> bytes:
    return (
        u32(1)
        + u32(seqnum)
        + u32(0x00110003)
        + u32(0)  # direction: out
        + u32(2)
        + u32(0)
        + u32(len(payload))
        + u32(0)
        + u32(packets)
        + u32(0)
        + bytes(8)
        + payload
        + bytes(16 * packets)
    )


def unlink(seqnum: int, victim: int) -> bytes:
    return u32(2) + u32(seqnum) + u32(0x00110003) + u32(0) + u32(0) + u32(victim) + bytes(24)


def test_the_hubs_first_request_is_refused_with_enodev() -> None:
    assert decline(GET_DESCRIPTOR) == (REFUSED_7, 48, False)
    assert len(REFUSED_7) == 48


def test_an_unlink_is_answered_as_unlinked() -> None:
    answers, used, stop = decline(unlink(9, 7))
    assert (used, stop) == (48, False)
    assert answers == u32(4) + u32(9) + u32(0) * 3 + u32(-errno.ECONNRESET) + bytes(24)


def test_out_data_and_iso_descriptors_are_skipped_not_read_as_requests() -> None:
    # The payload is made of bytes that would look like a request of their own.
    stream = out_submit(11, GET_DESCRIPTOR, packets=2) + GET_DESCRIPTOR
    answers, used, stop = decline(stream)
    assert (used, stop) == (len(stream), False)
    assert [int.from_bytes(answers[i + 4 : i + 8], "big") for i in (0, 48)] == [11, 7]


def test_a_request_cut_short_waits_for_the_rest() -> None:
    stream = GET_DESCRIPTOR + out_submit(12, b"x" * 100)
    answers, used, stop = decline(stream[:-1])
    assert (answers, used, stop) == (REFUSED_7, 48, False)
    assert decline(stream[used:])[1] == len(stream) - 48


def test_anything_else_stops_the_decline_where_it_starts() -> None:
    reply = REFUSED_7  # vhci never sends a RET_*: not a stream to answer
    assert decline(GET_DESCRIPTOR + reply + GET_DESCRIPTOR) == (REFUSED_7, 48, True)
    assert decline(b"\x01\x11" + bytes(46)) == (b"", 0, True)


@given(st.binary(max_size=400))
def test_any_bytes_give_whole_answers_and_never_read_past_the_end(data: bytes) -> None:
    answers, used, _ = decline(data)
    assert 0 <= used <= len(data)
    assert len(answers) % 48 == 0
    assert len(answers) // 48 <= used // 48
