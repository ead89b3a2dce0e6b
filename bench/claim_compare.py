"""settings.claim: before-probe against the default (after-probe), on the real kernel.

    python -m bench.claim_compare --rounds 5

Issue 14, item 3. Boots the test VM once (hotplug.testing.vm) and runs this
module again inside it (`--guest`): usbipa on 127.0.0.1 and the daemon
(`usbip-hotplug run`) are started once; each round plugs a configfs
mass-storage gadget on dummy_hcd (t0 = the write of its UDC file) and the
daemon exports it to usbipa, which attaches it to vhci_hcd on the same
kernel. The two modes take turns, switched by a policy reload (the order
alternates every round). Per round, seconds after t0:

  attached  a vhci port holds the device (vhci status, polled every 5 ms)
  usable    the vhci-side disk exists and answers a 4 KiB O_DIRECT read

and setconf, the SET_CONFIGURATION requests the device was sent from t0 on:
usbmon's binary interface on the gadget's dummy_hcd bus sees every control
request the gadget receives (gadget.SetConfigurationCounter). One VM, one
kernel: in before-probe mode the vhci-side copy is held back as well, and the
daemon hands it to usb-storage (on two machines that is the other kernel's
business); `usable` includes that.

Prints each round, then medians per mode and the ratios before/after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hotplug.testing.vm.gadget import SetConfigurationCounter

MODES = ("after-probe", "before-probe")
POLL = 0.005
ENUM = 90.0


def guest(rounds: int) -> int:
    from hotplug.testing.vm import gadget as gd
    from tests.vm.guest.daemon_rig import Rig, policy_text, used_ports

    work = Path("/run/claim-compare")
    work.mkdir(parents=True, exist_ok=True)
    udc = gd.load_gadget_modules(dummy_udcs=1)[0]
    gd.load_usbip_modules()
    for module in ("usb-storage", "sd_mod"):  # loaded by the warm-up plug in either mode
        gd.modprobe(module)
    rig = Rig(work)
    policies = {
        "after-probe": policy_text("CLC*"),
        "before-probe": policy_text("CLC*") + "settings:\n  claim: before-probe\n",
    }
    results: dict[str, list[tuple[float, float, int]]] = {m: [] for m in MODES}
    rig.ensure(usbipa=True)  # forks usbipa and the daemon: before the counter's thread
    counter = gd.SetConfigurationCounter(gd.dummy_busnum(udc))
    try:
        schedule = [("after-probe", -1), ("before-probe", -1)]  # warm-up: not counted
        for i in range(rounds):
            order = MODES if i % 2 == 0 else MODES[::-1]
            schedule += [(m, i) for m in order]
        for mode, i in schedule:
            rig.set_policy(policies[mode])
            gd.wait_until(lambda: not used_ports(), timeout=ENUM, what="every vhci port free")
            serial = f"CLC{os.getpid()}x{i}{mode[0]}"
            attached, usable, setconf = plug_once(udc, serial, counter)
            tag = "warm-up" if i < 0 else f"round {i}"
            print(
                f"{mode:12} {tag:8}: attached {attached:6.3f} s  usable {usable:6.3f} s  "
                f"SET_CONFIGURATION x{setconf}",
                flush=True,
            )
            if i >= 0:
                results[mode].append((attached, usable, setconf))
    finally:
        counter.close()
        for stop in (rig.stop_daemon, rig.stop_usbipa):
            with contextlib.suppress(Exception):
                stop()
    report(results)
    return 0


def plug_once(udc: str, serial: str, counter: SetConfigurationCounter) -> tuple[float, float, int]:
    """Plug a new disk gadget: seconds to attached and to usable, SET_CONFIGURATIONs."""
    from hotplug.testing.vm import gadget as gd

    g = gd.MassStorageGadget(size=2 << 20, serial=serial)
    g.create()
    try:
        t0 = time.monotonic()
        g.plug(udc)
        busid = g.wait_busid(timeout=ENUM)
        gd.wait_until(lambda: gd.exported_port(busid), timeout=ENUM, what="attached", interval=POLL)
        attached = time.monotonic() - t0
        gd.wait_until(
            lambda: any(
                readable(b.dev) for d in g.vhci_devices() for b in gd.block_devices(d.busid)
            ),
            timeout=ENUM,
            what="the vhci-side disk answering a 4 KiB read",
            interval=POLL,
        )
        usable = time.monotonic() - t0
        return attached, usable, counter.count(int(gd.usb_attr(busid, "devnum") or 0), since=t0)
    finally:
        g.remove(timeout=ENUM)


def readable(dev: str) -> bool:
    import mmap

    buf = mmap.mmap(-1, 4096)
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        return os.readv(fd, [buf]) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)


def report(results: dict[str, list[tuple[float, float, int]]]) -> None:
    med = {
        m: [statistics.median(r[k] for r in results[m]) for k in range(3)]
        for m in MODES
        if results[m]
    }
    print(f"\nmedians over {len(results['before-probe'])} rounds per mode")
    print(f"{'':14}{'attached s':>12}{'usable s':>12}{'SET_CONFIGURATION':>20}")
    for m, (a, u, s) in med.items():
        print(f"{m:14}{a:12.3f}{u:12.3f}{s:20g}")
    if len(med) == 2:
        (a0, u0, s0), (a1, u1, s1) = med["after-probe"], med["before-probe"]
        print(
            f"{'before/after':14}{a1 / a0:11.2f}x{u1 / u0:11.2f}x"
            f"{(f'{s1 / s0:.2f}x' if s0 else '-'):>20}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per mode (5)")
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit in the guest (900 s)")
    p.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.guest:
        return guest(args.rounds)

    from hotplug.testing.vm.guest import GuestVM
    from hotplug.testing.vm.kernels import VMError, check_host

    try:
        check_host(usbip=True)
        with GuestVM(output=print, prefix="[guest] ") as vm:
            cmd = [sys.executable, "-m", "bench.claim_compare", "--guest"]
            res = vm.run([*cmd, "--rounds", str(args.rounds)], timeout=args.timeout)
    except VMError as exc:
        print(f"bench.claim_compare: {exc}", file=sys.stderr)
        return 1
    return 124 if res.timed_out else res.returncode


if __name__ == "__main__":
    sys.exit(main())
