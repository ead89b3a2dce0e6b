"""Plug to attached on the real kernel: our daemon against usbip's tools and the floor.

    python -m bench.vm_compare --rounds 5

Issue 7, item 2. Boots the test VM once (Debian's kernel under QEMU,
hotplug.testing.vm) and runs `bench.vm_compare_guest` in it: a configfs
mass-storage gadget on dummy_hcd is plugged (t0 = the write of its UDC file)
and exported to vhci_hcd on the same kernel, `--rounds` times per variant,
the variants taking turns:

  daemon  `usbip-hotplug run -c POLICY` -> `usbipa` on 127.0.0.1
  udev    udev rule RUN+="usbip bind -b %k", `usbipd -D`, and a shell loop
          running `usbip attach -r 127.0.0.1 -b BUSID` every second
  floor   an already running Python process polling sysfs every 2 ms that
          calls hotplug.device.export.export() to the same usbipa on first sight

Measured from the guest, polling sysfs every 5 ms: "attached" = a vhci port
reads status 6 (used); "disk" = the vhci-side block device exists and a 4 KiB
O_DIRECT read from it succeeds. Printed: p50 / min / max per variant, the
ratios daemon/floor (target: within 10 %) and udev/daemon, the daemon's
overhead over the floor in ms (median of per-round differences), the median
time of each step, the first plug after each exporter's start (warm-up, not
in the figures), and a JSON line with everything. Bounded: `--timeout`
(900 s) covers boot, rounds and power-off; the VM is killed at the deadline.
Exits 1 if a round failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.vm_compare_guest import MARKS, RESULT_MARK, VARIANTS

LABEL = {"daemon": "(a) usbip-hotplug run", "udev": "(b) udev+usbip", "floor": "(c) floor"}
TARGET_DAEMON_OVER_FLOOR = 1.10
SHUTDOWN_RESERVE = 60.0  # power-off and clean-up after the guest's last round


def host_machine() -> dict[str, Any]:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "host_kernel": platform.release(),
        "python": platform.python_version(),
    }


def other_qemus(ours_running: bool = False) -> int:
    """QEMU processes on this host that are not ours (other people's VMs)."""
    count = -1 if ours_running else 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("qemu-system"):
            count += 1
    return max(0, count)


def checkout() -> dict[str, Any]:
    """Which code ran: HEAD and the files changed in the working tree (read-only git)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        try:
            r = subprocess.run(
                ["git", "-C", str(root), *a], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return r.stdout.rstrip() if r.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line]
    return {"head": git("rev-parse", "--short", "HEAD").strip(), "changed": changed}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class HostSampler:
    """The host's load and other people's VMs, every few seconds while we run."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append((os.getloadavg()[0], other_qemus(ours_running=True)))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(2)
        loads = [s[0] for s in self.samples]
        vms = [s[1] for s in self.samples]
        if not loads:
            return {}
        return {
            "load1_min": round(min(loads), 2),
            "load1_median": round(statistics.median(loads), 2),
            "load1_max": round(max(loads), 2),
            "other_qemus_max": max(vms),
            "samples": len(loads),
        }


class GuestRun:
    """One benchmark's guest run: boot the test VM, run `python -m MODULE ARGS`
    inside it within the time left, and keep the line the guest marked with
    `result_mark`. What the host was doing meanwhile goes into `meta`.

    `guest_args(budget)` gets the seconds the guest may spend measuring (the
    time left after boot, less the power-off and `tail` for the last step's
    clean-up). Returns the guest's JSON result and exit status, or None after
    saying why on stderr.
    """

    def __init__(self, name: str, argv: list[str] | None, deadline: float, **settings: Any) -> None:
        """`settings`: the run's own parameters, first in `meta`; then the host's
        state at the start, the command line and the checkout."""
        self.name, self.deadline = name, deadline
        self.meta: dict[str, Any] = {
            **settings,
            "host": host_machine(),
            "load_start": load(),
            "other_qemus_start": other_qemus(),
            "command": f"python -m bench.{name} " + " ".join(argv or sys.argv[1:]),
            "checkout": checkout(),
        }

    def run(
        self,
        module: str,
        guest_args: Callable[[float], list[str]],
        result_mark: str,
        tail: float = 120.0,
    ) -> tuple[dict[str, Any], int] | None:
        from hotplug.testing.vm.guest import GuestVM
        from hotplug.testing.vm.kernels import VMError, check_host

        result_line: list[str] = []

        def output(line: str) -> None:
            if result_mark in line:
                result_line.append(line.split(result_mark, 1)[1])
            else:
                print(line, flush=True)

        sampler = HostSampler()
        try:
            check_host(usbip=True)
            vm = GuestVM(output=output, prefix="[guest] ")
            killer = threading.Timer(max(1.0, self.deadline - time.monotonic()), vm.close, [10.0])
            killer.daemon = True
            killer.start()
            try:
                with vm:
                    self.meta.update(accel=vm.accel, boot_s=round(vm.boot_seconds or 0, 1))
                    sampler.start()
                    left = self.deadline - time.monotonic()
                    budget = left - SHUTDOWN_RESERVE - tail
                    if budget <= 0:
                        print(f"bench.{self.name}: no time left after boot", file=sys.stderr)
                        return None
                    argv = [sys.executable, "-m", module, *guest_args(budget)]
                    res = vm.run(argv, timeout=max(30.0, left - SHUTDOWN_RESERVE))
            finally:
                killer.cancel()
        except VMError as exc:
            print(f"bench.{self.name}: {exc}", file=sys.stderr)
            return None
        self.meta["host_load_during"] = sampler.stop()
        self.meta["load_end"] = load()
        self.meta["other_qemus_end"] = other_qemus()
        if not result_line:
            print(
                f"bench.{self.name}: the guest gave no result (exit {res.returncode})",
                file=sys.stderr,
            )
            return None
        result: dict[str, Any] = json.loads(result_line[-1])
        return result, res.returncode

    def publish(
        self,
        summary: dict[str, Any],
        errors: list[str],
        json_path: str | None,
        returncode: int,
        **details: Any,
    ) -> int:
        """Print each error and the one-line JSON record (also to `json_path`);
        the exit status: 1 if anything failed."""
        for e in errors:
            print(f"ERROR {e}")
        record = {"bench": self.name, "meta": self.meta, "summary": summary, "errors": errors,
                  **details}  # fmt: skip
        line = json.dumps(record, separators=(",", ":"))
        if json_path:
            Path(json_path).write_text(line + "\n")
        print(line)
        return 1 if errors or returncode != 0 else 0


def stats(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    rounds = result["rounds"]
    ok = [r for r in rounds if r["round"] >= 0 and r["error"] is None and "disk" in r["marks"]]
    out: dict[str, Any] = {"variants": {}, "warmup": {}}
    for v in VARIANTS:
        mine = [r for r in ok if r["variant"] == v]
        if not mine:
            continue
        steps = {
            m: statistics.median([r["marks"][m] for r in mine if m in r["marks"]])
            for m in MARKS
            if any(m in r["marks"] for r in mine)
        }
        out["variants"][v] = {
            "attached": stats([r["marks"]["attached"] for r in mine]),
            "disk": stats([r["marks"]["disk"] for r in mine]),
            "steps_p50": steps,
            "per_round": {r["round"]: r["marks"] for r in mine},
        }
        warm = [r for r in rounds if r["variant"] == v and r["round"] < 0 and r["error"] is None]
        if warm:
            out["warmup"][v] = {"marks": warm[0]["marks"], "notes": warm[0]["notes"]}
    vs = out["variants"]
    ratios: dict[str, float] = {}
    overhead: dict[str, float] = {}
    spread: dict[str, list[float]] = {}
    for what in ("attached", "disk"):
        p50 = {v: vs[v][what]["p50"] for v in vs}
        if "daemon" in p50 and "floor" in p50:
            ratios[f"daemon/floor {what}"] = p50["daemon"] / p50["floor"]
            pairs = [
                vs["daemon"]["per_round"][i][what] - vs["floor"]["per_round"][i][what]
                for i in vs["daemon"]["per_round"]
                if i in vs["floor"]["per_round"]
            ]
            if pairs:
                overhead[f"daemon-floor {what} ms"] = statistics.median(pairs) * 1000
                spread[f"daemon-floor {what} ms"] = [min(pairs) * 1000, max(pairs) * 1000]
        if "udev" in p50 and "daemon" in p50:
            ratios[f"udev/daemon {what}"] = p50["udev"] / p50["daemon"]
    out["ratios"] = ratios
    out["overhead_ms"] = overhead
    out["overhead_spread_ms"] = spread
    if "daemon/floor attached" in ratios:
        out["target_daemon_within_10pct_of_floor"] = {
            w: ratios[f"daemon/floor {w}"] <= TARGET_DAEMON_OVER_FLOOR for w in ("attached", "disk")
        }
    return out


def print_report(summary: dict[str, Any], meta: dict[str, Any]) -> None:
    print()
    print(
        f"Real kernel (VM): plug to attached / disk usable, {meta['rounds']} rounds per variant"
        f" (+{meta['warmup']} warm-up), sysfs polled every {meta['interval'] * 1000:.0f} ms"
    )
    print(
        f"guest: Debian {meta.get('kernel')} under {meta.get('accel')}, "
        f"{meta.get('guest_cpus')} vCPUs; host: {meta['host']['cores']} cores "
        f"({meta['host']['cpu']}), Linux {meta['host']['host_kernel']}"
    )
    print(
        f"host load average at start {meta['load_start']}, at end {meta['load_end']}; other QEMU"
        f" VMs running: {meta['other_qemus_start']} at start, {meta['other_qemus_end']} at end"
    )
    during = meta.get("host_load_during") or {}
    if during:
        print(
            f"host 1-min load while measuring: {during['load1_min']}-{during['load1_max']}"
            f" (median {during['load1_median']}); other QEMU VMs at once: up to"
            f" {during['other_qemus_max']}"
        )
    co = meta.get("checkout") or {}
    if co:
        mods = [f for f in co.get("changed", []) if f.startswith("hotplug/")]
        print(
            f"code: HEAD {co.get('head')}" + (f" + uncommitted {', '.join(mods)}" if mods else "")
        )
    print()
    print(f"{'seconds after plug':26} {'n':>3} {'attached p50':>12} {'min':>6} {'max':>6}"
          f" {'disk p50':>9} {'min':>6} {'max':>6}")  # fmt: skip
    for v in VARIANTS:
        if v not in summary["variants"]:
            continue
        a, d = summary["variants"][v]["attached"], summary["variants"][v]["disk"]
        print(f"{LABEL[v]:26} {a['n']:3} {a['p50']:12.3f} {a['min']:6.3f} {a['max']:6.3f}"
              f" {d['p50']:9.3f} {d['min']:6.3f} {d['max']:6.3f}")  # fmt: skip
    print()
    for name, value in summary["ratios"].items():
        print(f"ratio {name:26} x{value:.2f}")
    for name, value in summary["overhead_ms"].items():
        low, high = summary["overhead_spread_ms"][name]
        print(
            f"overhead {name:23} {value:+.0f} ms (median of per-round differences;"
            f" they range {low:+.0f} to {high:+.0f})"
        )
    target = summary.get("target_daemon_within_10pct_of_floor")
    if target:
        verdict = ", ".join(f"{w} {'ok' if good else 'MISS'}" for w, good in target.items())
        print(f"target (a) within 10 % of (c): {verdict}")
    print()
    print("median time of each step (s after plug; each mark is when the poller first saw it)")
    print(f"{'':26}" + "".join(f"{m:>9}" for m in MARKS))
    for v in VARIANTS:
        if v in summary["variants"]:
            steps = summary["variants"][v]["steps_p50"]
            print(f"{LABEL[v]:26}" + "".join(f"{steps.get(m, float('nan')):9.3f}" for m in MARKS))
    if summary["warmup"]:
        print()
        print("first plug after each exporter started (warm-up round, not in the figures above)")
        for v, w in summary["warmup"].items():
            marks = " ".join(f"{m}={w['marks'][m]:.3f}" for m in MARKS if m in w["marks"])
            print(f"{LABEL[v]:26} {marks}")
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.vm_compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per variant (5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per variant (1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="subset of daemon,udev,floor")
    p.add_argument("--interval", type=float, default=0.005, help="sysfs poll interval (0.005 s)")
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit for everything (900 s)")
    p.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for usbip-hotplug run in the guest (experiments)",
    )
    args = p.parse_args(argv)

    run = GuestRun(
        "vm_compare",
        argv,
        time.monotonic() + args.timeout,
        rounds=args.rounds,
        warmup=args.warmup,
        interval=args.interval,
    )
    meta = run.meta

    def guest_args(budget: float) -> list[str]:
        return [
            "--rounds", str(args.rounds), "--warmup", str(args.warmup),
            "--variants", args.variants, "--interval", str(args.interval),
            "--budget", f"{budget:.0f}",
            *(f"--daemon-env={kv}" for kv in args.daemon_env),
        ]  # fmt: skip

    ran = run.run(
        "bench.vm_compare_guest",
        guest_args,
        RESULT_MARK,
    )
    if ran is None:
        return 1
    result, returncode = ran
    meta.update(result.get("info", {}))
    meta["guest_loadavg"] = result.get("guest_loadavg")
    summary = summarize(result)
    print_report(summary, meta)
    errors = [
        f"{r['variant']} round {r['round']}: {r['error']}" for r in result["rounds"] if r["error"]
    ]
    if result.get("fatal"):
        errors.append(f"fatal: {result['fatal']}")
    return run.publish(summary, errors, args.json, returncode, rounds=result["rounds"])


if __name__ == "__main__":
    sys.exit(main())
