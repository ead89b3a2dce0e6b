"""Soak: many plug/unplug cycles across many devices and three targets, one of
them flapping (issue 7, soak).

    python -m bench.soak --cycles 10000

`usbip-hotplug run` (its test event source, poll interval 0.2 s) manages
--devices fake devices; each is exported by the policy to one of three
usbipa targets, each target a machine of its own (own fake kernel). A seeded
random walk plugs and unplugs devices as fast as the rig goes (no waiting for
the daemon), until --cycles devices have been unplugged again. The machine has
16 USB ports (busids 1-1 to 1-16): a device goes into a free one, so the same
busid carries different devices over the walk, and a device a different busid
each time. (16, because usbip-host's busid table has 16 slots and Linux keeps
the slot of every busid unplugged while exported; a machine with more ports
than that fills it for good: docs/PROTOCOL.md.) Target C
flaps all along: its usbipa crashes (SIGKILL) and comes back, or its whole
machine reboots (kernel links dropped, vhci and /run emptied) and comes back.

At the end, with every target up, it must converge: every plugged device
exported to its target (usbip_status 2, a vhci port with its devid there,
usbipa's record, the daemon's record) and nothing else attached anywhere.
Then every device is unplugged, and the daemon's and the steady usbipas'
fds and threads must be back at their starting values, every vhci port
free, and memory back near its start (growth printed).

The fault suite runs this with --cycles 500 (tests/fault/test_soak.py); the
scenario itself is tests/fault/soak.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.harness import add_dir_option, machine, scratch_dir
from tests.fault.soak import run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cycles", type=int, default=10000, help="default 10000")
    parser.add_argument("--devices", type=int, default=50, help="default 50")
    parser.add_argument("--flaps", type=int, default=10, help="times target C goes down (10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="to converge at the end (default 120 s)"
    )
    add_dir_option(parser)
    args = parser.parse_args(argv)
    at_start = machine()
    with scratch_dir("bench-soak-", args.dir) as tmp:
        result = run_soak(Path(tmp), args.cycles, args.devices, args.flaps, args.seed, args.timeout)
    print(
        f"bench.soak: {result.cycles} plug/unplug cycles ({result.toggles} events) over "
        f"{args.devices} devices and 3 targets in {result.walk_seconds:.1f} s "
        f"({result.toggles / max(result.walk_seconds, 1e-9):.0f} events/s)"
    )
    print(f"machine: {at_start} (at start)")
    print(f"target c went down {len(result.flaps)} times: {', '.join(result.flaps)}")
    print(
        f"converged {result.converge_seconds:.1f} s after the last event "
        f"({result.plugged_at_end} devices plugged); drained {result.drain_seconds:.1f} s "
        "after unplugging all"
    )
    print(
        f"  {'process':<20} {'fds start/end/drained':>22} {'threads':>10} "
        f"{'RSS MB start/end/drained':>26}"
    )
    for name, (start, mid, end) in result.resources.items():
        print(
            f"  {name:<20} {start.fds:>8}/{mid.fds}/{end.fds:<7} "
            f"{start.threads:>5}/{end.threads:<4} "
            f"{start.rss_kb / 1024:>10.1f}/{mid.rss_kb / 1024:.1f}/{end.rss_kb / 1024:.1f}"
        )
    print(
        "what the events turned into: " + ", ".join(f"{v} {k}" for k, v in result.work_done.items())
    )
    if result.problems:
        print("PROBLEMS:")
        for problem in result.problems:
            print(f"  {problem}")
        return 1
    print("ok: every desired export existed, every other one was gone, nothing leaked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
