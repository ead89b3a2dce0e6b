"""A burst of plugs with a dead target among the live ones (issue 7, item 3).

    python -m bench.burst --devices 200

`usbip-hotplug run` gets --devices add events in one write (as udev delivers
a hub full of devices). The policy sends a quarter of them to a black hole (a
listening socket that never accepts: connects hang, nothing is ever
answered) and the rest to two live usbipa processes, each with its own fake
vhci. Timed, from the write of the events: the moment each device of a live
target is attached on its application side (seen through inotify on the
fake vhci's status files, no polling).

Baseline in the same run: the same burst of only the live devices, without
the black hole. If no live device waits for the dead target, the two
figures match.

Target: every device of a live target exported within 1 s of the burst.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from bench.harness import (
    DirWatch,
    add_dir_option,
    machine,
    percentile,
    raise_fd_limit,
    scratch_dir,
    wait_for,
)
from tests.rig import FakeKernel, HotplugDaemon, Usbipa, proc_stats

TARGET_S = 1.0
POLICY = """\
version: 1
targets:
  live-a: {{address: "127.0.0.1:{a}", connect_timeout: 5, handshake_timeout: 5}}
  live-b: {{address: "127.0.0.1:{b}", connect_timeout: 5, handshake_timeout: 5}}
  dead: {{address: "127.0.0.1:{dead}", connect_timeout: 5, handshake_timeout: 5}}
rules:
  - {{name: to-a, match: {{product: "000a"}}, export: live-a}}
  - {{name: to-b, match: {{product: "000b"}}, export: live-b}}
  - {{name: to-dead, match: {{product: "000d"}}, export: dead}}
"""


def busid(n: int) -> str:
    return f"{n // 100 + 1}-{n % 100 + 1}"


def product(n: int) -> int:
    """Every 4th device to the dead target, the others alternately to live-a and live-b."""
    if n % 4 == 3:
        return 0x000D
    return 0x000A if (n // 4 + n % 4) % 2 == 0 else 0x000B


def burst(
    numbers: list[int],
    dev: FakeKernel,
    apps: list[FakeKernel],
    daemon: HotplugDaemon,
    timeout: float,
    cpu: dict[str, int],
) -> tuple[list[float], int, dict[str, float]]:
    """Plug `numbers` at once; seconds until each live one is attached, the misses, and
    the CPU seconds each process (`cpu`: name -> pid) used until the last attach."""
    devids = {}
    for n in numbers:
        devnum = dev.plug(busid(n), vendor=0x1D6B, product=product(n))
        if product(n) != 0x000D:
            devids[(int(busid(n).split("-")[0]) << 16) | devnum] = n
    seen: dict[int, float] = {}
    before = {name: proc_stats(pid).cpu_seconds for name, pid in cpu.items()}
    with DirWatch(*(app.tree.paths.platform / "vhci_hcd.0" for app in apps)) as watch:
        start = time.monotonic()
        daemon.events(*(("add", busid(n)) for n in numbers))
        while len(seen) < len(devids) and time.monotonic() - start < timeout:
            watch.pause(timeout - (time.monotonic() - start))
            now = time.monotonic()
            for app in apps:
                try:
                    attached = app.used_devids()
                except Exception:
                    continue  # a status file caught half-written; its close wakes us again
                for devid in attached & devids.keys():
                    seen.setdefault(devid, now - start)
    used = {name: proc_stats(pid).cpu_seconds - before[name] for name, pid in cpu.items()}
    return sorted(seen.values()), len(devids) - len(seen), used


def unplug_all(numbers: list[int], dev: FakeKernel, daemon: HotplugDaemon) -> None:
    for n in numbers:
        dev.unplug(busid(n))
    daemon.events(*(("remove", busid(n)) for n in numbers))
    wait_for(lambda: not daemon.records(), 60, "the daemon to have unexported everything")
    wait_for(lambda: not dev.live_match_table(), 60, "usbip-host to have forgotten every device")


def report(name: str, times: list[float], missed: int) -> None:
    if not times:
        print(f"  {name:<36} nothing attached; {missed} missed")
        return
    print(
        f"  {name:<36} {len(times):4d} attached  p50 {percentile(times, 50) * 1000:7.1f} ms  "
        f"p99 {percentile(times, 99) * 1000:7.1f} ms  last {times[-1] * 1000:7.1f} ms  "
        f"missed {missed}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.burst",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=200, help="default 200")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="give up waiting after (default 30 s)"
    )
    parser.add_argument(
        "--per-peer",
        type=int,
        help="usbipa's limits.per_peer_connections (default: usbipa's own default, 64)",
    )
    add_dir_option(parser)
    args = parser.parse_args(argv)
    config = {"limits": {"per_peer_connections": args.per_peer}} if args.per_peer else {}
    raise_fd_limit(4 * args.devices + 256)
    at_start = machine()
    everyone = list(range(args.devices))
    live_only = [n for n in everyone if product(n) != 0x000D]
    per_target = len(live_only) // 2 + 1
    controllers = -(-per_target // 15)
    with scratch_dir("bench-burst-", args.dir) as tmp:
        work = Path(tmp)
        with (
            FakeKernel(work / "device", vhci=False) as dev,
            FakeKernel(work / "app-a", stub=False, vhci_controllers=controllers) as app_a,
            FakeKernel(work / "app-b", stub=False, vhci_controllers=controllers) as app_b,
            Usbipa(app_a, work / "usbipa-a", config) as live_a,
            Usbipa(app_b, work / "usbipa-b", config) as live_b,
            socket.socket() as black_hole,
        ):
            black_hole.bind(("127.0.0.1", 0))
            black_hole.listen(0)  # never accepted: connects hang, nothing is answered
            policy = POLICY.format(a=live_a.port, b=live_b.port, dead=black_hole.getsockname()[1])
            with HotplugDaemon(dev, work / "daemon", policy) as daemon:
                cpu = {
                    "usbip-hotplug run": daemon.pid,
                    "usbipa a": live_a.pid,
                    "usbipa b": live_b.pid,
                    "fake kernel, device side": dev.pid,
                    "fake kernel a": app_a.pid,
                    "fake kernel b": app_b.pid,
                }
                apps = [app_a, app_b]
                base, base_missed, _ = burst(live_only, dev, apps, daemon, args.timeout, cpu)
                unplug_all(live_only, dev, daemon)
                times, missed, used = burst(everyone, dev, apps, daemon, args.timeout, cpu)
                exported = sum(dev.stub_status(busid(n)) == "2" for n in live_only)
                dead_exported = sum(
                    dev.stub_status(busid(n)) == "2" for n in everyone if product(n) == 0x000D
                )
                alive = daemon.alive()
                refusals = {
                    "connections refused by usbipa (per-peer limit)": sum(
                        u.log().count("too many connections from this peer")
                        for u in (live_a, live_b)
                    ),
                    "exports refused by usbipa (no free port)": sum(
                        u.log().count("no free high-speed port") for u in (live_a, live_b)
                    ),
                }
    print(
        f"bench.burst: {args.devices} devices plugged at once, "
        f"{args.devices - len(live_only)} of them for a black-hole target"
    )
    print(f"machine: {at_start} (at start)")
    report("baseline: live devices only", base, base_missed)
    report("with the black hole", times, missed)
    print(f"  device side: {exported} of {len(live_only)} live devices exported (usbip_status 2)")
    print(f"  devices of the dead target exported: {dead_exported} (must be 0)")
    limit = args.per_peer or "default (64)"
    for what, count in refusals.items():
        print(f"  {what}: {count}, over both bursts (per_peer_connections {limit})")
    if times:
        wall = times[-1]
        print(f"  CPU seconds used until the last live attach ({wall:.2f} s of wall time):")
        for name, seconds in sorted(used.items(), key=lambda item: -item[1]):
            print(f"    {name:<26} {seconds:5.2f} s  ({100 * seconds / wall:5.1f} % of one core)")
    if times and base:
        last = times[-1]
        verdict = "ok" if last < TARGET_S and not missed else "MISS"
        print(
            f"every live device attached after {last * 1000:.1f} ms (target < {TARGET_S:g} s: "
            f"{verdict}); x{last / base[-1]:.2f} the baseline's {base[-1] * 1000:.1f} ms"
        )
    return 0 if alive and not missed and not dead_exported else 1


if __name__ == "__main__":
    sys.exit(main())
