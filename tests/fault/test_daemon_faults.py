"""The device-side daemon (`usbip-hotplug run`) killed with SIGKILL in the middle
of its work, and started again: it converges without exporting twice, leaks
nothing, and says what it took back.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.fault.checks import assert_no_leaks
from tests.helpers import wait_for
from tests.rig import FakeKernel, HotplugDaemon, Usbipa

POLICY = """\
version: 1
targets:
  lab: {{address: "127.0.0.1:{port}", connect_timeout: 2, handshake_timeout: 5,
         retry: {{initial: 0.1, max: 0.5, jitter: 0.1}}}}
rules:
  - {{name: disks, match: {{vendor: "1d6b"}}, export: lab}}
"""
BUSIDS = [f"1-{n}" for n in range(1, 7)]


def record_state(daemon: HotplugDaemon, busid: str) -> str | None:
    path = daemon.state_dir / "exports" / f"{busid}.json"
    try:
        state: str = json.loads(path.read_text())["state"]
    except (OSError, ValueError, KeyError):
        return None
    return state


def converged(device: FakeKernel, app: FakeKernel, usbipa: Usbipa, busids: list[str]) -> bool:
    want = {device.devid(b) for b in busids}
    return (
        all(device.stub_status(b) == "2" for b in busids)
        and app.used_devids() == want
        and len(usbipa.session_records()) == len(busids)
    )


def test_daemon_killed_with_exports_in_flight(
    device: FakeKernel, app: FakeKernel, usbipa: Usbipa, tmp_path: Path
) -> None:
    base = usbipa.fds()
    daemon = HotplugDaemon(
        device,
        tmp_path / "daemon",
        POLICY.format(port=usbipa.port),
        args=("--poll-interval", "0.1"),
    )
    daemon.start()
    try:
        # Two devices exported and settled.
        for busid in BUSIDS[:2]:
            daemon.plug(busid)
        wait_for(lambda: converged(device, app, usbipa, BUSIDS[:2]), 10, "two exports")
        # Four more while usbipa is frozen: their handshakes hang mid-way.
        usbipa.signal(signal.SIGSTOP)
        for busid in BUSIDS[2:]:
            daemon.plug(busid)
        wait_for(
            lambda: all(
                record_state(daemon, b) == "exporting" and device.driver(b) == "usbip-host"
                for b in BUSIDS[2:]
            ),
            10,
            "four exports bound and in flight",
        )
        daemon.kill()
        usbipa.signal(signal.SIGCONT)
        # The dead daemon's half-done work: bound to usbip-host, not handed over.
        for busid in BUSIDS[2:]:
            assert device.driver(busid) == "usbip-host" and device.stub_status(busid) == "1"
        daemon.start()
        wait_for(lambda: converged(device, app, usbipa, BUSIDS), 20, "all six exported")
        log = daemon.log()
        for busid in BUSIDS[:2]:
            assert f"adopted {busid}: still exported to lab" in log
        for busid in BUSIDS[2:]:
            assert f"adopted {busid}:" in log
        # Adopted, not exported again: usbipa attached the first two once.
        for busid in BUSIDS[:2]:
            assert usbipa.log().count(f"attached {busid} from") == 1
        assert daemon.alive()
        # Everything unplugged: nothing left on either side.
        for busid in BUSIDS:
            daemon.unplug(busid)
        wait_for(lambda: not daemon.records(), 10, "the daemon's records to go")
        wait_for(lambda: not device.live_match_table(), 10, "usbip-host's table to empty")
        assert_no_leaks(usbipa, base)
        assert "Traceback" not in daemon.log()
    finally:
        daemon.stop()


def block_exports(daemon: HotplugDaemon) -> None:
    """A file where the daemon keeps its export records (as when /run is unusable)."""
    exports = daemon.state_dir / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    exports.rmdir()
    exports.write_text("a file in the way\n")


def test_daemon_state_dir_blocked_while_running(
    device: FakeKernel, app: FakeKernel, usbipa: Usbipa, tmp_path: Path
) -> None:
    """An unexport goes on while its record cannot be removed (the removal is logged
    and retried); a new export that cannot be recorded does not start (issue 12,
    finding 5), and nothing leaks."""
    base = usbipa.fds()
    policy = POLICY.format(port=usbipa.port)
    with HotplugDaemon(device, tmp_path / "daemon", policy, ("--poll-interval", "0.1")) as daemon:
        daemon.plug("1-1")
        wait_for(lambda: converged(device, app, usbipa, ["1-1"]), 10, "1-1 exported")
        wait_for(lambda: record_state(daemon, "1-1") == "exported", 10, "1-1 recorded")
        exports = daemon.state_dir / "exports"
        exports.rename(exports.with_name("exports.old"))
        block_exports(daemon)
        daemon.unplug("1-1")
        wait_for(lambda: not app.used_ports(), 10, "1-1's port freed")
        wait_for(lambda: not device.live_match_table(), 10, "usbip-host's table to empty")
        wait_for(lambda: "cannot remove the record of 1-1" in daemon.log(), 10, "a log line")
        daemon.plug("1-2")
        wait_for(lambda: "cannot record the export" in daemon.log(), 10, "1-2 refused")
        assert device.driver("1-2") == "usb" and not app.used_ports()
        assert daemon.alive() and "Traceback" not in daemon.log()
        assert_no_leaks(usbipa, base)


def test_daemon_starts_with_its_state_dir_blocked(
    device: FakeKernel, usbipa: Usbipa, tmp_path: Path
) -> None:
    daemon = HotplugDaemon(device, tmp_path / "daemon", POLICY.format(port=usbipa.port))
    block_exports(daemon)
    try:
        daemon.start(timeout=10)
    finally:
        daemon.stop()
        assert "Traceback" not in daemon.log()
    assert "devices exported before this start are not adopted" in daemon.log()
