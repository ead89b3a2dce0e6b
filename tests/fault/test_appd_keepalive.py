"""What usbipa's plain sockets carry into the kernel.

The Appd runs in this process (as in test_appd_bookkeeping) so the socket can
be seen at the moment it is written to vhci's `attach`: after that only the
kernel holds it.
"""

from __future__ import annotations

import socket
from pathlib import Path

from hotplug.app.config import AllowRule, AppdConfig, parse_network
from hotplug.app.server import Appd
from hotplug.device.export import export
from hotplug.device.transport import Remote
from hotplug.testing.fake_kernel import FakeVhci
from hotplug.usb import Speed
from hotplug.wire.sockets import Timeouts
from tests.fault.appd_loop import LoopThread
from tests.rig import FakeKernel


class WatchedVhci(FakeVhci):
    """The fake vhci, noting the options of each socket handed to `attach`."""

    seen: list[tuple[int, int, int]]

    def attach(self, port: int, sock: socket.socket, devid: int, speed: Speed) -> None:
        self.seen.append(
            (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            )
        )
        super().attach(port, sock, devid, speed)


def test_plain_socket_has_keepalive_before_vhci_gets_it(
    device: FakeKernel, app: FakeKernel, tmp_path: Path
) -> None:
    """Issue 12, finding 9: usbipa gave vhci its plain sockets untuned, so a
    device side that vanished without a word kept its vhci port for ever.
    Now they get keepalive and TCP_USER_TIMEOUT, as the device side's do."""
    vhci = WatchedVhci(app.tree.paths, app.tree.server_socket)
    vhci.seen = []
    config = AppdConfig(
        listen=("127.0.0.1",),
        port=0,
        allow=(AllowRule((parse_network("127.0.0.0/8", "test"),)),),
        state_dir=str(tmp_path / "appd-state"),
    )
    runner = LoopThread(Appd(config, vhci))
    try:
        device.plug("1-1")
        export(device.stub(), "1-1", Remote.plain(runner.endpoint, Timeouts(2, 2)))
    finally:
        runner.stop()
    wanted = Timeouts()
    assert vhci.seen == [(1, wanted.keepalive_idle, int(wanted.user_timeout * 1000))]
