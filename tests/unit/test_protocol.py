"""Tests for hotplug.wire.protocol.

The golden vectors below are written out by hand from the layout in
PROTOCOL.md (offsets and field sizes), one field per line, not produced with
`struct`, so they check the codec against the spec rather than against itself.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplug.usb import Speed
from hotplug.wire.protocol import (
    DEFAULT_PORT,
    DEVICE_RECORD_SIZE,
    HEADER_SIZE,
    INTERFACE_RECORD_SIZE,
    MAX_DEVICES,
    NEED_DATA,
    USBIP_VERSION,
    Decoder,
    DeviceRecord,
    DevlistReply,
    DevlistRequest,
    ExportReply,
    ExportRequest,
    ExportStatus,
    Header,
    ImportReply,
    ImportRequest,
    ImportStatus,
    InterfaceRecord,
    LocalProtocolError,
    NeedData,
    Op,
    Pdu,
    ProtocolError,
    UnexportReply,
    UnexportRequest,
    UnexportStatus,
    decode_header,
    encode,
)


def h(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts))


# --- hand-written golden vectors ---------------------------------------------

DEV_A = DeviceRecord(
    path="/sys/devices/platform/dummy_hcd.0/usb1/1-1",
    busid="1-1",
    busnum=1,
    devnum=2,
    speed=Speed.HIGH,
    id_vendor=0x1D6B,
    id_product=0x0104,
    bcd_device=0x0510,
    device_class=0,
    device_subclass=0,
    device_protocol=0,
    configuration_value=1,
    num_configurations=1,
    num_interfaces=1,
)
DEV_A_IFACES = (InterfaceRecord(0x08, 0x06, 0x50),)
DEV_A_HEX = "".join(
    [
        # path: "/sys/devices/" "platform/" "dummy_hcd.0/" "usb1/" "1-1" = 42 bytes
        "2f 73 79 73 2f 64 65 76 69 63 65 73 2f",
        "70 6c 61 74 66 6f 72 6d 2f",
        "64 75 6d 6d 79 5f 68 63 64 2e 30 2f",
        "75 73 62 31 2f",
        "31 2d 31",
        "00" * 214,
        # busid "1-1" + 29 NULs
        "31 2d 31",
        "00" * 29,
        "00 00 00 01",  # busnum
        "00 00 00 02",  # devnum
        "00 00 00 03",  # speed: high
        "1d 6b",  # idVendor
        "01 04",  # idProduct
        "05 10",  # bcdDevice
        "00 00 00",  # class, subclass, protocol
        "01",  # bConfigurationValue
        "01",  # bNumConfigurations
        "01",  # bNumInterfaces
    ]
)
DEV_A_IFACES_HEX = "08 06 50 00"

DEV_B = DeviceRecord(
    path="/sys/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1.4",
    busid="2-1.4",
    busnum=3,
    devnum=0x11,
    speed=Speed.SUPER,
    id_vendor=0x0BDA,
    id_product=0x8153,
    bcd_device=0x3100,
    device_class=0xEF,
    device_subclass=0x02,
    device_protocol=0x01,
    configuration_value=2,
    num_configurations=3,
    num_interfaces=2,
)
DEV_B_IFACES = (InterfaceRecord(0xFF, 0xFE, 0x00), InterfaceRecord(0x02, 0x06, 0x00))
DEV_B_HEX = "".join(
    [
        # path: "/sys/devices/" "pci0000:00/" "0000:00:14.0/" "usb2/" "2-1/" "2-1.4" = 51
        "2f 73 79 73 2f 64 65 76 69 63 65 73 2f",
        "70 63 69 30 30 30 30 3a 30 30 2f",
        "30 30 30 30 3a 30 30 3a 31 34 2e 30 2f",
        "75 73 62 32 2f",
        "32 2d 31 2f",
        "32 2d 31 2e 34",
        "00" * 205,
        # busid "2-1.4" + 27 NULs
        "32 2d 31 2e 34",
        "00" * 27,
        "00 00 00 03",  # busnum
        "00 00 00 11",  # devnum
        "00 00 00 05",  # speed: super
        "0b da",  # idVendor
        "81 53",  # idProduct
        "31 00",  # bcdDevice
        "ef 02 01",  # class, subclass, protocol
        "02",  # bConfigurationValue
        "03",  # bNumConfigurations
        "02",  # bNumInterfaces
    ]
)
DEV_B_IFACES_HEX = "ff fe 00 00  02 06 00 00"

GOLDEN: list[tuple[str, Pdu, bytes]] = [
    ("devlist request", DevlistRequest(), h("0111 8005 00000000")),
    (
        "devlist reply, two devices",
        DevlistReply(0, ((DEV_A, DEV_A_IFACES), (DEV_B, DEV_B_IFACES))),
        h(
            "0111 0005 00000000",
            "00000002",
            DEV_A_HEX,
            DEV_A_IFACES_HEX,
            DEV_B_HEX,
            DEV_B_IFACES_HEX,
        ),
    ),
    ("devlist reply, empty", DevlistReply(0, ()), h("0111 0005 00000000 00000000")),
    ("devlist reply, error", DevlistReply(ImportStatus.ERROR, ()), h("0111 0005 00000005")),
    ("import request", ImportRequest("2-1.4"), h("0111 8003 00000000", "322d312e34", "00" * 27)),
    ("import reply, ok", ImportReply(0, DEV_A), h("0111 0003 00000000", DEV_A_HEX)),
    ("import reply, nodev", ImportReply(ImportStatus.NODEV, None), h("0111 0003 00000004")),
    ("export request", ExportRequest(DEV_B), h("0111 8006 00000000", DEV_B_HEX)),
    ("export reply, attached", ExportReply(ExportStatus.ATTACHED), h("0111 0006 00000000")),
    ("export reply, no port", ExportReply(ExportStatus.NO_FREE_PORT), h("0111 0006 00000002")),
    ("unexport request", UnexportRequest(DEV_A), h("0111 8007 00000000", DEV_A_HEX)),
    ("unexport reply, detached", UnexportReply(UnexportStatus.DETACHED), h("0111 0007 00000000")),
    (
        "unexport reply, not found",
        UnexportReply(UnexportStatus.NOT_FOUND),
        h("0111 0007 00000003"),
    ),
]
GOLDEN_IDS = [name for name, _, _ in GOLDEN]


def feed(decoder: Decoder, chunk: bytes) -> None:
    """receive_data for a chunk that may be empty (b"" alone would mean end of stream)."""
    if chunk:
        decoder.receive_data(chunk)


def decode_one(data: bytes) -> Pdu:
    """Decode exactly one PDU that fills `data` completely."""
    decoder = Decoder()
    decoder.receive_data(data)
    pdu = decoder.next_pdu()
    assert not isinstance(pdu, NeedData)
    assert decoder.trailing_data == b""
    return pdu


def decode_error(data: bytes, *, eof: bool = False, decoder: Decoder | None = None) -> str:
    """Feed `data` (and EOF) and return the message of the ProtocolError that follows."""
    decoder = decoder or Decoder()
    decoder.receive_data(data)
    if eof:
        decoder.receive_data(b"")
    with pytest.raises(ProtocolError) as info:
        decoder.next_pdu()
    return str(info.value)


def test_constants() -> None:
    assert USBIP_VERSION == 0x0111
    assert HEADER_SIZE == 8
    assert DEVICE_RECORD_SIZE == 312
    assert INTERFACE_RECORD_SIZE == 4
    assert DEFAULT_PORT == 3240
    assert [(op.name, op.value) for op in Op] == [
        ("REQ_DEVLIST", 0x8005),
        ("REP_DEVLIST", 0x0005),
        ("REQ_IMPORT", 0x8003),
        ("REP_IMPORT", 0x0003),
        ("REQ_EXPORT", 0x8006),
        ("REP_EXPORT", 0x0006),
        ("REQ_UNEXPORT", 0x8007),
        ("REP_UNEXPORT", 0x0007),
    ]
    assert [s.value for s in ImportStatus] == [0, 1, 2, 3, 4, 5]
    assert [s.value for s in ExportStatus] == [0, 1, 2]
    assert [s.value for s in UnexportStatus] == [0, 1, 3]


def test_golden_vectors_have_layout_sizes() -> None:
    # Guards the hand-written hex itself against a miscounted padding run.
    assert len(h(DEV_A_HEX)) == len(h(DEV_B_HEX)) == 312
    assert len(h(DEV_B_IFACES_HEX)) == 2 * 4


@pytest.mark.parametrize(("name", "pdu", "wire"), GOLDEN, ids=GOLDEN_IDS)
def test_golden_encode(name: str, pdu: Pdu, wire: bytes) -> None:
    assert encode(pdu) == wire


@pytest.mark.parametrize(("name", "pdu", "wire"), GOLDEN, ids=GOLDEN_IDS)
def test_golden_decode(name: str, pdu: Pdu, wire: bytes) -> None:
    assert decode_one(wire) == pdu


@pytest.mark.parametrize(("name", "pdu", "wire"), GOLDEN, ids=GOLDEN_IDS)
def test_every_truncation_needs_data(name: str, pdu: Pdu, wire: bytes) -> None:
    for cut in range(len(wire)):
        decoder = Decoder()
        feed(decoder, wire[:cut])
        assert decoder.next_pdu() is NEED_DATA, cut
        needed = decoder.bytes_needed()
        assert 1 <= needed <= len(wire) - cut, cut
        assert decoder.trailing_data == wire[:cut]


@pytest.mark.parametrize(("name", "pdu", "wire"), GOLDEN, ids=GOLDEN_IDS)
def test_golden_byte_by_byte(name: str, pdu: Pdu, wire: bytes) -> None:
    decoder = Decoder()
    for i in range(len(wire) - 1):
        decoder.receive_data(wire[i : i + 1])
        assert decoder.next_pdu() is NEED_DATA
    decoder.receive_data(wire[-1:])
    assert decoder.next_pdu() == pdu


def test_decoded_values_are_typed() -> None:
    pdu = decode_one(encode(ExportRequest(DEV_B)))
    assert isinstance(pdu, ExportRequest)
    assert type(pdu.device.speed) is Speed
    header = decode_header(h("0111 0006 00000002"))
    assert header == Header(0x0111, Op.REP_EXPORT, 2)
    assert type(header.code) is Op


def test_devid() -> None:
    assert DEV_A.devid == 0x0001_0002
    assert DEV_B.devid == 0x0003_0011


def test_need_data_repr() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"


def test_interface_padding_byte_is_ignored() -> None:
    wire = h("0111 0005 00000000", "00000001", DEV_A_HEX, "08 06 50 ff")
    assert decode_one(wire) == DevlistReply(0, ((DEV_A, DEV_A_IFACES),))


def test_several_pdus_in_one_stream() -> None:
    decoder = Decoder()
    decoder.receive_data(b"".join(wire for _, _, wire in GOLDEN))
    for _, pdu, _ in GOLDEN:
        assert decoder.next_pdu() == pdu
    assert decoder.next_pdu() is NEED_DATA
    assert decoder.trailing_data == b""


def test_trailing_urb_bytes_after_export_reply() -> None:
    # A USBIP_CMD_SUBMIT header starts right after the reply.
    urb = h("00000001 00000002 00010002 00000000 00000000")
    decoder = Decoder()
    decoder.receive_data(h("0111 0006 00000000") + urb)
    assert decoder.bytes_needed() == 0
    assert decoder.next_pdu() == ExportReply(ExportStatus.ATTACHED)
    assert decoder.trailing_data == urb


def test_export_reply_reads_exactly_eight_bytes() -> None:
    decoder = Decoder(accept=[Op.REP_EXPORT])
    assert decoder.bytes_needed() == 8
    decoder.receive_data(h("0111 0006"))
    assert decoder.bytes_needed() == 4
    decoder.receive_data(h("00000000"))
    assert decoder.bytes_needed() == 0
    assert decoder.next_pdu() == ExportReply(0)


def test_bytes_needed_walks_devlist_pieces() -> None:
    wire = GOLDEN[1][2]
    decoder = Decoder()
    steps = []
    while (n := decoder.bytes_needed()) > 0:
        steps.append(n)
        decoder.receive_data(wire[:n])
        wire = wire[n:]
    # header, count, record A, its interface, record B, its two interfaces
    assert steps == [8, 4, 312, 4, 312, 8]
    assert wire == b""


def test_end_of_stream_after_a_complete_pdu() -> None:
    decoder = Decoder()
    decoder.receive_data(h("0111 0007 00000001"))
    decoder.receive_data(b"")
    assert decoder.next_pdu() == UnexportReply(UnexportStatus.FAILED)
    with pytest.raises(ProtocolError, match=r"^connection closed during header: got 0 of 8"):
        decoder.next_pdu()


def test_data_after_end_of_stream_is_misuse() -> None:
    decoder = Decoder()
    decoder.receive_data(b"")
    decoder.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        decoder.receive_data(b"\x01")


# --- bad input from the peer -----------------------------------------------


def with_byte(hex_record: str, offset: int, value: int) -> str:
    raw = bytearray(h(hex_record))
    raw[offset] = value
    return raw.hex()


def with_bytes(hex_record: str, offset: int, data: bytes) -> str:
    raw = bytearray(h(hex_record))
    raw[offset : offset + len(data)] = data
    return raw.hex()


BAD_INPUT: list[tuple[str, bytes, str]] = [
    ("garbage header", b"GET / HTTP/1.1\r\n", "bad version 0x4745, expected 0x0111"),
    ("old version", h("0110 8005 00000000"), "bad version 0x0110, expected 0x0111"),
    ("unknown request code", h("0111 8009 00000000"), "unknown op code 0x8009"),
    ("crypkey is unsupported", h("0111 8004 00000000"), "unknown op code 0x8004"),
    ("unknown reply code", h("0111 0002 00000000"), "unknown op code 0x0002"),
    ("no request bit", h("0111 0000 00000000"), "unknown op code 0x0000"),
    (
        "status on a request",
        h("0111 8005 00000001"),
        "request 0x8005 has status 1, expected 0",
    ),
    (
        "status on an export request",
        h("0111 8006 ffffffff", DEV_A_HEX),
        "request 0x8006 has status 4294967295, expected 0",
    ),
    (
        "oversized device count",
        h("0111 0005 00000000 000186a0"),
        "device count 100000 exceeds limit 4096",
    ),
    (
        "device count one past the limit",
        h("0111 0005 00000000 00001001"),
        "device count 4097 exceeds limit 4096",
    ),
    (
        "unknown speed",
        h("0111 8006 00000000", with_byte(DEV_A_HEX, 299, 7)),
        "unknown speed 7",
    ),
    (
        "too many interfaces",
        h("0111 0003 00000000", with_byte(DEV_A_HEX, 311, 33)),
        "interface count 33 exceeds limit 32",
    ),
    (
        "busid without NUL",
        h("0111 8003 00000000", "61" * 32),
        "busid field is not NUL-terminated",
    ),
    (
        "byte after the busid terminator",
        h("0111 8003 00000000", "312d31 00 78", "00" * 27),
        "busid field has byte 0x78 after its NUL terminator (offset 4)",
    ),
    (
        "last byte of the busid field",
        h("0111 8003 00000000", "312d31", "00" * 28, "01"),
        "busid field has byte 0x01 after its NUL terminator (offset 31)",
    ),
    (
        "byte after the path terminator",
        h("0111 8007 00000000", with_byte(DEV_A_HEX, 255, 0x20)),
        "path field has byte 0x20 after its NUL terminator (offset 255)",
    ),
    (
        "path without NUL",
        h("0111 8007 00000000", with_bytes(DEV_A_HEX, 0, b"/" * 256)),
        "path field is not NUL-terminated",
    ),
    ("empty busid", h("0111 8003 00000000", "00" * 32), "busid field is empty"),
    (
        "space in busid",
        h("0111 8003 00000000", "31 20 31", "00" * 29),
        "busid field contains byte 0x20 at offset 1",
    ),
    (
        "slash in busid",
        h("0111 8003 00000000", "2e 2e 2f 78", "00" * 28),
        "busid field contains byte 0x2f at offset 2",
    ),
    (
        "non-ASCII busid",
        h("0111 8006 00000000", with_byte(DEV_A_HEX, 256 + 1, 0xE9)),
        "busid field contains byte 0xe9 at offset 1",
    ),
    (
        "path not UTF-8",
        h("0111 8006 00000000", with_byte(DEV_A_HEX, 5, 0xFF)),
        "path field is not UTF-8 (byte offset 5)",
    ),
    (
        "newline in path",
        h("0111 8006 00000000", with_byte(DEV_A_HEX, 3, 0x0A)),
        "path field contains control byte 0x0a at offset 3",
    ),
    (
        "bad second device in a list",
        h(
            "0111 0005 00000000 00000002",
            DEV_A_HEX,
            DEV_A_IFACES_HEX,
            with_byte(DEV_B_HEX, 299, 9),
        ),
        "unknown speed 9",
    ),
]


@pytest.mark.parametrize(
    ("name", "wire", "message"), BAD_INPUT, ids=[name for name, _, _ in BAD_INPUT]
)
def test_bad_input(name: str, wire: bytes, message: str) -> None:
    assert decode_error(wire) == message


TRUNCATED: list[tuple[str, bytes, str]] = [
    ("nothing", b"", "connection closed during header: got 0 of 8 bytes"),
    ("header", h("0111 80"), "connection closed during header: got 3 of 8 bytes"),
    (
        "device record",
        h("0111 8006 00000000", DEV_A_HEX)[: 8 + 100],
        "connection closed during device record: got 100 of 312 bytes",
    ),
    (
        "busid",
        h("0111 8003 00000000 31 2d"),
        "connection closed during busid: got 2 of 32 bytes",
    ),
    (
        "device count",
        h("0111 0005 00000000 0000"),
        "connection closed during device count: got 2 of 4 bytes",
    ),
    (
        "interface records",
        h("0111 0005 00000000 00000001", DEV_B_HEX, "ff fe 00 00 02"),
        "connection closed during interface records: got 5 of 8 bytes",
    ),
]


@pytest.mark.parametrize(
    ("name", "wire", "message"), TRUNCATED, ids=[name for name, _, _ in TRUNCATED]
)
def test_truncated_at_end_of_stream(name: str, wire: bytes, message: str) -> None:
    assert decode_error(wire, eof=True) == message


def test_unexpected_op_refused_after_header() -> None:
    decoder = Decoder(accept=[Op.REP_EXPORT])
    message = decode_error(h("0111 0003 00000000"), decoder=decoder)
    assert message == "unexpected op code 0x0003 (REP_IMPORT)"


def test_error_state_is_terminal() -> None:
    decoder = Decoder()
    first = decode_error(h("0110 8005 00000000"), decoder=decoder)
    for call in (decoder.next_pdu, decoder.bytes_needed, lambda: decoder.receive_data(b"x")):
        with pytest.raises(ProtocolError) as info:
            call()
        assert str(info.value) == first
    assert decoder.trailing_data == h("0110 8005 00000000")


def test_bytes_needed_raises_on_bad_header() -> None:
    decoder = Decoder()
    decoder.receive_data(h("0111 8009 00000000"))
    with pytest.raises(ProtocolError, match=r"^unknown op code 0x8009$"):
        decoder.bytes_needed()
    with pytest.raises(ProtocolError, match=r"^unknown op code 0x8009$"):
        decoder.next_pdu()


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)
    assert not issubclass(LocalProtocolError, ProtocolError)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (h("0111 8005 00000000"), None),
        (h("0111 80"), "truncated header: got 3 of 8 bytes"),
        (h("0111 8005 00000001"), "request 0x8005 has status 1, expected 0"),
        (h("1101 8005 00000000"), "bad version 0x1101, expected 0x0111"),
    ],
)
def test_decode_header(wire: bytes, message: str | None) -> None:
    if message is None:
        assert decode_header(wire) == Header(0x0111, Op.REQ_DEVLIST, 0)
    else:
        with pytest.raises(ProtocolError) as info:
            decode_header(wire)
        assert str(info.value) == message


def test_decode_header_too_long_is_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        decode_header(h("0111 8005 00000000 00"))


# --- API misuse on encode ----------------------------------------------------


def dev(**changes: object) -> DeviceRecord:
    fields = dict(DEV_A.__dict__)
    fields.update(changes)
    return DeviceRecord(**fields)


@pytest.mark.parametrize(
    ("pdu", "message"),
    [
        (ImportRequest("1" * 32), "busid '" + "1" * 32 + "' is 32 bytes, limit 31"),
        (ImportRequest(""), "busid '' is empty"),
        (ImportRequest("1-1\0"), "busid '1-1\\x00' contains byte 0x00 at offset 3"),
        (ImportRequest("1 1"), "busid '1 1' contains byte 0x20 at offset 1"),
        (ImportRequest("1-é"), "busid '1-é' is not ASCII"),
        (ExportRequest(dev(path="/" * 256)), "path is 256 bytes, limit 255"),
        (ExportRequest(dev(path="a\nb")), "path 'a\\nb' contains control byte 0x0a at offset 1"),
        (ExportRequest(dev(path="\ud800")), "path '\\ud800' is not encodable as UTF-8"),
        (ExportRequest(dev(speed=7)), "unknown speed 7"),
        (ExportRequest(dev(busnum=-1)), "busnum -1 does not fit in 32 bits"),
        (ExportRequest(dev(id_vendor=0x10000)), "id_vendor 65536 does not fit in 16 bits"),
        (ExportRequest(dev(device_class=256)), "device_class 256 does not fit in 8 bits"),
        (ExportRequest(dev(num_interfaces=33)), "interface count 33 exceeds limit 32"),
        (ExportReply(-1), "status -1 does not fit in 32 bits"),
        (UnexportReply(1 << 32), "status 4294967296 does not fit in 32 bits"),
        (ImportReply(0, None), "ImportReply with status 0 needs a device"),
        (ImportReply(1, DEV_A), "ImportReply with status 1 cannot carry a device"),
        (
            DevlistReply(1, ((DEV_A, DEV_A_IFACES),)),
            "DevlistReply with status 1 cannot list devices",
        ),
        (
            DevlistReply(0, ((DEV_A, ()),)),
            "device '1-1' declares 1 interfaces but 0 are given",
        ),
        (
            DevlistReply(0, ((DEV_A, (InterfaceRecord(256, 0, 0),)),)),
            "interface class 256 does not fit in 8 bits",
        ),
        (
            DevlistReply(0, ((dev(num_interfaces=0), ()),) * (MAX_DEVICES + 1)),
            "device count 4097 exceeds limit 4096",
        ),
        ("not a pdu", "not a USB/IP PDU: 'not a pdu'"),
    ],
)
def test_encode_misuse(pdu: Pdu, message: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode(pdu)
    assert str(info.value) == message


def test_encode_limits_are_inclusive() -> None:
    edge = dev(path="/" * 255, busid="x" * 31, num_interfaces=32, busnum=0xFFFFFFFF)
    assert decode_one(encode(ExportRequest(edge))) == ExportRequest(edge)


# --- properties --------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
busids = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/"),
    min_size=1,
    max_size=31,
)
paths = st.one_of(
    st.text(
        st.characters(min_codepoint=0x20, exclude_characters="\x7f", exclude_categories=["Cs"]),
        max_size=60,
    ),
    st.text("/ab-.:0", min_size=255, max_size=255),
)
interfaces = st.builds(InterfaceRecord, u8, u8, u8)


@st.composite
def devices(draw: st.DrawFn, max_interfaces: int = 32) -> DeviceRecord:
    return DeviceRecord(
        path=draw(paths),
        busid=draw(busids),
        busnum=draw(u32),
        devnum=draw(u32),
        speed=draw(st.sampled_from(Speed)),
        id_vendor=draw(u16),
        id_product=draw(u16),
        bcd_device=draw(u16),
        device_class=draw(u8),
        device_subclass=draw(u8),
        device_protocol=draw(u8),
        configuration_value=draw(u8),
        num_configurations=draw(u8),
        num_interfaces=draw(st.integers(0, max_interfaces)),
    )


@st.composite
def devlist_entries(draw: st.DrawFn) -> tuple[DeviceRecord, tuple[InterfaceRecord, ...]]:
    device = draw(devices(max_interfaces=6))
    ifaces = draw(
        st.lists(interfaces, min_size=device.num_interfaces, max_size=device.num_interfaces)
    )
    return device, tuple(ifaces)


statuses = st.one_of(st.integers(0, 5), u32)
pdus: st.SearchStrategy[Pdu] = st.one_of(
    st.just(DevlistRequest()),
    st.builds(DevlistReply, st.just(0), st.lists(devlist_entries(), max_size=3).map(tuple)),
    st.builds(DevlistReply, statuses.filter(bool), st.just(())),
    st.builds(ImportRequest, busids),
    st.builds(ImportReply, st.just(0), devices()),
    st.builds(ImportReply, statuses.filter(bool), st.none()),
    st.builds(ExportRequest, devices()),
    st.builds(ExportReply, statuses),
    st.builds(UnexportRequest, devices()),
    st.builds(UnexportReply, statuses),
)


@settings(max_examples=150)
@given(pdus)
def test_roundtrip(pdu: Pdu) -> None:
    wire = encode(pdu)
    assert decode_one(wire) == pdu
    assert encode(decode_one(wire)) == wire


@settings(max_examples=100)
@given(pdus, st.data())
def test_any_chunking_decodes_identically(pdu: Pdu, data: st.DataObject) -> None:
    wire = encode(pdu)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=8))))
    decoder = Decoder()
    results = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        feed(decoder, wire[start:end])
        results.append(decoder.next_pdu())
    assert results[:-1] == [NEED_DATA] * (len(results) - 1)
    assert results[-1] == pdu
    assert decoder.trailing_data == b""


@settings(max_examples=100)
@given(pdus, st.data())
def test_any_truncation_needs_data(pdu: Pdu, data: st.DataObject) -> None:
    wire = encode(pdu)
    cut = data.draw(st.integers(0, len(wire) - 1))
    decoder = Decoder()
    feed(decoder, wire[:cut])
    assert decoder.next_pdu() is NEED_DATA
    assert 1 <= decoder.bytes_needed() <= len(wire) - cut


@settings(max_examples=100)
@given(pdus, st.binary(max_size=64))
def test_exact_reads_never_overrun(pdu: Pdu, following: bytes) -> None:
    # Simulate recv(bytes_needed()) on a stream where other bytes follow.
    stream = encode(pdu) + following
    decoder = Decoder()
    taken = 0
    while (n := decoder.bytes_needed()) > 0:
        decoder.receive_data(stream[taken : taken + n])
        taken += n
    assert taken == len(encode(pdu))
    assert decoder.next_pdu() == pdu
    assert decoder.trailing_data == b""


@settings(max_examples=100)
@given(st.sampled_from(ExportStatus), st.binary(min_size=1, max_size=200), st.data())
def test_trailing_data_after_export_reply_is_exact(
    status: ExportStatus, following: bytes, data: st.DataObject
) -> None:
    wire = encode(ExportReply(status)) + following
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=5)))
    decoder = Decoder()
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        feed(decoder, wire[start:end])
    assert decoder.next_pdu() == ExportReply(status)
    assert decoder.trailing_data == following


@settings(max_examples=100)
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE + 40))
def test_random_bytes_raise_protocol_error_or_decode(wire: bytes) -> None:
    decoder = Decoder()
    decoder.receive_data(wire)
    try:
        decoder.next_pdu()
    except ProtocolError as exc:
        assert str(exc)


def test_a_bare_record_is_zero_but_for_what_is_known() -> None:
    """An UNEXPORT of a device that is gone carries its busid alone."""
    bare = DeviceRecord.bare("1-4", id_vendor=0x1D6B)
    assert (bare.busid, bare.id_vendor, bare.path, bare.speed) == ("1-4", 0x1D6B, "", Speed.UNKNOWN)
    numbers = [getattr(bare, f) for f in ("busnum", "devnum", "bcd_device", "num_interfaces")]
    assert numbers == [0, 0, 0, 0]
    assert decode_one(encode(UnexportRequest(bare))) == UnexportRequest(bare)
