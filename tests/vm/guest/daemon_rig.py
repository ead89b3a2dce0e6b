"""The hotplug daemon and usbipa as the guest tests run them (`Rig`), and the
kernel facts those tests judge by. Shared by the daemon, fault-matrix, repeat,
device-class and QEMU tests, and by `bench.claim_compare`.

used_ports (from oneshot) is here too, for the modules that import the rig.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from hotplug.testing.vm import gadget as gd
from tests.helpers import NotifySocket, disk_policy
from tests.vm.guest.oneshot import used_ports as used_ports  # re-exported for the rig's users
from tests.vm.guest.programs import HOTPLUG, USBIPA, Program, run

KiB = 1 << 10
MiB = 1 << 20
SYS = Path("/sys")
MATCH_BUSID = SYS / "bus/usb/drivers/usbip-host/match_busid"
USBIPA_PORT = 3252  # 3240: the classic usbipd fixture; 3250/3251: test_export_real
TARGET = f"127.0.0.1:{USBIPA_PORT}"
WORK = Path("/run/uhd")  # short: the daemon's control socket lives below it
ENUM = 90.0  # enumeration-related waits (emulated guest, 2 busy host cores)
SERIAL_PREFIX = "HPD"
serials = itertools.count(1)


def new_serial() -> str:
    return f"{SERIAL_PREFIX}{os.getpid()}x{next(serials)}"


def policy_text(serial_glob: str = f"{SERIAL_PREFIX}*", broken: bool = False) -> str:
    return disk_policy(
        TARGET,
        serial_glob,
        broken=broken,
        connect_timeout="2",
        handshake_timeout="10",
        retry="{initial: 0.5, max: 2}",
    )


# --------------------------------------------------------------------------- kernel facts


def in_match_table(busid: str) -> bool:
    return busid in MATCH_BUSID.read_text().split()


def released(busid: str) -> bool:
    """Given back: the usual drivers, not known to usbip-host, no vhci port holds it."""
    devid = gd.devid_of(busid)
    return (
        gd.busid_driver(busid) == "usb"
        and set(gd.interface_drivers(busid).values()) == {"usb-storage"}
        and gd.usb_attr(busid, "usbip_status") is None
        and not in_match_table(busid)
        and not any(p.devid == devid for p in used_ports())
    )


def vhci_disk(g: gd.MassStorageGadget) -> tuple[gd.UsbDevice, gd.BlockDevice]:
    """The gadget's copy behind vhci_hcd and its disk, once both are there."""
    remote = gd.wait_until(g.vhci_devices, timeout=ENUM, what=f"{g.serial} behind vhci_hcd")[0]
    return remote, gd.wait_block_device(remote.busid, timeout=ENUM)


def assert_disk_works(g: gd.MassStorageGadget, disk: gd.BlockDevice, offset: int) -> None:
    """64 KiB through vhci_hcd -> usbip -> usbip-host -> the gadget's backing file."""
    data = os.urandom(64 * KiB)
    assert gd.odirect_write_read(disk.dev, offset, data) == data
    assert g.read_backing(offset, len(data)) == data, "the gadget's backing file differs"


def detached_by_unexport(usbipa_log: str, busid: str, port: int) -> bool:
    """usbipa detached `port` because the device side sent OP_UNEXPORT for `busid`."""
    b = re.escape(busid)
    pattern = rf"detached port {port}: {b} from \S+ \(unexported by the device side\)"
    return re.search(pattern, usbipa_log) is not None


def unexport_seen(usbipa_log: str, busid: str) -> bool:
    """usbipa got an OP_UNEXPORT for `busid` (it detached the port, or the kernel had
    freed it already because an unplug closed the link first)."""
    b = re.escape(busid)
    return bool(
        re.search(rf"detached port \d+: {b} from \S+ \(unexported by the device side\)", usbipa_log)
        or re.search(rf"unexport from \S+: {b} is not attached here", usbipa_log)
    )


# --------------------------------------------------------------------------- the rig


def alive(proc: Program | None) -> bool:
    return proc is not None and proc.poll() is None


class Rig:
    """usbipa and the daemon as child processes, each restartable; logs in files."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.state = work / "state"  # USBIP_HOTPLUG_STATE_DIR
        self.policy = work / "policy.yaml"
        self.usbipa_state = work / "usbipa-state"
        self.usbipa: Program | None = None
        self.daemon: Program | None = None
        self.start_seconds = 0.0  # how long the last start took, to READY
        self.usbipa_logs: list[Path] = []
        self.daemon_logs: list[Path] = []
        # Where the current test began in each list of logs: (log index, offset).
        self._marks: dict[str, tuple[int, int]] = {"usbipa": (0, 0), "daemon": (0, 0)}
        self.write_policy(policy_text())

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, USBIP_HOTPLUG_STATE_DIR=str(self.state), PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        env.update(extra)
        return env

    def _start(self, name: str, module: str, args: list[str], logs: list[Path]) -> Program:
        log = self.work / f"{name}-{len(logs) + 1}.log"
        logs.append(log)
        sock_dir = self.work / f"notify-{name}"
        shutil.rmtree(sock_dir, ignore_errors=True)
        sock_dir.mkdir()
        notify = NotifySocket(sock_dir)
        t0 = time.monotonic()
        try:
            proc = Program(module, args, self.env(NOTIFY_SOCKET=str(notify.path)), log)
            try:
                notify.wait("READY", timeout=90, proc=proc)
            except AssertionError as exc:
                # Not left running: a daemon that got READY late would answer on
                # the control socket and make the next start fail as "another daemon".
                proc.kill()
                raise AssertionError(f"{exc}\n{name} log:\n{log.read_text()}") from None
        finally:
            notify.close()  # later notifications are dropped (the sender does not block)
        self.start_seconds = time.monotonic() - t0
        return proc

    # -- usbipa

    def start_usbipa(self) -> None:
        assert not alive(self.usbipa)
        self.usbipa = self._start("usbipa", USBIPA, self.usbipa_args(), self.usbipa_logs)

    def usbipa_args(self, port: int = USBIPA_PORT) -> list[str]:
        return [
            *("--listen", "127.0.0.1", "-t", str(port), "--allow", "127.0.0.0/8"),
            *("--state-dir", str(self.usbipa_state)),
        ]

    def stop_usbipa(self, sig: int = signal.SIGTERM) -> None:
        self._stop(self.usbipa, sig)

    def usbipa_text(self) -> str:
        """What usbipa logged since the test began (across restarts)."""
        return self._since("usbipa", self.usbipa_logs)

    def usbipa_status(self) -> list[dict[str, Any]]:
        args = ["status", "--json", "--state-dir", str(self.usbipa_state)]
        r = run(USBIPA, args, self.env(), timeout=60, work=self.work)
        assert r.returncode == 0, r.stderr
        rows: list[dict[str, Any]] = json.loads(r.stdout)
        return rows

    # -- the daemon

    def start_daemon(self) -> None:
        assert not alive(self.daemon)
        args = ["run", "-c", str(self.policy), "--poll-interval", "0.5", "--watch-interval", "0.5"]
        self.daemon = self._start("daemon", HOTPLUG, args, self.daemon_logs)

    def stop_daemon(self, sig: int = signal.SIGTERM) -> int | None:
        return self._stop(self.daemon, sig)

    def daemon_text(self) -> str:
        """What the daemon logged since the test began (across restarts)."""
        return self._since("daemon", self.daemon_logs)

    def hotplug_status(self) -> dict[str, Any]:
        r = run(HOTPLUG, ["status", "--json"], self.env(), timeout=60, work=self.work)
        assert r.returncode == 0, r.stderr
        data: dict[str, Any] = json.loads(r.stdout)
        return data

    def status_now(self) -> dict[str, Any]:
        """The same report over the control socket, without a process at all."""
        from hotplug.device.control import request, socket_path

        return request(socket_path(self.state), {"command": "status"}, timeout=30)

    def record(self, busid: str) -> Path:
        return self.state / "exports" / f"{busid}.json"

    # -- both

    @staticmethod
    def _stop(proc: Program | None, sig: int) -> int | None:
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(
                f"pid {proc.pid} did not stop within 60 s of signal {sig}"
            ) from None

    def ensure(self, *, usbipa: bool, daemon: bool = True) -> None:
        """Bring up (or take down) what a test needs; usbipa first, as in production."""
        if usbipa and not alive(self.usbipa):
            self.start_usbipa()
        if not usbipa and alive(self.usbipa):
            self.stop_usbipa()
        if daemon and not alive(self.daemon):
            self.start_daemon()

    def write_policy(self, text: str) -> None:
        tmp = self.policy.with_name(".policy.yaml.new")
        tmp.write_text(text)
        os.replace(tmp, self.policy)  # a new inode: the watcher cannot miss it

    def set_policy(self, text: str) -> None:
        """Install a valid policy; if the daemon runs, wait until it reloaded it."""
        if self.policy.read_text() == text:
            return
        if not alive(self.daemon):
            self.write_policy(text)
            return
        before = self.daemon_text().count("policy reloaded")
        self.write_policy(text)
        gd.wait_until(
            lambda: self.daemon_text().count("policy reloaded") > before,
            timeout=30,
            what="the daemon to reload the policy",
        )

    def settle(self) -> None:
        """The previous test's gadgets are unplugged by now: wait for their ports.
        Then the test begins: usbipa_text() and daemon_text() start here."""
        gd.wait_until(lambda: not used_ports(), timeout=ENUM, what="every vhci port free")
        for name, logs in (("usbipa", self.usbipa_logs), ("daemon", self.daemon_logs)):
            self._marks[name] = (len(logs) - 1, len(logs[-1].read_text())) if logs else (0, 0)

    def _since(self, name: str, logs: list[Path]) -> str:
        index, offset = self._marks[name]
        parts = []
        for i, log in enumerate(logs[index:], start=index):
            text = log.read_text()
            parts.append(text[offset:] if i == index else text)
        return "".join(parts)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_daemon(signal.SIGTERM)  # on_stop unexport: gives devices back
        with contextlib.suppress(Exception):
            self.stop_usbipa(signal.SIGTERM)
        for log in self.daemon_logs + self.usbipa_logs:
            print(f"----- {log.name}\n{log.read_text()}")


R = TypeVar("R", bound=Rig)


@contextlib.contextmanager
def rig_in(work: Path, kind: type[R]) -> Iterator[R]:
    """A rig of `kind` working in `work` (emptied first); at the end its programs
    stopped, every vhci port detached and `work` removed."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    r = kind(work)
    try:
        yield r
    finally:
        r.close()
        for port in used_ports():  # never leave a port behind for other modules
            with contextlib.suppress(Exception):
                gd.run(["usbip", "detach", "-p", str(port.port)])
        shutil.rmtree(work, ignore_errors=True)


def plug_and_export(g: gd.Gadget, udc: str | None = None) -> tuple[str, gd.VhciPort, float]:
    """Plug the gadget; return its busid, the vhci port the kernel attached it on,
    and the seconds from plug to exported."""
    t0 = time.monotonic()
    g.plug(udc)
    busid = g.wait_busid(timeout=ENUM)
    port = gd.wait_until(
        lambda: gd.exported_port(busid), timeout=ENUM, what=f"{busid} exported to a vhci port"
    )
    return busid, port, time.monotonic() - t0
