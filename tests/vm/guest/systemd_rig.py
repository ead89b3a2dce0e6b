"""systemd as PID 1 of new namespaces inside the guest (`Systemd`), for the
tests of the shipped units: test_systemd_units and test_units_from_the_deb.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from hotplug.testing.vm import gadget as gd
from tests.helpers import disk_policy

SYSTEMD = Path("/lib/systemd/systemd")
SYSTEM_PYTHON = Path("/usr/bin/python3")
BIN = Path("/opt/usbip-hotplug-test/bin")
CONF = Path("/etc/usbip-hotplug")
UNITS = Path("/etc/systemd/system")
PORT = 3262  # 3240 classic usbipd, 3250/3251 test_export_real, 3252 test_daemon_real
SERIAL_PREFIX = "SYSD"
ENUM = 90.0
# udev runs in the guest already; a second one started by this systemd would fight it.
# systemd-tmpfiles-setup empties /tmp at boot, where the guest's pytest keeps its results.
MASKED = (
    "systemd-tmpfiles-setup.service",
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
)
UNSHARE = (
    *("unshare", "--pid", "--fork", "--mount", "--cgroup", "--mount-proc"),
    *("--propagation", "private"),
)
HOTPLUG = "usbip-hotplug.service"
USBIPA = "usbipa.service"


def policy(serial_glob: str = f"{SERIAL_PREFIX}*", broken: bool = False) -> str:
    return disk_policy(
        f"127.0.0.1:{PORT}",
        serial_glob,
        rule="sandboxed-disks",
        broken=broken,
        retry="{initial: 0.5, max: 2}",
    )


class Systemd:
    """systemd as PID 1 of its own namespaces; commands run inside them with nsenter.

    `setup`: shell commands run in the new mount namespace first, while the
    guest's /run is still there (mounts that only this systemd is to see)."""

    def __init__(self, log: Path, setup: str = "") -> None:
        self.log = log
        script = (
            (f"{setup} && " if setup else "")
            # A private /run that still shows udev's database.
            + "mkdir -p /tmp/uh-udev && mount --bind /run/udev /tmp/uh-udev"
            " && mount -t tmpfs -o mode=755 tmpfs /run"
            " && mkdir /run/udev && mount --move /tmp/uh-udev /run/udev"
            f" && exec {SYSTEMD} --unit=usbip-test.target"
        )
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [*UNSHARE, "sh", "-c", script],
                env=dict(os.environ, container="usbip-test"),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.pid = gd.wait_until(self._child, timeout=30, what="systemd forked by unshare")
        try:
            # Each probe is a process in an emulated guest: polled gently, so as not
            # to slow down the start it waits for.
            gd.wait_until(
                lambda: (
                    self.run("systemctl", "is-system-running", check=False).stdout.strip()
                    in ("running", "degraded")
                ),
                timeout=2 * ENUM,
                what="systemd to finish starting",
                interval=0.5,
            )
        except gd.WaitTimeout as e:
            jobs = self.run("systemctl", "list-jobs", "--no-pager", check=False).stdout
            self.close()  # no caller gets this object to close
            raise gd.WaitTimeout(f"{e}; its jobs still queued:\n{jobs}") from e

    def _child(self) -> int | None:
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return None
        return int(children.split()[0]) if children.split() else None

    def run(
        self, *argv: str, check: bool = True, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-p", "-m", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            why = f"{argv}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
            if argv[:2] in (("systemctl", "start"), ("systemctl", "reload")):
                log = self.run("journalctl", "-u", argv[2], "--no-pager", "-n", "40", check=False)
                why += f"\n--- journalctl -u {argv[2]}:\n{log.stdout}"
            raise AssertionError(why)
        return r

    def path(self, path: str) -> Path:
        """`path` as the namespace sees it (its mounts may differ from the guest's)."""
        return Path(f"/proc/{self.pid}/root{path}")

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def journal(self, unit: str) -> list[dict[str, Any]]:
        out = self.run("journalctl", "-u", unit, "-o", "json", "--no-pager").stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def proc_status(self, unit: str) -> dict[str, str]:
        pid = self.show(unit, "MainPID")
        text = self.run("cat", f"/proc/{pid}/status").stdout
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run("systemctl", "stop", HOTPLUG, USBIPA, check=False)
        with contextlib.suppress(Exception):
            self.run("systemctl", "poweroff", "--no-block", check=False, timeout=30)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: takes all of it along
            self.proc.wait(timeout=30)
