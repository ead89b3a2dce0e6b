"""usbipa's own books after hostile clients: no task, connection count or session
left behind, and no exception that escaped a task.

The subprocess tests see fds and ports from outside; tasks and counters are
only visible inside, so here the same `Appd` runs on an event loop in a
thread of the test process, on a fake vhci, and is asked from that loop.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotplug.app.config import AllowRule, AppdConfig, Limits, parse_network
from hotplug.app.server import Appd
from hotplug.device.export import export, unexport
from hotplug.device.transport import Remote
from hotplug.wire.protocol import DevlistRequest, encode
from hotplug.wire.sockets import Timeouts
from tests.fault.appd_loop import LoopThread
from tests.fault.checks import check_reply, closed_by_server, dribble, talk
from tests.helpers import wait_for
from tests.rig import FakeKernel


@pytest.fixture(params=["state dir ok", "state dir blocked"])
def served(app: FakeKernel, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    if request.param == "state dir blocked":
        (tmp_path / "appd-state").mkdir()
        (tmp_path / "appd-state" / "ports").write_text("a file in the way\n")
    config = AppdConfig(
        listen=("127.0.0.1",),
        port=0,
        allow=(AllowRule((parse_network("127.0.0.0/8", "test"),)),),
        limits=Limits(control_timeout=0.5, per_peer_connections=4, max_connections=8),
        state_dir=str(tmp_path / "appd-state"),
    )
    runner = LoopThread(Appd(config, app.vhci()))
    try:
        yield runner
    finally:
        runner.stop()


def test_books_balance_after_hostile_clients(
    served: LoopThread, device: FakeKernel, app: FakeKernel
) -> None:
    port = served.port
    # Garbage, a cut-short request, a reply sent as a request.
    for payload in (b"\xff" * 40, b"\x01\x11\x80\x06" + b"\0" * 50, b"\x01\x11\x00\x06\0\0\0\0"):
        assert talk(port, payload) == b""
    # A flood over the per-peer limit, held open by slow senders that time out.
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    wait_for(lambda: served.books()[1] == 4, 5, "4 connections counted")
    extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    for sock in extra:
        assert closed_by_server(sock, 5)
        sock.close()
    took = dribble({str(i): (sock, b"\x01\x11\x80") for i, sock in enumerate(held)}, 0.02, 5.0)
    assert all(t is not None for t in took.values()), took
    for sock in held:
        sock.close()
    # A real export and unexport in between.
    device.plug("1-1")
    export(device.stub(), "1-1", Remote.plain(served.endpoint, Timeouts(2, 2)))
    assert served.books()[3] == 1 and len(app.used_ports()) == 1
    unexport(device.stub(), "1-1", Remote.plain(served.endpoint, Timeouts(2, 2)))
    check_reply(encode(DevlistRequest()), talk(port, encode(DevlistRequest())))
    wait_for(lambda: served.books() == (0, 0, {}, 0), 5, "usbipa's books to balance")
    assert not app.used_ports()
    assert served.unhandled == [], served.unhandled
