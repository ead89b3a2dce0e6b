"""usbids.py: names from the usb.ids format."""

from __future__ import annotations

from hotplug.usbids import parse as parse_usbids


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
