"""Guest side of `bench.vm_datapath`: the exported disk's data path, four ways.

Runs as root inside the test VM (hotplug.testing.vm), where one kernel plays
both machines. One configfs mass-storage gadget on dummy_hcd (backed by a
file in /run, a tmpfs) is the device; the same gadget is measured

  local  as the guest's own usb-storage disk, no USB/IP (the baseline)
  tcp    exported by `usbip-hotplug connect -r 127.0.0.1:PORT` to usbipa
  tls    the same over tls:// (mutual TLS; the device side's relay process
         and usbipa's relay carry the session between loopback pairs)
  wss    the same over wss:// (WebSocket frames inside the TLS)

and each time the vhci-side (or local) disk gets four workloads with O_DIRECT,
one request at a time: 1 MiB sequential write and read, 4 KiB random write
and read. Each workload is bounded by `--seconds` and by a request count, after
a few unmeasured warm-up requests. A 1 MiB write, read back and compared with
the gadget's backing file, checks each path before it is measured.

CPU is read from /proc while each workload runs: on-CPU time per task from
/proc/PID/schedstat (nanoseconds, all threads), grouped as

  relay    the device side's relay process (hotplug.device.tunnel; tls/wss)
  stub     usbip-host's kernel threads (stub_rx, stub_tx)
  usbipa   the usbipa process serving the path (its relay for tls/wss)
  vhci     vhci_hcd's kernel threads (vhci_rx, vhci_tx)
  disk     the gadget's file-storage thread and usb-storage's thread
           (present in every path, the local one too)
  kother   every other kernel thread (kworkers, ksoftirqd, ...)
  io       this process, which issues the requests
  guest    the whole guest's busy time (/proc/stat: all but idle and iowait)

kTLS: /proc/net/tls_stat (the kernel's counters) is read while each path is
attached, so the result says whether the TLS sessions were in the kernel.
Debian's boot of the test VM keeps the AES-NI/CLMUL crypto modules out (they
only cost boot time there); a real machine loads them, so they are loaded
here (`--no-crypto-modules` to leave them out).

Prints progress lines and, last, one line `VM_DATAPATH_RESULT {json}`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.vm_compare_guest import (
    BenchError,
    Child,
    Notify,
    VhciStatus,
    driver_of,
    read,
    wait_until,
)

RESULT_MARK = "VM_DATAPATH_RESULT "
PATHS = ("local", "tcp", "tls", "wss")
WORK = Path("/run/vm-datapath")
PLAIN_PORT = 3250
TLS_PORT = 3251
WSS_PORT = 3252
WSS_PATH = "/usbip"
START_TIMEOUT = 180.0  # a Python daemon's start under emulation on a busy host
ATTACH_TIMEOUT = 120.0
CHECK_SIZE = 1 << 20
PY = sys.executable
GROUPS = ("relay", "stub", "usbipa", "vhci", "disk", "kother", "io", "guest")
KTHREAD_GROUPS = {
    "stub_rx": "stub",
    "stub_tx": "stub",
    "vhci_rx": "vhci",
    "vhci_tx": "vhci",
    "file-storage": "disk",
    "usb-storage": "disk",
}
PF_KTHREAD = 0x00200000
CRYPTO_MODULES = ("aesni_intel", "ghash_clmulni_intel")


def now() -> float:
    return time.monotonic()


def say(text: str) -> None:
    print(f"[vm-datapath {time.strftime('%H:%M:%S')}] {text}", flush=True)


@dataclass(frozen=True)
class Workload:
    name: str
    block: int
    sequential: bool
    write: bool
    max_requests: int


WORKLOADS = (
    Workload("seq-write 1M", 1 << 20, True, True, 4000),
    Workload("seq-read 1M", 1 << 20, True, False, 4000),
    Workload("rand-write 4K", 4096, False, True, 50000),
    Workload("rand-read 4K", 4096, False, False, 50000),
)
WARMUP_REQUESTS = 4


# --------------------------------------------------------------------------- CPU accounting


def _task_ns(pid: str) -> int | None:
    """On-CPU nanoseconds of a process, all its threads (schedstat's first field)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def _guest_busy_ns() -> int:
    """The whole guest's non-idle time (/proc/stat's cpu line, USER_HZ ticks)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = sum(fields[:8]) - idle  # user..steal; guest time is inside user already
    return busy * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Snapshots of every task's CPU time, grouped (module docstring)."""

    def __init__(self) -> None:
        self.relay: set[int] = set()
        self.usbipa: set[int] = set()

    def snapshot(self) -> dict[str, Any]:
        per_task: dict[int, tuple[str, int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            stat = read(Path(f"/proc/{name}/stat"))
            if stat is None:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            rest = stat.rsplit(")", 1)[1].split()
            flags = int(rest[6])
            pid = int(name)
            if flags & PF_KTHREAD:
                group = KTHREAD_GROUPS.get(comm, "kother")
            elif pid in self.relay:
                group = "relay"
            elif pid in self.usbipa:
                group = "usbipa"
            elif pid == os.getpid():
                group = "io"
            else:
                continue
            ns = _task_ns(name)
            if ns is not None:
                per_task[pid] = (group, ns)
        return {"tasks": per_task, "guest": _guest_busy_ns(), "t": now()}

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        """CPU seconds per group between two snapshots (a task new since `before` counts whole)."""
        out = dict.fromkeys(GROUPS, 0.0)
        for pid, (group, ns) in after["tasks"].items():
            old = before["tasks"].get(pid)
            start = old[1] if old is not None and old[0] == group else 0
            out[group] += max(0, ns - start) / 1e9
        out["guest"] = (after["guest"] - before["guest"]) / 1e9
        return out


# --------------------------------------------------------------------------- workloads


def offsets(wl: Workload, disk_size: int, seed: int) -> Iterator[int]:
    blocks = disk_size // wl.block
    if wl.sequential:
        i = 0
        while True:
            yield (i % blocks) * wl.block
            i += 1
    rng = random.Random(seed)
    while True:
        yield rng.randrange(blocks) * wl.block


def run_workload(
    dev: str, wl: Workload, disk_size: int, seconds: float, meter: CpuMeter, seed: int
) -> dict[str, Any]:
    buf = mmap.mmap(-1, wl.block)  # page aligned, as O_DIRECT wants
    if wl.write:
        buf[:] = random.Random(seed).randbytes(wl.block)
    fd = os.open(dev, (os.O_RDWR if wl.write else os.O_RDONLY) | os.O_DIRECT)
    where = offsets(wl, disk_size, seed)
    latencies: list[int] = []

    def one(offset: int) -> None:
        done = os.pwritev(fd, [buf], offset) if wl.write else os.preadv(fd, [buf], offset)
        if done != wl.block:
            raise BenchError(f"{dev}: short {'write' if wl.write else 'read'} at {offset}")

    try:
        for _ in range(WARMUP_REQUESTS):
            one(next(where))
        before = meter.snapshot()
        start = time.perf_counter_ns()
        deadline = start + int(seconds * 1e9)
        while len(latencies) < wl.max_requests:
            t = time.perf_counter_ns()
            if t >= deadline:
                break
            one(next(where))
            latencies.append(time.perf_counter_ns() - t)
        elapsed = (time.perf_counter_ns() - start) / 1e9
        after = meter.snapshot()
    finally:
        os.close(fd)
        buf.close()
    latencies.sort()
    moved = len(latencies) * wl.block

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] / 1e6

    return {
        "workload": wl.name,
        "requests": len(latencies),
        "bytes": moved,
        "seconds": elapsed,
        "MBps": moved / 1e6 / elapsed,
        "lat_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": latencies[-1] / 1e6,
                   "mean": sum(latencies) / len(latencies) / 1e6},
        "cpu_s": CpuMeter.delta(before, after),
    }  # fmt: skip


def check_data(dev: str, gadget: Any, seed: int) -> None:
    """A 1 MiB write through `dev`, read back and compared with the gadget's backing file."""
    from hotplug.testing.vm.gadget import odirect_write_read

    data = random.Random(seed).randbytes(CHECK_SIZE)
    if odirect_write_read(dev, 0, data) != data:
        raise BenchError(f"{dev}: what was read back differs from what was written")
    if gadget.read_backing(0, CHECK_SIZE) != data:
        raise BenchError(f"{dev}: the gadget's backing file differs from what was written")


def tls_stat() -> dict[str, int]:
    """The kernel's kTLS counters (/proc/net/tls_stat; empty without the tls module)."""
    text = read(Path("/proc/net/tls_stat")) or ""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from hotplug.testing.vm import gadget as gd

        self.gd = gd
        self.args = args
        self.gadget: Any = None
        self.busid = ""
        self.meter = CpuMeter()
        self.vhci: VhciStatus | None = None
        self.usbipa_plain: Child | None = None
        self.usbipa_tls: Child | None = None
        self.pki: Any = None
        self.info: dict[str, Any] = {}
        self.state = WORK / "hotplug-state"

    # -- session ------------------------------------------------------------------

    def setup(self) -> None:
        gd = self.gd
        shutil.rmtree(WORK, ignore_errors=True)
        WORK.mkdir(parents=True)
        gd.load_usbip_modules()
        gd.load_gadget_modules(dummy_udcs=1)
        if self.args.crypto_modules:
            for module in CRYPTO_MODULES:
                subprocess.run(["modprobe", module], capture_output=True, timeout=60, check=False)
        self.vhci = VhciStatus()
        self.gadget = gd.MassStorageGadget(
            serial=f"VMDP{os.getpid():06d}", size=self.args.disk_mib << 20, product="datapath disk"
        ).create()
        self.gadget.plug("dummy_udc.0")
        self.busid = self.gadget.wait_busid()
        self.gadget.wait_block_device(timeout=ATTACH_TIMEOUT)
        paths = self.args.paths
        if "tcp" in paths:
            plain = ["-t", str(PLAIN_PORT), "--allow", "127.0.0.0/8"]
            self.usbipa_plain = self.start_usbipa("usbipa-plain", plain)
        if "tls" in paths or "wss" in paths:
            from tests.tlscerts import make_pki

            self.pki = make_pki(WORK / "pki")
            self.usbipa_tls = self.start_usbipa(
                "usbipa-tls",
                [
                    "-t", str(TLS_PORT), "--wss-port", str(WSS_PORT), "--wss-path", WSS_PATH,
                    "--tls-cert", str(self.pki.server.cert), "--tls-key", str(self.pki.server.key),
                    "--tls-client-ca", str(self.pki.ca), "--allow-client", "CN=lab-1",
                ],
            )  # fmt: skip
        crypto = [m for m in CRYPTO_MODULES if Path(f"/sys/module/{m}").exists()]
        self.info.update(
            kernel=os.uname().release,
            guest_cpus=os.cpu_count(),
            busid=self.busid,
            disk_mib=self.args.disk_mib,
            crypto_modules=crypto,
            max_sectors=read(self.local_disk_sysfs() / "queue/max_sectors_kb"),
        )
        say(f"ready: gadget {self.busid}, {self.info}")

    def local_disk_sysfs(self) -> Path:
        return self.gd.wait_block_device(self.busid).sysfs

    def start_usbipa(self, name: str, extra: list[str]) -> Child:
        notify = Notify(WORK / f"{name}.notify")
        t = now()
        try:
            child = Child.start(
                name,
                [PY, "-m", "hotplug.app.cli", "--listen", "127.0.0.1",
                 "--state-dir", str(WORK / f"{name}-state"), *extra],
                env={"NOTIFY_SOCKET": str(notify.path)},
            )  # fmt: skip
            notify.wait_ready(child, START_TIMEOUT)
        finally:
            notify.close()
        self.info[f"{name}_start_s"] = round(now() - t, 2)
        return child

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
        for child in (self.usbipa_plain, self.usbipa_tls):
            if child is not None:
                child.stop()
        if self.gadget is not None:
            with contextlib.suppress(Exception):
                self.gadget.unplug(timeout=60)
            with contextlib.suppress(Exception):
                self.gadget.remove()
        if self.vhci is not None:
            self.vhci.close()

    # -- one path -----------------------------------------------------------------

    def cli(self, *args: str, env: dict[str, str] | None = None) -> None:
        r = subprocess.run(
            [PY, "-m", "hotplug.device.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "USBIP_HOTPLUG_STATE_DIR": str(self.state), **(env or {})},
            check=False,
        )
        if r.returncode != 0:
            raise BenchError(f"usbip-hotplug {' '.join(args)} failed: {r.stderr.strip()[-400:]}")

    def remote(self, path: str) -> list[str]:
        if path == "tcp":
            return ["-r", f"127.0.0.1:{PLAIN_PORT}"]
        pki = self.pki
        flags = ["--cert", str(pki.client.cert), "--key", str(pki.client.key), "--ca", str(pki.ca)]
        if path == "tls":
            return ["-r", f"tls://127.0.0.1:{TLS_PORT}", *flags]
        return ["-r", f"wss://127.0.0.1:{WSS_PORT}{WSS_PATH}", *flags]

    def attach(self, path: str) -> str:
        """Export the gadget over `path`; the vhci-side disk's /dev node."""
        from bench.vm_compare_guest import vhci_disk

        assert self.vhci is not None
        vhci = self.vhci
        relays_before = set(tunnel_pids())
        env = {"USBIP_HOTPLUG_RELAY_LOG": str(WORK / f"relay-{path}.log")}
        t = now()
        self.cli("connect", *self.remote(path), "-b", self.busid, env=env)
        used = wait_until(vhci.used, ATTACH_TIMEOUT, "a vhci port in use")
        dev = wait_until(lambda: vhci_disk(used[1]), ATTACH_TIMEOUT, "the vhci-side disk")
        self.info[f"{path}_attach_s"] = round(now() - t, 2)
        self.meter.relay = set(tunnel_pids()) - relays_before
        if path != "tcp" and not self.meter.relay:
            raise BenchError(f"{path}: no relay process found after connect")
        usbipa = self.usbipa_plain if path == "tcp" else self.usbipa_tls
        self.meter.usbipa = {usbipa.proc.pid} if usbipa is not None else set()
        return str(dev)

    def release(self) -> None:
        """Withdraw the export; wait until the gadget is the local disk again."""
        assert self.vhci is not None
        vhci = self.vhci
        if driver_of(self.busid) == "usbip-host":
            self.cli("disconnect", "-b", self.busid)
        wait_until(lambda: not vhci.busy(), ATTACH_TIMEOUT, "every vhci port free")
        wait_until(lambda: driver_of(self.busid) == "usb", ATTACH_TIMEOUT, "the gadget on usb")
        relays = self.meter.relay
        wait_until(lambda: not relays & set(tunnel_pids()), 60, "the relay process to end")
        self.gd.wait_block_device(self.busid, timeout=ATTACH_TIMEOUT)
        self.meter.relay = set()
        self.meter.usbipa = set()

    def measure(self, path: str) -> dict[str, Any]:
        dev = self.gd.wait_block_device(self.busid).dev if path == "local" else self.attach(path)
        out: dict[str, Any] = {"path": path, "dev": dev, "workloads": []}
        try:
            check_data(dev, self.gadget, seed=len(path))
            for index, wl in enumerate(WORKLOADS):
                if wl.name.split()[0] not in self.args.workloads:
                    continue
                result = run_workload(
                    dev, wl, self.args.disk_mib << 20, self.args.seconds, self.meter, seed=index
                )
                out["workloads"].append(result)
                say(
                    f"{path:5} {wl.name:13} {result['MBps']:8.2f} MB/s"
                    f"  p50 {result['lat_ms']['p50']:7.2f} ms  p99 {result['lat_ms']['p99']:7.2f}"
                    f" ms  n={result['requests']}"
                )
            out["tls_stat"] = tls_stat()
            out["relay_log"] = read(WORK / f"relay-{path}.log")
        finally:
            if path != "local":
                self.release()
        return out


def tunnel_pids() -> list[int]:
    """Processes running our device side's relay (python -m hotplug.device.tunnel)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"hotplug.device.tunnel" in argv:
            found.append(int(name))
    return found


def bench_main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        sys.exit("bench.vm_datapath_guest: run as root inside the test VM (bench.vm_datapath)")
    bench = Bench(args)
    paths: list[dict[str, Any]] = []
    fatal: str | None = None
    t_start = now()
    loads = [os.getloadavg()]
    try:
        bench.setup()
        for path in args.paths:
            if now() - t_start > args.budget:
                fatal = f"time budget of {args.budget:.0f} s used up before {path}; stopped early"
                say(fatal)
                break
            try:
                paths.append(bench.measure(path))
            except (BenchError, OSError) as exc:
                paths.append({"path": path, "error": str(exc)})
                say(f"{path}: ERROR {exc}")
            loads.append(os.getloadavg())
    except (BenchError, OSError) as exc:
        fatal = str(exc)
        say(f"FATAL: {exc}")
    finally:
        for child in (bench.usbipa_plain, bench.usbipa_tls):
            if child is not None and child.proc.poll() is not None:
                say(f"{child.name} exited early:{child.tail()}")
        bench.teardown()
    result = {
        "info": bench.info,
        "seconds": args.seconds,
        "guest_loadavg": loads,
        "paths": paths,
        "fatal": fatal,
    }
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0 if fatal is None and all("error" not in p for p in paths) else 1


def _names(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(choices)}")
        return names

    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vm_datapath_guest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    kinds = tuple(sorted({w.name.split()[0] for w in WORKLOADS}))
    p.add_argument("--paths", type=_names(PATHS), default=list(PATHS), help="local,tcp,tls,wss")
    p.add_argument("--workloads", type=_names(kinds), default=list(kinds), help=",".join(kinds))
    p.add_argument("--seconds", type=float, default=5.0, help="per workload, at most (5 s)")
    p.add_argument("--disk-mib", type=int, default=64, help="the gadget's size (64 MiB)")
    p.add_argument("--budget", type=float, default=600.0, help="start no path after this (s)")
    p.add_argument("--no-crypto-modules", dest="crypto_modules", action="store_false",
                   help="leave aesni_intel/ghash_clmulni_intel unloaded")  # fmt: skip
    args = p.parse_args(argv)
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
