"""kernel/vhci.py: the status files as Debian's 6.1 kernel prints them, ports, records."""

from __future__ import annotations

import pytest

from hotplug.kernel.vhci import PortRecord, VhciStatusError, parse_status, pick_free_port
from hotplug.usb import Speed

# As printed by Debian's 6.1 kernel (8 ports per hub), one port used.
STATUS_6_1 = """hub port sta spd dev      sockfd local_busid
hs  0000 006 003 00010005 000007 3-1
hs  0001 004 000 00000000 000000 0-0
ss  0008 004 000 00000000 000000 0-0
ss  0009 004 000 00000000 000000 0-0
"""


def test_parse_status_6_1() -> None:
    ports = parse_status(STATUS_6_1)
    assert [p.port for p in ports] == [0, 1, 8, 9]
    used = ports[0]
    assert (used.hub, used.state, used.speed, used.devid, used.sockfd, used.local_busid) == (
        "hs",
        6,
        3,
        0x10005,
        7,
        "3-1",
    )
    assert not used.free and ports[1].free


def test_parse_status_without_sockfd_column() -> None:
    # Kernels before 4.15 print a socket pointer column under another name.
    text = (
        "hub port sta spd dev      socket           local_busid\n"
        "hs  0000 004 000 00000000 0000000000000000 0-0\n"
    )
    (port,) = parse_status(text)
    assert port.free and port.sockfd == 0


def test_parse_status_rejects_pre_4_13_format() -> None:
    with pytest.raises(VhciStatusError, match=r"before 4\.13"):
        parse_status("prt sta spd bus dev socket local_busid\n000 004 000 000 000 0 0-0\n")


def test_pick_free_port_by_speed_class() -> None:
    ports = parse_status(STATUS_6_1)
    high = pick_free_port(ports, Speed.HIGH)
    superspeed = pick_free_port(ports, Speed.SUPER)
    assert high is not None and high.port == 1
    assert superspeed is not None and superspeed.port == 8
    assert pick_free_port(ports[:1], Speed.FULL) is None


def test_port_record_round_trip() -> None:
    record = PortRecord("192.0.2.7", "41234", "1-1.2")
    assert record.render() == "192.0.2.7 41234 1-1.2\n"
    assert PortRecord.parse(record.render()) == record
    assert PortRecord.parse("garbage") is None
