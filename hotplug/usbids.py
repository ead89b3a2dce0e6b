"""Vendor and product names from the system's usb.ids database (as lsusb shows them)."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

SEARCH_PATH = (
    "/usr/share/hwdata/usb.ids",
    "/usr/share/misc/usb.ids",
    "/usr/share/usb.ids",
    "/var/lib/usbutils/usb.ids",
)


class UsbIds:
    def __init__(self, vendors: dict[int, str], products: dict[tuple[int, int], str]) -> None:
        self.vendors = vendors
        self.products = products

    def vendor(self, vid: int) -> str | None:
        return self.vendors.get(vid)

    def product(self, vid: int, pid: int) -> str | None:
        return self.products.get((vid, pid))


def parse(lines: Iterable[str]) -> UsbIds:
    """Parse the usb.ids format: vendors at column 0, their products indented by one tab.

    Only the vendor section is read; it ends where the class lists ('C 00 ...') begin.
    """
    vendors: dict[int, str] = {}
    products: dict[tuple[int, int], str] = {}
    current: int | None = None
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("\t\t"):
            continue  # interfaces
        if line.startswith("\t"):
            if current is None:
                continue
            ident, _, name = line.strip().partition(" ")
            try:
                products[(current, int(ident, 16))] = name.strip()
            except ValueError:
                continue
            continue
        ident, _, name = line.partition(" ")
        if len(ident) != 4:
            break  # 'C 00  (Defined at Interface level)': past the vendor list
        try:
            current = int(ident, 16)
        except ValueError:
            break
        vendors[current] = name.strip()
    return UsbIds(vendors, products)


@functools.lru_cache(maxsize=1)
def system_database() -> UsbIds:
    override = os.environ.get("USBIP_HOTPLUG_USB_IDS")
    for path in (override,) if override else SEARCH_PATH:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return parse(f)
        except OSError:
            continue
    return UsbIds({}, {})


def names(vid: int, pid: int, fallback_vendor: str | None, fallback_product: str | None) -> str:
    """'Vendor : Product' as `usbip list -l` prints it, falling back to the device's strings."""
    db = system_database()
    vendor = db.vendor(vid) or fallback_vendor or "unknown vendor"
    product = db.product(vid, pid) or fallback_product or "unknown product"
    return f"{vendor} : {product}"
