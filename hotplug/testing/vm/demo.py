"""`usbip-hotplug demo`: see it work on a machine with no USB hardware.

The host part boots a VM with Debian's kernel (hotplug.testing.vm) and runs the
guest part inside it. The guest part plays both machines on one kernel: it
makes a virtual USB disk (dummy_hcd + a configfs mass-storage gadget), starts
`usbipa` and `usbip-hotplug run` with an example policy, plugs the disk in,
shows it exported and usable through vhci_hcd, unplugs it and shows it
withdrawn. Every step prints a line, and the daemons' own log lines are shown
as a user would see them.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

DEMO_PORT = 3240
DEMO_SERIAL = "DEMO00000001"
DEMO_DIR = Path("/run/usbip-hotplug-demo")

POLICY = f"""\
version: 1
targets:
  apps:                         # the application side: usbipa on this same VM
    address: "127.0.0.1:{DEMO_PORT}"
    retry: {{initial: 0.5, max: 5}}
rules:
  - name: demo-disks
    match: {{vendor: "1d6b", product: "0104", serial: "DEMO*"}}
    export: apps
"""

# The guest continues the host's clock (it gets the host's elapsed time when it
# starts), so the timestamps run on from the boot instead of restarting at 0.
_T0 = time.monotonic() - float(os.environ.get("USBIP_DEMO_ELAPSED", "0"))


def say(text: str) -> None:
    print(f"[{time.monotonic() - _T0:5.1f}s] {text}", flush=True)


def show(title: str, argv: list[str]) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    print(f"  $ {title}")
    for line in (out.stdout + out.stderr).rstrip().splitlines():
        print(f"    {line}")
    sys.stdout.flush()


def _pump(stream: IO[str], prefix: str) -> None:
    for line in stream:
        print(f"    {prefix} {line.rstrip()}", flush=True)


# Python starts slowly under emulation, and more so on a busy host.
READY_TIMEOUT = 150.0


def _wait_ready(notify: socket.socket, proc: subprocess.Popen[str], name: str) -> None:
    """Wait for READY=1 as systemd would (Type=notify), not by probing the daemon."""
    deadline = time.monotonic() + READY_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} before it was ready")
        notify.settimeout(min(left, 0.5))
        try:
            message = notify.recv(4096).decode(errors="replace")
        except TimeoutError:
            continue
        if "READY=1" in message.splitlines():
            return
    raise RuntimeError(f"{name} did not report READY=1 within {READY_TIMEOUT:.0f} s")


@contextmanager
def daemon(name: str, argv: list[str]) -> Iterator[Callable[[], None]]:
    """Run a daemon with its log shown; yields a function that waits for its READY=1."""
    path = DEMO_DIR / f"{name}.notify"
    path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(path))
    env = dict(os.environ, NOTIFY_SOCKET=str(path))
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    threading.Thread(target=_pump, args=(proc.stderr, f"{name:>7} |"), daemon=True).start()
    try:
        yield lambda: _wait_ready(notify, proc, name)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        notify.close()


def _used_port_busid() -> str | None:
    from hotplug.testing.vm import gadget as gd

    for port in gd.vhci_ports():
        if port.status == 6:
            return port.local_busid
    return None


def guest_main() -> int:
    """The scenario, run as root inside the VM."""
    from hotplug.testing.vm import gadget as gd

    me = [sys.executable, "-m"]
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    (DEMO_DIR / "policy.yaml").write_text(POLICY)
    say("loading usbip-host, vhci-hcd, dummy_hcd and the gadget modules")
    gd.load_usbip_modules()
    gd.load_gadget_modules(dummy_udcs=2)
    say(f"example policy {DEMO_DIR}/policy.yaml:")
    for line in POLICY.splitlines():
        print(f"    {line}")
    show(
        "usbip-hotplug check",
        [*me, "hotplug.device.cli", "check", "-c", str(DEMO_DIR / "policy.yaml")],
    )

    with (
        daemon(
            "usbipa",
            [
                *me,
                "hotplug.app.cli",
                "--listen",
                "127.0.0.1",
                "-t",
                str(DEMO_PORT),
                "--allow",
                "127.0.0.0/8",
            ],
        ) as usbipa_ready,
        daemon(
            "hotplug", [*me, "hotplug.device.cli", "run", "-c", str(DEMO_DIR / "policy.yaml")]
        ) as hotplug_ready,
    ):
        usbipa_ready()
        hotplug_ready()
        say("started usbipa (application side) and usbip-hotplug run (device side)")
        g = gd.MassStorageGadget(serial=DEMO_SERIAL, size=8 << 20, product="Demo Disk")
        try:
            g.create()
            t_plug = time.monotonic()
            g.plug()
            busid = g.wait_busid(timeout=60)
            say(f"plugged a virtual USB disk: busid {busid}, serial {DEMO_SERIAL}")
            gd.wait_until(
                lambda: _status(busid) == "2",
                timeout=60,
                what="the daemon to export it (usbip_status 2)",
            )
            say(f"exported {time.monotonic() - t_plug:.1f} s after plug-in")
            remote_busid = gd.wait_until(
                _used_port_busid, timeout=60, what="the port on the application side"
            )
            disk = gd.wait_block_device(remote_busid, timeout=90)
            say(
                f"the disk appeared on the application side as {disk.dev} "
                f"(vhci busid {remote_busid}), {time.monotonic() - t_plug:.1f} s after plug-in"
            )
            show("usbip-hotplug status", [*me, "hotplug.device.cli", "status"])
            show("usbipa status", [*me, "hotplug.app.cli", "status"])
            show("usbip port   (Debian's own tool)", ["usbip", "port"])

            message = b"hello from the application side\n".ljust(4096, b"\0")
            fd = os.open(disk.dev, os.O_WRONLY | os.O_SYNC)
            try:
                os.pwrite(fd, message, 0)
            finally:
                os.close(fd)
            landed = g.read_backing(0, len(message)) == message
            say(
                "wrote 4 KiB through the exported disk; it landed in the gadget's backing "
                f"file: {'yes' if landed else 'NO'}"
            )

            t_unplug = time.monotonic()
            g.unplug()
            say("unplugged the disk")
            gd.wait_until(
                lambda: all(p.free for p in gd.vhci_ports()),
                timeout=60,
                what="the vhci port to be freed",
            )
            say(
                f"withdrawn: the application side's port is free again "
                f"({time.monotonic() - t_unplug:.1f} s after unplug)"
            )
            show("usbip-hotplug status", [*me, "hotplug.device.cli", "status"])
            show("usbipa status", [*me, "hotplug.app.cli", "status"])
        finally:
            g.remove()
    say("stopped both daemons; demo complete" if landed else "demo FAILED: data mismatch")
    return 0 if landed else 1


def _status(busid: str) -> str | None:
    try:
        return Path(f"/sys/bus/usb/devices/{busid}/usbip_status").read_text().strip()
    except OSError:
        return None


def _shell(vm: object, run: Callable[[str], object]) -> None:
    print("\nThe VM is still running. Type shell commands (each runs with /bin/sh -c as root")
    print("in the guest, e.g. `cat /sys/devices/platform/vhci_hcd.0/status`); 'exit' to stop.")
    while True:
        try:
            line = input("guest# ")
        except EOFError:
            break
        if line.strip() in ("exit", "quit"):
            break
        if line.strip():
            run(line)


def cmd_demo(args: argparse.Namespace) -> int:
    from hotplug.testing.vm.guest import GuestVM
    from hotplug.testing.vm.kernels import VMError, check_host, ensure_kernel

    say("usbip-hotplug demo: both sides on one VM, no USB hardware needed")
    try:
        check_host(usbip=True)
        kernel = ensure_kernel(log=lambda line: print(f"    {line}", flush=True))
        say(f"booting Debian's kernel {kernel.release} in QEMU (emulation takes ~30 s)")
        with GuestVM(kernel, output=lambda line: print(line, flush=True), prefix="") as vm:
            say(f"VM up in {vm.boot_seconds or 0:.0f} s ({vm.accel})")
            result = vm.run(
                [sys.executable, "-m", "hotplug.testing.vm.demo", "--guest"],
                timeout=args.timeout,
                env={"USBIP_DEMO_ELAPSED": f"{time.monotonic() - _T0:.3f}"},
            )
            if args.keep:
                _shell(vm, lambda line: vm.run(line, timeout=600))
            say("shutting the VM down")
        return 0 if result.ok else 1
    except VMError as exc:
        print(f"usbip-hotplug demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--guest"]:
        sys.exit(guest_main())
    sys.exit("usage: python -m hotplug.testing.vm.demo --guest  (inside the VM)")
