"""Fixtures of the fault suite: each side with its own fake kernel, a real usbipa.

The suite must stay bounded (well under a minute in all): hypothesis runs a
modest number of examples, every wait polls a condition with a deadline, and
usbipa's control timeout is short where a test waits for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rig import FakeKernel, Usbipa

# Short enough that a test can wait for it, long enough for a loaded CI box.
CONTROL_TIMEOUT = 0.5
PER_PEER = 8
LIMITS = {
    "control_timeout": CONTROL_TIMEOUT,
    "per_peer_connections": PER_PEER,
    "max_connections": 64,
}


@pytest.fixture
def kernels(tmp_path: Path) -> Iterator[tuple[FakeKernel, FakeKernel]]:
    """Two machines' kernels: the device side's (usbip-host) and the application side's
    (vhci_hcd). Stopped together: each takes up to half a second to notice."""
    device = FakeKernel(tmp_path / "device", vhci=False)
    app = FakeKernel(tmp_path / "app", stub=False)
    device.start()
    try:
        app.start()
        try:
            yield device, app
        finally:
            app.terminate()
            device.terminate()
            app.stop()
    finally:
        device.stop()
    # A write that would have oopsed Linux fails the test that caused it.
    faults = device.tree.kernel_faults()
    assert not faults, "\n".join(faults)


@pytest.fixture
def device(kernels: tuple[FakeKernel, FakeKernel]) -> FakeKernel:
    return kernels[0]


@pytest.fixture
def app(kernels: tuple[FakeKernel, FakeKernel]) -> FakeKernel:
    return kernels[1]


@pytest.fixture
def usbipa(app: FakeKernel, tmp_path: Path) -> Iterator[Usbipa]:
    with Usbipa(app, tmp_path / "usbipa", {"limits": LIMITS}) as daemon:
        yield daemon
