"""/run in trouble: the state directory unusable (a file in the way, as when /run
is full or read-only the writes fail the same way: the record is not written).

usbipa keeps working (its records only help a restart); the device side exports
nothing it cannot record (issue 12, finding 5). Either way with a log line, and
nothing may leak. (Running as root, a read-only *permission* does not stop
a write, and a read-only mount needs privileges CI does not have: a file in
the way makes every write under it fail, for any user.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hotplug.device.export import export
from hotplug.device.transport import Remote
from hotplug.wire.sockets import Timeouts
from tests.fault.conftest import LIMITS
from tests.helpers import wait_for
from tests.rig import FakeKernel, Usbipa, run_cli

FAST = Timeouts(connect=2.0, handshake=2.0)


def block(directory: Path) -> None:
    """Put a file where usbipa keeps its port records."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ports").write_text("a file in the way\n")


@pytest.mark.parametrize("when", ["before start", "while running"])
def test_usbipa_without_its_state_directory(
    device: FakeKernel, app: FakeKernel, tmp_path: Path, when: str
) -> None:
    usbipa = Usbipa(app, tmp_path / "usbipa", {"limits": LIMITS})
    if when == "before start":
        block(usbipa.state_dir)
    with usbipa:
        if when == "before start":
            assert "cannot read session records" in usbipa.log()
        else:
            block(usbipa.state_dir)
        base = usbipa.fds()
        device.plug("1-1")
        export(device.stub(), "1-1", Remote.plain(usbipa.endpoint, FAST))  # still works
        wait_for(lambda: len(app.used_ports()) == 1, 10, "usbipa to attach (it replies first)")
        assert "cannot record port 0" in usbipa.log()
        assert "a restarted usbipa will not adopt it" in usbipa.log()
        # The link dies; the poller must still be alive to notice and say so.
        device.unplug("1-1")
        wait_for(lambda: "released by the kernel: 1-1" in usbipa.log(), 10, "the reap log line")
        assert "cannot remove the record of port 0" in usbipa.log()
        assert not app.used_ports()
        wait_for(lambda: usbipa.fds() == base, 10, f"usbipa back at {base} open files")
        # And it goes on serving.
        device.plug("1-2")
        export(device.stub(), "1-2", Remote.plain(usbipa.endpoint, FAST))
        assert usbipa.alive()
        assert "Traceback" not in usbipa.log()


def test_connect_without_a_state_directory(
    device: FakeKernel, usbipa: Usbipa, tmp_path: Path
) -> None:
    """`usbip-hotplug connect` exports nothing it cannot record, and says why
    (issue 12, finding 5: an unrecorded export is lost to `disconnect -b` and
    is "another tool's" to the daemon)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "device").write_text("a file in the way\n")  # USBIP_HOTPLUG_STATE_DIR
    device.plug("1-1")
    result = run_cli(device.tree, state, "connect", "-r", str(usbipa.endpoint), "-b", "1-1")
    assert result.returncode == 1, result.stdout
    assert "cannot write state file" in result.stderr and "1-1 is not exported" in result.stderr
    assert device.driver("1-1") == "usb" and device.stub_status("1-1") is None
    assert not usbipa.session_records()


def test_disconnect_without_a_state_directory(
    device: FakeKernel, usbipa: Usbipa, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "device").write_text("a file in the way\n")
    device.plug("1-1")
    export(device.stub(), "1-1", Remote.plain(usbipa.endpoint, FAST))
    result = run_cli(device.tree, state, "disconnect", "-r", str(usbipa.endpoint), "-b", "1-1")
    assert device.driver("1-1") == "usb"  # the work was done either way
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0


def test_usbipa_status_without_its_state_directory(app: FakeKernel, tmp_path: Path) -> None:
    """`usbipa status` says in one line what is wrong, instead of a traceback."""
    usbipa = Usbipa(app, tmp_path / "usbipa")
    block(usbipa.state_dir)
    with usbipa, pytest.raises(AssertionError) as failed:
        usbipa.status_json()
    message = str(failed.value)
    assert "usbipa: cannot read state directory" in message
    assert "Not a directory" in message and "Traceback" not in message
