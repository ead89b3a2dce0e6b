"""Issue 12, finding 7, on the real kernel: usbipa's `devices:` filter admits an
export by the vid:pid the peer claims in OP_EXPORT; once the device has
enumerated behind vhci_hcd, usbipa compares what the kernel read from the
device itself and detaches a device that is not the one it admitted.

The lying device side is a few lines on hotplug's own codec and kernel layer:
it binds a real mass-storage gadget (1d6b:0104) to usbip-host, sends a record
that claims 1234:5678 (the only ids usbipa's filter admits) and hands the
socket to usbip-host as an honest export would.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hotplug.device.export import device_record
from hotplug.device.transport import Remote, handshake_export
from hotplug.kernel.stub import StubStatus, UsbipHost
from hotplug.kernel.sysfs import read_device
from hotplug.testing.vm import gadget as gd
from hotplug.wire.address import Endpoint
from hotplug.wire.sockets import Timeouts
from tests.vm.guest.oneshot import Usbipa, serving, start_usbipa, stop, used_ports

USBIPA_PORT = 3256  # 3240 usbipd, 3250/3251 export, 3252 daemon, 3253 matrix, 3254 hid, 3255 repeat
ENUM = 90.0  # enumeration-related waits (emulated guest, 2 busy host cores)
CLAIMED = (0x1234, 0x5678)


@pytest.fixture
def filtering_usbipa(usbip_modules: None, tmp_path: Path) -> Iterator[Usbipa]:
    """usbipa admitting from loopback only devices that claim 1234:5678."""
    daemon = start_usbipa(
        tmp_path, port=USBIPA_PORT, extra=("--device", f"{CLAIMED[0]:04x}:{CLAIMED[1]:04x}")
    )
    with serving(daemon.proc):
        yield daemon


def test_device_that_enumerates_with_other_ids_than_claimed_is_detached(
    plugged_gadget: gd.MassStorageGadget,
    filtering_usbipa: Usbipa,
    record_property: Callable[[str, object], None],
) -> None:
    """Issue 12, finding 7: a device side claims 1234:5678 (admitted by `--device
    1234:5678`) for a 1d6b:0104 disk; usbipa attaches it, sees 1d6b:0104 behind
    vhci_hcd and detaches it, which closes the link back to usbip-host."""
    usbipa = filtering_usbipa
    busid = plugged_gadget.wait_busid()
    stub = UsbipHost()
    real = read_device(stub.paths, busid)
    assert (real.vendor, real.product) == (0x1D6B, 0x0104)
    claim = dataclasses.replace(device_record(real), id_vendor=CLAIMED[0], id_product=CLAIMED[1])
    stub.bind(busid, real)
    try:
        t0 = time.monotonic()
        endpoint = Endpoint("127.0.0.1", usbipa.port)
        with handshake_export(claim, Remote.plain(endpoint, Timeouts(handshake=30))) as sock:
            stub.hand_over(busid, sock)  # accepted: usbipa attached it
        assert stub.status(busid) == StubStatus.USED
        # usbipa's detach closes the link: usbip-host's stub leaves "used".
        gd.wait_until(
            lambda: stub.status(busid) != StubStatus.USED,
            timeout=ENUM,
            what="usbip-host to lose the link (usbipa detached the port)",
        )
        gd.wait_until(lambda: not used_ports(), timeout=30, what="the vhci port freed")
        record_property("s_export_to_detached", f"{time.monotonic() - t0:.2f}")
        # The port reads free before the hub's work has removed the device behind
        # it (khubd handles the disconnect afterwards; seconds under load).
        gd.wait_until(
            lambda: not plugged_gadget.vhci_devices(),
            timeout=ENUM,
            what="the device behind vhci_hcd gone",
        )
    finally:
        stub.release(busid)
    plugged_gadget.wait_block_device(timeout=ENUM)  # given back to its own driver
    text = stop(usbipa.proc)
    print("usbipa log:\n" + text)
    assert re.search(rf"attached {re.escape(busid)} from 127\.0\.0\.1 on port (\d+)", text), text
    assert re.search(
        rf"detached port \d+: {re.escape(busid)} from \S+ \(the device that enumerated is "
        r"1d6b:0104, not the 1234:5678 its export claimed\)",
        text,
    ), text
