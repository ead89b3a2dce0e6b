"""usbipa alone and the one-shot commands (`usbip-hotplug connect/disconnect`),
as the export tests run them in the guest; shared with the claim, HID and
kTLS tests.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from hotplug.testing.vm import gadget as gd
from tests.helpers import NotifySocket
from tests.vm.guest.programs import HOTPLUG, USBIPA, Program, run

SYS = Path("/sys")
USBIPA_PORT = 3250  # not 3240: the classic usbipd fixture owns that one


def used_ports() -> list[gd.VhciPort]:
    return [p for p in gd.vhci_ports() if not p.free]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, USBIP_HOTPLUG_STATE_DIR="/run/usbip-hotplug-test")
    return run(HOTPLUG, args, env, timeout=timeout)


def attr(busid: str, name: str) -> str | None:
    try:
        return (SYS / "bus/usb/devices" / busid / name).read_text().strip()
    except OSError:
        return None


class Usbipa:
    def __init__(self, proc: Program, port: int, state: Path) -> None:
        self.proc = proc
        self.port = port
        self.state = state

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def usbipa_program(tmp: Path, args: Sequence[str]) -> Program:
    """usbipa with `args`, its log in `tmp`, once it said READY."""
    notify = NotifySocket(tmp)
    log = tmp / f"usbipa-{len(list(tmp.glob('usbipa-*.log'))) + 1}.log"
    proc = Program(USBIPA, args, dict(os.environ, NOTIFY_SOCKET=str(notify.path)), log)
    try:
        notify.wait("READY", timeout=60, proc=proc)
    except AssertionError:
        proc.kill()
        raise
    finally:
        notify.close()
    return proc


def start_usbipa(
    tmp: Path, allow: str = "127.0.0.0/8", port: int = USBIPA_PORT, extra: Sequence[str] = ()
) -> Usbipa:
    state = tmp / "usbipa-state"
    args = ["--listen", "127.0.0.1", "-t", str(port), "--allow", allow]
    proc = usbipa_program(tmp, [*args, "--state-dir", str(state), *extra])
    return Usbipa(proc, port, state)


def stop(proc: Program) -> str:
    """Stop a program of ours (SIGTERM, then SIGKILL after 30 s); what it logged."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    return proc.errors()


@contextlib.contextmanager
def serving(proc: Program) -> Iterator[None]:
    """usbipa `proc` serving the body; then stopped, its log printed (pytest shows
    it with a failure) and every vhci port detached: none left for the next test."""
    try:
        yield
    finally:
        print("usbipa log:\n" + stop(proc))
        for port in used_ports():
            gd.run(["usbip", "detach", "-p", str(port.port)])


def tls_stat() -> dict[str, int]:
    """The kernel's kTLS counters (the tls module loads with the first kTLS socket)."""
    try:
        lines = Path("/proc/net/tls_stat").read_text().splitlines()
    except OSError:
        return {}
    return {name: int(value) for name, value in (line.split() for line in lines)}
