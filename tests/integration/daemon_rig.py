"""The real `usbip-hotplug run` process as the integration tests drive it (`Daemon`,
its notifications drained by `Notifications`), the policy text they give it, and
the fake kernel's facts they judge by. Shared by the daemon, claim, follow,
metrics, issue-12 and untrusted-input tests; the `daemons` fixture that makes
one `Daemon` per policy is in tests/integration/conftest.py.

Device events come through the daemon's hidden `--events FIFO` (JSON lines)
instead of udev. Nothing sleeps to synchronise: waits poll with bounded timeouts.

`used_ports` here gives the vhci ports themselves; export_facts.used_ports,
which the one-shot tests use, gives their numbers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotplug.kernel.sysfs import read_device
from hotplug.kernel.vhci import PortState, VhciPort
from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice
from hotplug.testing.fifo_events import write_event
from tests.helpers import NotifySocket, wait_for
from tests.rig import command, env_for, run_cli

FAST_RETRY = "retry: {initial: 0.1, max: 0.3, jitter: 0.1}"


# --------------------------------------------------------------------------- kernel facts


def stub_status(tree: FakeTree, busid: str) -> str | None:
    path = tree.paths.usb_devices / busid / "usbip_status"
    try:
        return path.read_text().strip()
    except OSError:
        return None


def driver(tree: FakeTree, busid: str) -> str | None:
    try:
        return os.path.basename(os.readlink(tree.paths.usb_devices / busid / "driver"))
    except OSError:
        return None


def used_ports(tree: FakeTree) -> list[VhciPort]:
    return [p for p in tree.vhci().ports() if p.state == PortState.USED]


def match_table(tree: FakeTree) -> list[str]:
    return (tree.paths.stub_driver / "match_busid").read_text().split()


def exported(tree: FakeTree, busid: str) -> VhciPort | None:
    """The vhci port holding `busid`, if the kernel says it is exported there."""
    if stub_status(tree, busid) != "2":
        return None
    try:
        devid = read_device(tree.paths, busid).devid
    except Exception:
        return None
    return next((p for p in used_ports(tree) if p.devid == devid), None)


def unexported(tree: FakeTree, busid: str) -> bool:
    """Given back: no port, usual driver, not in usbip-host's table."""
    return (
        exported(tree, busid) is None
        and driver(tree, busid) == "usb"
        and busid not in match_table(tree)
    )


def sessions(state: Path) -> dict[int, float]:
    """usbipa's session records: port -> since. A new attach writes a new one."""
    found = {}
    for path in (state / "app" / "ports").glob("*.json"):
        data = json.loads(path.read_text())
        found[int(data["port"])] = float(data["since"])
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- the daemon


def policy_text(targets: dict[str, str], rules: list[str], settings: str = "") -> str:
    lines = ["version: 1", "targets:"]
    lines += [f"  {name}: {{{body}}}" for name, body in targets.items()]
    lines.append("rules:")
    lines += rules
    if settings:
        lines += ["settings:", f"  {settings}"]
    return "\n".join(lines) + "\n"


def target(port: int, extra: str = "", retry: str = FAST_RETRY) -> str:
    parts = [f'address: "127.0.0.1:{port}"', "connect_timeout: 1", "handshake_timeout: 2"]
    parts.append(retry)
    if extra:
        parts.append(extra)
    return ", ".join(parts)


def rule(name: str, vendor: str, to: str) -> str:
    return f'  - {{name: {name}, match: {{vendor: "{vendor}"}}, export: {to}}}'


class Notifications:
    """The NotifySocket, drained all the time by a thread.

    sd_notify sends block once the socket's queue is full (10 datagrams by
    default): a test that stops reading while the daemon sends watchdog pings
    would freeze the daemon. systemd reads all the time; so do we.
    """

    def __init__(self, directory: Path) -> None:
        (directory / "notify.sock").unlink(missing_ok=True)
        self.socket = NotifySocket(directory)
        self.socket.sock.settimeout(0.1)
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while self.running:
            try:
                data = self.socket.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            lines = data.decode().splitlines()
            with self.lock:
                self.socket.messages.append(dict(ln.split("=", 1) for ln in lines if "=" in ln))

    def wait(
        self,
        key: str,
        proc: subprocess.Popen[str],
        timeout: float = 10.0,
        value: Callable[[str], bool] = lambda _: True,
    ) -> dict[str, str]:
        """The first message with `key` (whose value passes `value`), consumed."""

        def take() -> dict[str, str] | None:
            with self.lock:
                for message in self.socket.messages:
                    if key in message and value(message[key]):
                        self.socket.messages.remove(message)
                        return message
            # A message sent just before a normal exit still counts (STOPPING).
            assert proc.poll() is None, f"the daemon exited with {proc.returncode}"
            return None

        return wait_for(take, timeout, f"{key} notification")

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.socket.close()


class Daemon:
    """One `usbip-hotplug run` process; restartable on the same state and event FIFO."""

    def __init__(self, tree: FakeTree, state: Path, workdir: Path, policy: Path) -> None:
        self.tree, self.state, self.policy = tree, state, policy
        self.dir = workdir
        self.dir.mkdir(exist_ok=True)
        self.fifo = self.dir / "events"
        self.log = self.dir / "daemon.log"
        self.proc: subprocess.Popen[str] | None = None
        self.notify: Notifications | None = None

    def start(self, *args: str, **env: str) -> Daemon:
        if self.notify is not None:
            self.notify.close()
        self.notify = Notifications(self.dir)
        cmd = [*command("usbip-hotplug"), "run", "-c", str(self.policy)]
        cmd += ["--events", str(self.fifo), "--poll-interval", "0.1", "--watch-interval", "0.2"]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [*cmd, *args],
                env=env_for(
                    self.tree, self.state, NOTIFY_SOCKET=str(self.notify.socket.path), **env
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.expect("READY")
        return self

    def expect(
        self, key: str, timeout: float = 10.0, value: Callable[[str], bool] = lambda _: True
    ) -> dict[str, str]:
        assert self.notify is not None and self.proc is not None
        return self.notify.wait(key, self.proc, timeout, value)

    def plug(self, dev: FakeUsbDevice, devnum: int = 2) -> None:
        self.tree.add_device(dev, devnum=devnum)
        write_event(self.fifo, "add", dev.busid)

    def unplug(self, busid: str) -> None:
        self.tree.remove_device(busid)
        write_event(self.fifo, "remove", busid)

    def text(self) -> str:
        return self.log.read_text()

    def status(self) -> dict[str, Any]:
        result = run_cli(self.tree, self.state, "status", "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def device(self, busid: str) -> dict[str, Any] | None:
        return next((d for d in self.status()["devices"] if d["busid"] == busid), None)

    def state_of(self, busid: str) -> str | None:
        row = self.device(busid)
        return row["state"] if row is not None else None

    def wait_status(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        return self.expect("STATUS", timeout, predicate)["STATUS"]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.notify is not None:
            self.notify.close()
