"""Pure parts of the kernel layer and their neighbours: vhci status, addresses, config."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hotplug.app.config import AllowRule, AppdConfig, ConfigError, authorize, parse_config
from hotplug.kernel import sysfs
from hotplug.kernel.sysfs import SysfsPaths
from hotplug.kernel.vhci import PortRecord, VhciStatusError, parse_status, pick_free_port
from hotplug.log import encode_journal
from hotplug.usb import Speed
from hotplug.usbids import parse as parse_usbids

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


def rule(*nets: str, devices: tuple[str, ...] = (), max_devices: int | None = None) -> AllowRule:
    return AllowRule(tuple(ipaddress.ip_network(n) for n in nets), devices, max_devices)


def test_authorize_default_deny() -> None:
    assert authorize(AppdConfig(), ipaddress.ip_address("127.0.0.1"), 1, 2, 0) == (
        "peer not in any allow list"
    )


def test_authorize_devices_and_limits() -> None:
    config = AppdConfig(allow=(rule("10.0.0.0/8", devices=("0781:*",), max_devices=1),))
    peer = ipaddress.ip_address("10.1.2.3")
    assert authorize(config, peer, 0x0781, 0x5567, 0) is None
    assert "not allowed" in (authorize(config, peer, 0x1234, 0x5678, 0) or "")
    assert "max_devices 1" in (authorize(config, peer, 0x0781, 0x5567, 1) or "")
    assert authorize(config, ipaddress.ip_address("::1"), 0x0781, 0x5567, 0) is not None


def test_parse_config_full() -> None:
    config = parse_config(
        "listen: [127.0.0.1]\nport: 3241\nallow:\n  - from: [127.0.0.0/8, '::1']\n"
        "    devices: ['1d6b:*']\n    max_devices: 2\nlimits: {control_timeout: 2}\n",
        "usbipa.yaml",
    )
    assert config.listen == ("127.0.0.1",) and config.port == 3241
    assert config.allow[0].max_devices == 2 and config.limits.control_timeout == 2.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("allow:\n  - form: 10.0.0.0/8\n", "allow[0]: unknown key 'form'"),
        ("allow:\n  - from: 10.0.0.300/8\n", "expected an address or CIDR network"),
        ("allow:\n  - from: 10.0.0.0/8\n    devices: [zz]\n", "expected vid:pid"),
        ("port: 0\n", "port: expected 1..65535"),
        ("listen: [\n", "usbipa.yaml:2: YAML syntax error"),
        ("limits: {control_timeout: -1}\n", "expected a positive number"),
    ],
)
def test_parse_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(text, "usbipa.yaml")


def test_usbids_parse() -> None:
    db = parse_usbids(
        [
            "# comment\n",
            "1d6b  Linux Foundation\n",
            "\t0002  2.0 root hub\n",
            "\t\t00  interface line\n",
            "C 00  (Defined at Interface level)\n",
            "\t01  Audio\n",
        ]
    )
    assert db.vendor(0x1D6B) == "Linux Foundation"
    assert db.product(0x1D6B, 0x0002) == "2.0 root hub"
    assert db.vendor(0x00) is None


def test_journal_encoding_multiline() -> None:
    data = encode_journal({"MESSAGE": "a\nb", "USBIP_BUSID": "1-1"})
    assert data.startswith(b"MESSAGE\n\x03\x00\x00\x00\x00\x00\x00\x00a\nb\n")
    assert data.endswith(b"USBIP_BUSID=1-1\n")


def test_read_device_of_a_device_unplugged_mid_lookup_is_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's realpath lstat()s the busid link and then readlink()s it; a
    device unplugged in between raised FileNotFoundError out of read_device (seen
    in the VM suite). It must read as "no such device"."""
    paths = SysfsPaths(tmp_path)
    real = tmp_path / "sys/devices/platform/dummy_hcd.0/usb1/1-1"
    real.mkdir(parents=True)
    paths.usb_devices.mkdir(parents=True)
    (paths.usb_devices / "1-1").symlink_to(real)

    def gone_meanwhile(path: object, *, strict: bool = False) -> str:
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(sysfs.os.path, "realpath", gone_meanwhile)
    with pytest.raises(sysfs.DeviceNotFound):
        sysfs.read_device(paths, "1-1")
