"""The exported disk's data path on the real kernel: plain TCP, tls://, wss:// and local.

    python -m bench.vm_datapath [--seconds 5] [--paths local,tcp,tls,wss]

Issue 14, item 4. Boots the test VM once (Debian's kernel under QEMU,
hotplug.testing.vm) and runs `bench.vm_datapath_guest` in it: one configfs
mass-storage gadget on dummy_hcd, measured as the guest's own disk (local,
the baseline) and then exported by `usbip-hotplug connect` to usbipa on the
same kernel over plain TCP, tls:// and wss://, the vhci-side disk measured
each time. Workloads, O_DIRECT, one request at a time, each bounded by
`--seconds` and a request count: 1 MiB sequential write and read, 4 KiB
random write and read.

Printed: MB/s and per-request latency (p50, p99) with ratios against local
and against plain TCP, all measured in this run; CPU seconds per GB moved on
the device side (our relay process; usbip-host's stub_rx/stub_tx threads)
and the application side (usbipa, whose relay carries tls/wss; vhci_hcd's
vhci_rx/vhci_tx threads), plus the disk's own threads, other kernel threads,
the process issuing the requests and the whole guest (from /proc); whether
the TLS sessions ran in the kernel (kTLS, /proc/net/tls_stat); the host's
load while measuring; a JSON line with everything. Bounded: `--timeout`
(900 s) covers boot, the paths and power-off. Exits 1 if a path failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from bench.vm_compare import GuestRun
from bench.vm_datapath_guest import PATHS, RESULT_MARK

DEVICE_SIDE = ("relay", "stub")
APP_SIDE = ("usbipa", "vhci")
CPU_COLUMNS = ("relay", "stub", "usbipa", "vhci", "disk", "kother", "io", "guest")


def rows(result: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(path, workload) -> that workload's figures, for the paths that ran."""
    out = {}
    for path in result["paths"]:
        for wl in path.get("workloads", []):
            out[(path["path"], wl["workload"])] = wl
    return out


def per_gb(wl: dict[str, Any]) -> dict[str, float]:
    gb = wl["bytes"] / 1e9
    cpu = {k: v / gb for k, v in wl["cpu_s"].items()} if gb else {}
    cpu["device side"] = sum(cpu.get(k, 0.0) for k in DEVICE_SIDE)
    cpu["app side"] = sum(cpu.get(k, 0.0) for k in APP_SIDE)
    return cpu


def ktls(path: dict[str, Any]) -> str:
    """What the kernel's counters say about a path's TLS sessions."""
    stat = path.get("tls_stat") or {}
    if not stat:
        return "no kTLS (tls module not loaded)"
    tx, rx = stat.get("TlsCurrTxSw", 0), stat.get("TlsCurrRxSw", 0)
    return f"kTLS sockets now: send {tx}, receive {rx} (TlsTxSw {stat.get('TlsTxSw', 0)}," \
        f" TlsRxSw {stat.get('TlsRxSw', 0)} since boot)"  # fmt: skip


def ratio(mine: dict[str, Any], ref: dict[str, Any] | None, key: str) -> str:
    """'x1.23': `mine` against `ref` in MB/s or in p50 latency; '' against itself."""
    if ref is None or ref is mine:
        return ""
    if key == "MBps":
        a, b = mine["MBps"], ref["MBps"]
    else:
        a, b = mine["lat_ms"]["p50"], ref["lat_ms"]["p50"]
    return f"x{a / b:.2f}" if b else ""


def print_report(result: dict[str, Any], meta: dict[str, Any]) -> None:
    info = result.get("info", {})
    table = rows(result)
    workloads = list(dict.fromkeys(w for _, w in table))
    paths = [p for p in PATHS if any((p, w) in table for w in workloads)]
    print()
    print(
        f"Real kernel (VM): an exported mass-storage gadget, O_DIRECT, one request at a time,"
        f" at most {result['seconds']:g} s per workload"
    )
    print(
        f"guest: Debian {info.get('kernel')} under {meta.get('accel')}, {info.get('guest_cpus')}"
        f" vCPUs, disk {info.get('disk_mib')} MiB on dummy_hcd, max_sectors_kb"
        f" {info.get('max_sectors')}, crypto modules {info.get('crypto_modules')}; host:"
        f" {meta['host']['cores']} cores ({meta['host']['cpu']}), Linux"
        f" {meta['host']['host_kernel']}"
    )
    print(
        f"host load average at start {meta['load_start']}, at end {meta['load_end']}; other QEMU"
        f" VMs: {meta['other_qemus_start']} at start, {meta['other_qemus_end']} at end"
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
        extra = f" + uncommitted {', '.join(mods)}" if mods else ""
        print(f"code: HEAD {co.get('head')}{extra}")
    print()
    print(f"{'path':6} {'workload':14} {'n':>6} {'MB/s':>8} {'x local':>8} {'x tcp':>7}"
          f" {'p50 ms':>8} {'p99 ms':>8} {'p50 x local':>11} {'p50 x tcp':>9}")  # fmt: skip
    for w in workloads:
        base, tcp = table.get(("local", w)), table.get(("tcp", w))
        for p in paths:
            r = table.get((p, w))
            if r is None:
                continue
            lat = r["lat_ms"]
            print(
                f"{p:6} {w:14} {r['requests']:6} {r['MBps']:8.2f} {ratio(r, base, 'MBps'):>8}"
                f" {ratio(r, tcp, 'MBps'):>7} {lat['p50']:8.2f} {lat['p99']:8.2f}"
                f" {ratio(r, base, 'p50'):>11} {ratio(r, tcp, 'p50'):>9}"
            )
    print()
    print("CPU seconds per GB moved (device side = relay + stub; app side = usbipa + vhci)")
    print(f"{'path':6} {'workload':14} {'device':>7} {'app':>7} |" +
          "".join(f"{c:>8}" for c in CPU_COLUMNS))  # fmt: skip
    for w in workloads:
        for p in paths:
            r = table.get((p, w))
            if r is None:
                continue
            cpu = per_gb(r)
            print(
                f"{p:6} {w:14} {cpu['device side']:7.1f} {cpu['app side']:7.1f} |"
                + "".join(f"{cpu.get(c, 0.0):8.1f}" for c in CPU_COLUMNS)
            )
    print()
    for path in result["paths"]:
        if path["path"] in ("tls", "wss") and "error" not in path:
            print(f"{path['path']}: {ktls(path)}")
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.vm_datapath",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=5.0, help="per workload, at most (5 s)")
    p.add_argument("--paths", default=",".join(PATHS), help="subset of local,tcp,tls,wss")
    p.add_argument("--workloads", default=None, help="subset of seq-write,seq-read,...")
    p.add_argument("--disk-mib", type=int, default=64, help="the gadget's size (64 MiB)")
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit for everything (900 s)")
    p.add_argument("--no-crypto-modules", action="store_true", help="leave AES-NI/CLMUL unloaded")
    p.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    args = p.parse_args(argv)

    run = GuestRun("vm_datapath", argv, time.monotonic() + args.timeout)
    meta = run.meta

    def guest_args(budget: float) -> list[str]:
        return [
            "--paths", args.paths, "--seconds", str(args.seconds),
            "--disk-mib", str(args.disk_mib), "--budget", f"{budget:.0f}",
            *(["--workloads", args.workloads] if args.workloads else []),
            *(["--no-crypto-modules"] if args.no_crypto_modules else []),
        ]  # fmt: skip

    ran = run.run(
        "bench.vm_datapath_guest",
        guest_args,
        RESULT_MARK,
    )
    if ran is None:
        return 1
    result, returncode = ran
    print_report(result, meta)
    errors = [f"{p['path']}: {p['error']}" for p in result["paths"] if "error" in p]
    if result.get("fatal"):
        errors.append(f"fatal: {result['fatal']}")
    summary = {
        f"{p} {w}": {"MBps": round(r["MBps"], 3), "p50_ms": round(r["lat_ms"]["p50"], 3),
                     "cpu_s_per_GB": {k: round(v, 2) for k, v in per_gb(r).items()}}
        for (p, w), r in rows(result).items()
    }  # fmt: skip
    return run.publish(summary, errors, args.json, returncode, result=result)


if __name__ == "__main__":
    sys.exit(main())
