"""connect/disconnect against the real usbipa over loopback TCP, with the fake kernel."""

from __future__ import annotations

from pathlib import Path

from hotplug.kernel.vhci import PortState
from hotplug.testing.fake_kernel import FakeTree
from tests.integration.conftest import DISK
from tests.integration.export_facts import driver, stub_status, used_ports
from tests.rig import run_cli, running_usbipa


def test_connect_then_disconnect(tree: FakeTree, state: Path) -> None:
    tree.add_device(DISK, devnum=5)
    with running_usbipa(tree, state) as (_, port):
        result = run_cli(tree, state, "connect", "-r", f"127.0.0.1:{port}", "-b", "1-1")
        assert result.returncode == 0, result.stderr
        assert "exported 1-1" in result.stdout
        assert stub_status(tree, "1-1") == "2"
        assert driver(tree, "1-1") == "usbip-host"
        (vport,) = [p for p in tree.vhci().ports() if p.state == PortState.USED]
        assert vport.devid == (1 << 16) | 5
        assert vport.hub == "hs"
        record = (tree.paths.vhci_records / f"port{vport.port}").read_text().split()
        assert record[0] == "127.0.0.1" and record[2] == "1-1"

        result = run_cli(tree, state, "disconnect", "-b", "1-1")
        assert result.returncode == 0, result.stderr
        assert used_ports(tree) == []
        assert driver(tree, "1-1") == "usb"
        assert stub_status(tree, "1-1") is None
        assert not (tree.paths.vhci_records / f"port{vport.port}").exists()
