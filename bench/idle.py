"""Idle cost with devices exported (issue 7, item 4).

    python -m bench.idle --seconds 60 --devices 20

Exports --devices fake devices to a real usbipa (each side with its own fake
kernel), then lets everything sit for --seconds and reads from /proc, at the
start and the end of that window: CPU seconds (user + system), context
switches of all threads (voluntary + involuntary: each is a wakeup or a
preemption), RSS and peak RSS, open fds.

Baseline in the same window: an idle `python -c "asyncio.run(asyncio.sleep())"`
(the interpreter's own floor), so the ratios show what our code adds.

Targets: < 0.1 % CPU and RSS < 40 MB for each daemon. The device-side daemon
(`usbip-hotplug run`, default poll interval 2 s) exports the devices and is
measured too; --no-daemon exports with export() and measures usbipa alone.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import add_dir_option, machine, scratch_dir, wait_for
from hotplug.device.export import export
from hotplug.device.transport import Remote
from tests.rig import FakeKernel, HotplugDaemon, ProcStats, Usbipa, proc_stats

POLICY = """\
version: 1
targets:
  lab: {{address: "127.0.0.1:{port}"}}
rules:
  - name: bench-devices
    match: {{vendor: "1d6b"}}
    export: lab
"""
TARGET_CPU_PERCENT = 0.1
TARGET_RSS_MB = 40.0


def measure(pids: dict[str, int], seconds: float) -> dict[str, tuple[ProcStats, ProcStats]]:
    before = {name: proc_stats(pid) for name, pid in pids.items()}
    time.sleep(seconds)  # the measurement window itself, not a synchronisation
    after = {name: proc_stats(pid) for name, pid in pids.items()}
    return {name: (before[name], after[name]) for name in pids}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.idle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="idle window (default 60)")
    parser.add_argument("--devices", type=int, default=20, help="devices exported (default 20)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        help="the daemon's --poll-interval (default: its own default, 2 s)",
    )
    parser.add_argument(
        "--no-daemon",
        action="store_true",
        help="export with export() instead of `usbip-hotplug run` (usbipa alone)",
    )
    add_dir_option(parser)
    args = parser.parse_args(argv)
    # Started first, so its start-up is over before the window opens.
    baseline = subprocess.Popen(
        [sys.executable, "-c", "import asyncio; asyncio.run(asyncio.sleep(1e6))"]
    )
    at_start = machine()
    daemon_alive = True
    with scratch_dir("bench-idle-", args.dir) as tmp, contextlib.ExitStack() as stack:
        stack.callback(baseline.wait)
        stack.callback(baseline.kill)
        work = Path(tmp)
        ports_per_hub = max(8, args.devices)
        with (
            FakeKernel(work / "device", vhci=False) as dev,
            FakeKernel(work / "app", stub=False, ports_per_hub=ports_per_hub) as app,
            Usbipa(app, work / "usbipa") as usbipa,
        ):
            busids = [f"1-{n + 1}" for n in range(args.devices)]
            for busid in busids:
                dev.plug(busid)
            pids = {"usbipa": usbipa.pid, "python idle (baseline)": baseline.pid}
            if args.no_daemon:
                stub = dev.stub()
                for busid in busids:
                    export(stub, busid, Remote.plain(usbipa.endpoint))
                stats = measure(pids, args.seconds)
                attached = len(app.used_ports())
            else:
                # The devices are there when it starts: it exports them all (coldplug).
                policy = POLICY.format(port=usbipa.port)
                extra = ("--poll-interval", str(args.poll_interval)) if args.poll_interval else ()
                with HotplugDaemon(dev, work / "daemon", policy, extra) as daemon:
                    wait_for(
                        lambda: all(dev.stub_status(b) == "2" for b in busids),
                        60,
                        "every device exported",
                    )
                    pids["usbip-hotplug run"] = daemon.pid
                    stats = measure(pids, args.seconds)
                    attached = len(app.used_ports())
                    daemon_alive = daemon.alive()
                    if not daemon_alive:
                        print(daemon.log())
            alive = usbipa.alive() and daemon_alive
    print(
        f"bench.idle: {args.devices} devices exported, {args.seconds:g} s idle, "
        f"{attached} vhci ports still attached at the end"
    )
    print(f"machine: {at_start} (at start)")
    if not args.no_daemon:
        print(f"daemon poll interval: {args.poll_interval or 'default (2 s)'}")
    print(
        f"  {'process':<24} {'CPU s':>7} {'CPU %':>7} {'wakeups/s':>10} "
        f"{'RSS MB':>7} {'peak MB':>8} {'fds':>4}"
    )
    figures: dict[str, tuple[float, float, float]] = {}
    for name, (before, after) in stats.items():
        cpu = after.cpu_seconds - before.cpu_seconds
        percent = 100.0 * cpu / args.seconds
        wakeups = (after.ctxt_switches - before.ctxt_switches) / args.seconds
        rss = after.rss_kb / 1024
        figures[name] = (percent, wakeups, rss)
        print(
            f"  {name:<24} {cpu:7.2f} {percent:7.3f} {wakeups:10.2f} {rss:7.1f} "
            f"{after.hwm_kb / 1024:8.1f} {after.fds:4d}"
        )
    _, base_wakeups, base_rss = figures["python idle (baseline)"]
    for name in ("usbip-hotplug run", "usbipa"):
        if name not in figures:
            continue
        percent, wakeups, rss = figures[name]
        print(
            f"{name}: CPU {percent:.3f} % (target < {TARGET_CPU_PERCENT} %: "
            f"{'ok' if percent < TARGET_CPU_PERCENT else 'MISS'}), "
            f"RSS {rss:.1f} MB (target < {TARGET_RSS_MB:g} MB: "
            f"{'ok' if rss < TARGET_RSS_MB else 'MISS'}); vs an idle interpreter: "
            f"RSS x{rss / base_rss:.1f}, wakeups/s {wakeups:.2f} vs {base_wakeups:.2f}"
        )
    print(
        "note: CPU seconds come in clock ticks (1/100 s): a window shorter than "
        "about 60 s cannot resolve 0.1 %"
    )
    return 0 if alive and attached == args.devices else 1


if __name__ == "__main__":
    sys.exit(main())
