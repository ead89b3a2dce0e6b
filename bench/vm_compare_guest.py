"""Guest side of `bench.vm_compare`: plug to attached on the real kernel, three ways.

Runs as root inside the test VM (hotplug.testing.vm), where one kernel plays
both machines: a configfs mass-storage gadget on dummy_hcd is the USB device,
vhci_hcd on the same kernel is the application side. Each round plugs the
gadget (t0 = the write of the UDC name) and polls sysfs every `--interval`
(5 ms) from this process until the vhci-side disk answers a 4 KiB O_DIRECT
read. Variants, one round of each in turn (the order rotates every round):

  daemon  `usbip-hotplug run -c POLICY` exporting to `usbipa` on 127.0.0.1
  udev    a udev rule RUN+="usbip bind -b %k" (Debian's usbip), `usbipd -D`,
          and `usbip attach -r 127.0.0.1 -b BUSID` tried every second by a
          shell loop started before the plug
  floor   an already running Python process that polls /sys/bus/usb/devices
          every 2 ms and calls hotplug.device.export.export() to the same usbipa the
          moment the device shows up: what no exporter can beat on this kernel

All of them are started once and stay up, as on a real machine ("already
running"); each has its own gadget (serial prefix VMCA / VMCB / VMCC) that
only it reacts to, and the daemon is frozen (SIGSTOP) outside its own rounds,
so a plug is seen by exactly one exporter. First one plug with no exporter
(the kernel loads usb-storage, sd_mod...), then one unmeasured warm-up round
per variant (its first plug after start), then the measured rounds. After
each round everything is undone and checked before the next: vhci ports
free, the gadget unplugged and gone, its busid out of usbip-host's
match_busid, nothing bound to usbip-host.

Marks per round, seconds after t0 (each is when this process first saw it):
  visible   /sys/bus/usb/devices/BUSID exists (enumerated on dummy_hcd)
  udev      udev's "add" for BUSID reached a libudev monitor (what the daemon
            hears; udev sends it after its RUN+= programs have run)
  bound     BUSID's driver is usbip-host
  exported  BUSID's usbip_status reads 2 (the stub has the socket)
  attached  a vhci port reads status 6 (used)
  disk      the vhci-side block device exists and a 4 KiB O_DIRECT read succeeds

Prints progress lines and, last, one line `VM_COMPARE_RESULT {json}` for the
host (`bench.vm_compare`). `--floor-exporter` is the floor variant's process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

RESULT_MARK = "VM_COMPARE_RESULT "
VARIANTS = ("daemon", "udev", "floor")
SERIAL_PREFIX = {"daemon": "VMCA", "udev": "VMCB", "floor": "VMCC"}
MARKS = ("visible", "udev", "bound", "exported", "attached", "disk")

USBIPA_PORT = 3250  # the application side of `daemon` and `floor`
USBIPD_PORT = 3240  # Debian's usbipd (its default: `usbip attach` has no port option)
WORK = Path("/run/vm-compare")
RULE_FILE = Path("/run/udev/rules.d/90-usbip-vm-compare.rules")
SYS_USB = Path("/sys/bus/usb/devices")
STUB_DRIVER_DIR = Path("/sys/bus/usb/drivers/usbip-host")
VHCI0 = Path("/sys/devices/platform/vhci_hcd.0")
FLOOR_POLL = 0.002
START_TIMEOUT = 180.0  # a Python daemon's start under emulation on a busy host
CLEAN_TIMEOUT = 60.0
PY = sys.executable


def now() -> float:
    return time.monotonic()


def say(text: str) -> None:
    print(f"[vm-compare {time.strftime('%H:%M:%S')}] {text}", flush=True)


class BenchError(Exception):
    """A round could not be run or cleaned up."""


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = now() + timeout
    while True:
        value = cond()
        if value:
            return value
        if now() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def driver_of(busid: str) -> str | None:
    try:
        return os.path.basename(os.readlink(SYS_USB / busid / "driver"))
    except OSError:
        return None


def run(argv: list[str], timeout: float = 60.0, check: bool = True) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        out = (r.stderr or r.stdout)[-500:]
        raise BenchError(f"{' '.join(argv)} failed ({r.returncode}): {out}")
    return r.stdout


# --------------------------------------------------------------------------- kernel state


class VhciStatus:
    """The vhci status files, kept open: a pread at offset 0 renders them anew
    (0.05 ms per file here, against 0.6 ms for open+read+close under emulation)."""

    def __init__(self) -> None:
        more = sorted((p.name for p in VHCI0.glob("status.*")), key=lambda n: int(n[7:]))
        names = ["status", *more]
        self.fds = [os.open(VHCI0 / n, os.O_RDONLY) for n in names]

    def ports(self) -> list[tuple[int, int, str]]:
        """(port, status, local_busid) of every port."""
        out = []
        for fd in self.fds:
            lines = os.pread(fd, 1 << 16, 0).decode().splitlines()
            cols = lines[0].split()
            i_port, i_sta, i_bus = cols.index("port"), cols.index("sta"), cols.index("local_busid")
            for line in lines[1:]:
                f = line.split()
                if len(f) > i_bus:
                    out.append((int(f[i_port]), int(f[i_sta]), f[i_bus]))
        return out

    def used(self) -> tuple[int, str] | None:
        """(port, local_busid) of a port reading 6 (used), if any."""
        for port, sta, busid in self.ports():
            if sta == 6:
                return port, busid
        return None

    def busy(self) -> list[int]:
        return [port for port, sta, _ in self.ports() if sta != 4]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def match_busids() -> list[str]:
    """usbip-host's match table: busids on one line, separated by spaces."""
    return (read(STUB_DRIVER_DIR / "match_busid") or "").split()


def stub_bound() -> list[str]:
    return sorted(p.name for p in STUB_DRIVER_DIR.iterdir() if p.is_symlink() and "-" in p.name)


def vhci_disk(local_busid: str) -> str | None:
    """/dev node of the disk behind the vhci-attached device `local_busid`, once it has a size."""
    block = Path("/sys/block")
    for link in block.iterdir():
        real = str(link.resolve())
        if "/vhci_hcd." in real and f"/{local_busid}/" in real:
            size = read(link / "size")
            if size and size != "0" and os.path.exists(f"/dev/{link.name}"):
                return f"/dev/{link.name}"
    return None


def odirect_read_ok(dev: str) -> bool:
    buf = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT wants
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        return os.preadv(fd, [buf], 0) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()


def dummy_busid(udc: str) -> str:
    """The busid a gadget on dummy_udc.N gets: port 1 of dummy_hcd.N's root hub."""
    index = udc.rsplit(".", 1)[1]
    hcd = Path(f"/sys/devices/platform/dummy_hcd.{index}")
    hubs = [p.name for p in hcd.iterdir() if p.name.startswith("usb") and p.name[3:].isdigit()]
    if len(hubs) != 1:
        raise BenchError(f"{hcd}: expected one root hub, found {hubs}")
    return f"{hubs[0][3:]}-1"


# --------------------------------------------------------------------------- child processes


@dataclass
class Child:
    """A process we started, with its output lines timestamped as they arrive."""

    name: str
    proc: subprocess.Popen[str]
    lines: queue.Queue[tuple[float, str]] = field(default_factory=queue.Queue)
    log: list[tuple[float, str]] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        stdin: bool = False,
        merge: bool = True,
    ) -> Child:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: we stop exactly it
        )
        child = cls(name, proc)
        assert proc.stdout is not None
        threading.Thread(target=child._pump, args=(proc.stdout,), daemon=True).start()
        if not merge:
            assert proc.stderr is not None
            threading.Thread(target=child._pump, args=(proc.stderr,), daemon=True).start()
        return child

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            item = (now(), line.rstrip("\n"))
            self.log.append(item)
            self.lines.put(item)

    def expect(self, pred: Callable[[str], bool], timeout: float, what: str) -> tuple[float, str]:
        deadline = now() + timeout
        while True:
            left = deadline - now()
            if left <= 0:
                raise BenchError(f"{self.name}: no {what} within {timeout:.0f} s{self.tail()}")
            try:
                t, line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise BenchError(
                        f"{self.name} exited ({self.proc.returncode}) before {what}{self.tail()}"
                    ) from None
                continue
            if pred(line):
                return t, line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def tail(self, n: int = 15) -> str:
        return "".join(f"\n    {self.name}| {line}" for _, line in self.log[-n:])

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


class Notify:
    """systemd's side of sd_notify: our daemons say READY=1 here."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_ready(self, child: Child, timeout: float) -> float:
        deadline = now() + timeout
        while True:
            if child.proc.poll() is not None:
                raise BenchError(f"{child.name} exited before READY{child.tail()}")
            left = deadline - now()
            if left <= 0:
                raise BenchError(f"{child.name}: no READY within {timeout:.0f} s{child.tail()}")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in data.split("\n"):
                return now()

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------- one round


@dataclass
class Round:
    variant: str
    index: int  # -1 for warm-up rounds
    marks: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Meter:
    """Plugs the gadget and watches sysfs until the vhci-side disk reads."""

    def __init__(self, interval: float, timeout: float) -> None:
        import pyudev

        self.interval = interval
        self.timeout = timeout
        self.vhci = VhciStatus()
        self.context = pyudev.Context()
        self.pyudev = pyudev

    def plug_and_measure(self, gadget: Any, udc: str, busid: str) -> tuple[float, dict[str, float]]:
        """(t0, marks): t0 on CLOCK_MONOTONIC, marks in seconds after it."""
        monitor = self.pyudev.Monitor.from_netlink(self.context, source="udev")
        monitor.filter_by("usb", "usb_device")
        monitor.start()
        marks: dict[str, float] = {}
        local: str | None = None
        status_file = SYS_USB / busid / "usbip_status"
        dev_dir = SYS_USB / busid
        t0 = now()
        gadget.plug(udc)  # the write of the UDC name
        deadline = t0 + self.timeout
        while "disk" not in marks:
            t = now()
            if t > deadline:
                missing = [m for m in MARKS if m not in marks]
                raise BenchError(
                    f"round timed out after {self.timeout:.0f} s; seen {marks}, not seen {missing}"
                )
            while (ev := monitor.poll(timeout=0)) is not None:
                if "udev" not in marks and ev.sys_name == busid and ev.action == "add":
                    marks["udev"] = now() - t0
            if "visible" not in marks and dev_dir.exists():
                marks["visible"] = now() - t0
            if "bound" not in marks and driver_of(busid) == "usbip-host":
                marks["bound"] = now() - t0
            if "exported" not in marks and read(status_file) == "2":
                marks["exported"] = now() - t0
            if local is None:
                used = self.vhci.used()
                if used is not None:
                    marks["attached"] = now() - t0
                    local = used[1]
            if local is not None:
                dev = vhci_disk(local)
                if dev is not None and odirect_read_ok(dev):
                    marks["disk"] = now() - t0
            time.sleep(max(0.0, self.interval - (now() - t)))
        return t0, marks


# --------------------------------------------------------------------------- the variants


POLICY = """\
version: 1
targets:
  apps:
    address: "127.0.0.1:{port}"
rules:
  - name: vm-compare
    match: {{serial: "{prefix}*"}}
    export: apps
"""
# Between its rounds the daemon's policy matches nothing: the reload withdraws
# the export and gives the device back to its driver, as an operator would.
OFF_PREFIX = "NO-SUCH-SERIAL-"

ATTACH_LOOP = """\
i=0
while [ $i -lt {tries} ]; do
  i=$((i+1))
  if {usbip} attach -r 127.0.0.1 -b {busid} >/dev/null 2>&1; then
    echo "attached on try $i"; exit 0
  fi
  echo "try $i failed"
  sleep 1
done
exit 1
"""


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process (all its threads), or None if it is gone."""
    stat = read(Path(f"/proc/{pid}/stat"))
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_idle(pids: list[int], timeout: float = 30.0) -> None:
    """Until none of `pids` used CPU for 0.5 s (a daemon done with its backlog)."""
    deadline = now() + timeout
    last = [cpu_ticks(p) for p in pids]
    calm = 0
    while calm < 2 and now() < deadline:
        time.sleep(0.25)
        cur = [cpu_ticks(p) for p in pids]
        calm = calm + 1 if cur == last else 0
        last = cur


class Bench:
    """The session: usbipa, the daemon, usbipd + the udev rule and the floor
    exporter all start once and live through every round (as they would on a
    real machine: "already running"). So that exactly one exporter sees each
    plug, the daemon is frozen (SIGSTOP) outside its own rounds and thawed
    (SIGCONT) a quiet moment before them; the floor process waits on its stdin
    and usbipd in poll() (no CPU), and the udev rule matches only its own
    gadget's serial."""

    def __init__(self, args: argparse.Namespace) -> None:
        from hotplug.testing.vm import gadget as gd

        self.gd = gd
        self.args = args
        self.variants: list[str] = args.variants
        self.udc = "dummy_udc.0"
        self.busid = ""
        self.usbip = shutil.which("usbip") or "/usr/sbin/usbip"
        self.usbipd = shutil.which("usbipd") or "/usr/sbin/usbipd"
        self.gadgets: dict[str, Any] = {}
        self.usbipa: Child | None = None
        self.daemon: Child | None = None
        self.daemon_notify: Notify | None = None
        self.daemon_paused = False
        self.floor: Child | None = None
        self.usbipd_pidfile = WORK / "usbipd.pid"
        self.policy = WORK / "policy.yaml"
        self.meter: Meter | None = None
        self.info: dict[str, Any] = {}

    # -- session ----------------------------------------------------------------

    def setup(self) -> None:
        gd = self.gd
        WORK.mkdir(parents=True, exist_ok=True)
        gd.load_usbip_modules()
        gd.load_gadget_modules(dummy_udcs=1)
        self.busid = dummy_busid(self.udc)
        for variant in self.variants:
            serial = f"{SERIAL_PREFIX[variant]}{os.getpid():06d}"
            g = gd.MassStorageGadget(serial=serial, size=4 << 20, product="vm-compare disk")
            self.gadgets[variant] = g.create()
        self.meter = Meter(self.args.interval, self.args.round_timeout)
        self.check_or_clean("at start")
        self.system_warmup()
        t = now()
        notify = Notify(WORK / "usbipa.notify")
        try:
            self.usbipa = Child.start(
                "usbipa",
                [
                    PY, "-m", "hotplug.app.cli", "--listen", "127.0.0.1",
                    "-t", str(USBIPA_PORT), "--allow", "127.0.0.0/8",
                    "--state-dir", str(WORK / "usbipa-state"),
                ],
                env={"NOTIFY_SOCKET": str(notify.path)},
            )  # fmt: skip
            notify.wait_ready(self.usbipa, START_TIMEOUT)
        finally:
            notify.close()
        self.info["usbipa_start_s"] = round(now() - t, 2)
        if "daemon" in self.variants:
            self.start_daemon()
        if "udev" in self.variants:
            self.start_classic()
        if "floor" in self.variants:
            t = now()
            self.floor = Child.start(
                "floor",
                [
                    PY, "-m", "bench.vm_compare_guest", "--floor-exporter",
                    "--target", f"127.0.0.1:{USBIPA_PORT}",
                    "--serial-prefix", SERIAL_PREFIX["floor"],
                ],
                stdin=True,
                merge=False,
            )  # fmt: skip
            self.floor.expect(lambda s: s == "ready", START_TIMEOUT, "ready")
            self.info["floor_start_s"] = round(now() - t, 2)
        self.info.update(
            kernel=os.uname().release,
            guest_cpus=os.cpu_count(),
            busid=self.busid,
            usb_storage_delay_use=read(Path("/sys/module/usb_storage/parameters/delay_use")),
        )
        say(f"ready: gadget busid {self.busid}, usbipa on 127.0.0.1:{USBIPA_PORT}, {self.info}")

    def system_warmup(self) -> None:
        """One plug with no exporter: the kernel loads usb-storage, sd_mod... now,
        so that no variant's first round pays for it."""
        gd = self.gd
        g = gd.MassStorageGadget(serial=f"VMCZ{os.getpid():06d}", size=1 << 20)
        t = now()
        try:
            g.create()
            g.plug(self.udc)
            g.wait_block_device(timeout=CLEAN_TIMEOUT)
            g.unplug(timeout=CLEAN_TIMEOUT)
        finally:
            g.remove()
        self.info["system_warmup_s"] = round(now() - t, 2)

    def start_daemon(self) -> None:
        state = WORK / "hotplug-state"
        shutil.rmtree(state, ignore_errors=True)
        self.write_policy(SERIAL_PREFIX["daemon"])
        self.daemon_notify = Notify(WORK / "daemon.notify")
        t = now()
        self.daemon = Child.start(
            "daemon",
            [PY, "-m", "hotplug.device.cli", "run", "-c", str(self.policy)],
            env={
                "NOTIFY_SOCKET": str(self.daemon_notify.path),
                "USBIP_HOTPLUG_STATE_DIR": str(state),
                **dict(kv.split("=", 1) for kv in self.args.daemon_env),
            },
        )
        self.daemon_notify.wait_ready(self.daemon, START_TIMEOUT)
        self.info["daemon_start_s"] = round(now() - t, 2)
        self.pause_daemon()

    def start_classic(self) -> None:
        self.usbipd_pidfile.unlink(missing_ok=True)
        if listening(USBIPD_PORT):
            raise BenchError(f"something already listens on {USBIPD_PORT}")
        run([self.usbipd, "-D", f"--pid={self.usbipd_pidfile}", "--tcp-port", str(USBIPD_PORT)])
        wait_until(lambda: listening(USBIPD_PORT), 30, f"usbipd on {USBIPD_PORT}")
        serial = self.gadgets["udev"].serial
        RULE_FILE.parent.mkdir(parents=True, exist_ok=True)
        RULE_FILE.write_text(
            'ACTION=="add", SUBSYSTEM=="usb", ENV{DEVTYPE}=="usb_device", '
            f'ATTR{{serial}}=="{serial}", RUN+="{self.usbip} bind -b %k"\n'
        )
        run(["udevadm", "control", "--reload"])
        self.info["udev_rule"] = RULE_FILE.read_text().strip()

    def teardown(self) -> None:
        if self.floor is not None:
            if self.floor.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.floor.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.floor.proc.wait(10)
            self.floor.stop(5)
        if self.daemon is not None:
            self.resume_daemon()
            self.daemon.stop(60)
        if self.daemon_notify is not None:
            self.daemon_notify.close()
        if RULE_FILE.exists():
            RULE_FILE.unlink()
            run(["udevadm", "control", "--reload"], check=False)
        self.stop_usbipd()
        if self.usbipa is not None:
            self.usbipa.stop()
        for g in self.gadgets.values():
            with contextlib.suppress(Exception):
                g.remove()
        if self.meter is not None:
            self.meter.vhci.close()

    def stop_usbipd(self) -> None:
        text = read(self.usbipd_pidfile)
        if not text:
            return
        pid = int(text)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

        def gone() -> bool:
            stat = read(Path(f"/proc/{pid}/stat"))
            return stat is None or stat.rsplit(")", 1)[1].split()[0] == "Z"

        wait_until(gone, 30, "usbipd to exit")
        self.usbipd_pidfile.unlink(missing_ok=True)

    # -- the daemon between its rounds --------------------------------------------

    def write_policy(self, prefix: str) -> None:
        self.policy.write_text(POLICY.format(port=USBIPA_PORT, prefix=prefix))

    def reload_daemon(self, prefix: str) -> None:
        assert self.daemon is not None and self.daemon_notify is not None
        self.write_policy(prefix)
        os.kill(self.daemon.proc.pid, signal.SIGHUP)
        self.daemon_notify.wait_ready(self.daemon, 60)  # READY=1 again: reload done

    def pause_daemon(self) -> None:
        if self.daemon is not None and not self.daemon_paused:
            os.kill(self.daemon.proc.pid, signal.SIGSTOP)
            self.daemon_paused = True

    def resume_daemon(self) -> None:
        if self.daemon is not None and self.daemon_paused:
            os.kill(self.daemon.proc.pid, signal.SIGCONT)
            self.daemon_paused = False

    # -- between rounds ---------------------------------------------------------------

    def quiet(self) -> None:
        """udev done with what the last step queued, our processes idle, a moment of calm."""
        run(["udevadm", "settle", "--timeout=60"], timeout=90, check=False)
        pids = [c.proc.pid for c in (self.usbipa, self.floor) if c is not None]
        if self.daemon is not None and not self.daemon_paused:
            pids.append(self.daemon.proc.pid)
        wait_idle(pids)
        time.sleep(self.args.quiet)

    def problems(self) -> list[str]:
        assert self.meter is not None
        found = []
        if busy := self.meter.vhci.busy():
            found.append(f"vhci ports not free: {busy}")
        if (SYS_USB / self.busid).exists():
            found.append(f"{self.busid} still present")
        if self.busid in match_busids():
            found.append(f"{self.busid} still in usbip-host's match_busid")
        if bound := stub_bound():
            found.append(f"bound to usbip-host: {bound}")
        return found

    def check_clean(self, when: str) -> None:
        if problems := self.problems():
            raise BenchError(f"not clean {when}: " + "; ".join(problems))

    def check_or_clean(self, when: str) -> None:
        if self.problems():
            self.force_clean()
            self.check_clean(f"{when}, after cleaning up")

    def wait_ports_free(self) -> None:
        assert self.meter is not None
        vhci = self.meter.vhci
        wait_until(lambda: not vhci.busy(), CLEAN_TIMEOUT, "every vhci port free")

    def wait_home(self) -> None:
        """The device given back: usual driver, not in match_busid, no port used."""
        self.wait_ports_free()
        wait_until(lambda: driver_of(self.busid) == "usb", CLEAN_TIMEOUT, "back on usb")
        wait_until(
            lambda: self.busid not in match_busids(), CLEAN_TIMEOUT, "busid out of match_busid"
        )

    # -- one round ------------------------------------------------------------------------

    def run_round(self, variant: str, index: int) -> Round:
        rnd = Round(variant, index)
        self.check_clean(f"before {variant} round {index}")
        try:
            getattr(self, f"round_{variant}")(rnd)
        except BenchError as exc:
            rnd.error = str(exc)
            say(f"{variant} round {index}: ERROR {exc}")
            self.force_clean()
        finally:
            self.pause_daemon()
        self.check_clean(f"after {variant} round {index}")
        return rnd

    def _measure(self, variant: str) -> tuple[float, dict[str, float]]:
        assert self.meter is not None
        return self.meter.plug_and_measure(self.gadgets[variant], self.udc, self.busid)

    def round_daemon(self, rnd: Round) -> None:
        assert self.daemon is not None
        self.resume_daemon()
        self.quiet()
        seen = len(self.daemon.log)
        t0, rnd.marks = self._measure("daemon")
        for t, line in self.daemon.log[seen:]:
            if "plugged in: " + self.busid in line and "decided" not in rnd.notes:
                rnd.notes["decided"] = round(t - t0, 4)
            if "hotplug.export: exported " in line and "logged_exported" not in rnd.notes:
                rnd.notes["logged_exported"] = round(t - t0, 4)
            if "waiting for the kernel to configure it" in line:
                rnd.notes["settling"] = True
        # Clean-up: a policy that matches nothing, reloaded: the daemon withdraws
        # the export and gives the device back to usb-storage; then unplug. Not
        # "unplug while exported": on 6.1 usbip-host then keeps the busid in
        # match_busid (`del` is a no-op once the device is gone), a state that
        # could change how the next plug at that port is probed.
        t = now()
        self.reload_daemon(OFF_PREFIX)
        self.wait_home()
        rnd.notes["withdraw_s"] = round(now() - t, 2)
        self.gadgets["daemon"].unplug(timeout=CLEAN_TIMEOUT)
        self.reload_daemon(SERIAL_PREFIX["daemon"])
        self.quiet()  # the daemon has seen the unplug before it is frozen

    def round_udev(self, rnd: Round) -> None:
        assert self.meter is not None
        self.quiet()
        script = ATTACH_LOOP.format(
            tries=int(self.args.round_timeout) + 5, usbip=self.usbip, busid=self.busid
        )
        loop = Child.start("attach-loop", ["/bin/sh", "-c", script])
        try:
            # The loop runs from before the plug, at a phase the plug does not
            # know: spread over the loop's second (stratified, not random, so
            # that a few rounds already average over the phase).
            t_fail, _ = loop.expect(lambda s: s.startswith("try 1 "), 30, "first attach try")
            phase = ((max(rnd.index, 0) + 0.5) / self.args.rounds) % 1.0
            time.sleep(max(0.0, t_fail + phase - now()))
            rnd.notes["loop_phase_s"] = round(phase, 3)
            _, rnd.marks = self._measure("udev")
            _, line = loop.expect(lambda s: s.startswith("attached"), 30, "the loop's success")
            rnd.notes["attach_tries"] = int(line.rsplit(" ", 1)[1])
            # Clean-up, as by hand: detach, unbind (back on its driver), unplug.
            port = self.meter.vhci.used()
            if port is not None:
                run([self.usbip, "detach", "-p", str(port[0])])
            self.wait_ports_free()
            run([self.usbip, "unbind", "-b", self.busid])
            self.wait_home()
            self.gadgets["udev"].unplug(timeout=CLEAN_TIMEOUT)
        finally:
            loop.stop(5)

    def round_floor(self, rnd: Round) -> None:
        floor = self.floor
        assert floor is not None
        self.quiet()
        floor.send("arm")
        floor.expect(lambda s: s == "armed", 30, "armed")
        t0, rnd.marks = self._measure("floor")
        _, line = floor.expect(lambda s: s.startswith("{"), 30, "its export report")
        report = json.loads(line)
        if report.get("error"):
            raise BenchError(f"floor exporter: {report['error']}")
        rnd.notes["floor_seen"] = round(report["seen"] - t0, 4)
        rnd.notes["floor_exported"] = round(report["exported"] - t0, 4)
        rnd.notes["floor_tries"] = report["tries"]
        if report["errors"]:
            rnd.notes["floor_errors"] = report["errors"]
        # Clean-up: withdraw (usbipa detaches, the device goes back to usb), unplug.
        floor.send("release")
        floor.expect(lambda s: s == "released", 60, "released")
        self.wait_home()
        self.gadgets["floor"].unplug(timeout=CLEAN_TIMEOUT)

    def force_clean(self) -> None:
        """After a failed round (or a previous session): undo whatever is left."""
        from hotplug.kernel.stub import UsbipHost

        assert self.meter is not None
        stub = UsbipHost()
        if self.daemon is not None:
            self.resume_daemon()
            with contextlib.suppress(BenchError):
                self.reload_daemon(OFF_PREFIX)
        for port in self.meter.vhci.busy():
            run([self.usbip, "detach", "-p", str(port)], check=False)
        for busid in stub_bound():
            with contextlib.suppress(Exception):
                stub.release(busid)
        for g in self.gadgets.values():
            with contextlib.suppress(Exception):
                g.unplug(timeout=CLEAN_TIMEOUT)
        if self.busid in match_busids():
            # Left by an unplug while exported: `del` does not drop it once the
            # device is gone. Plug a gadget there, bind it to usbip-host and
            # release it: unbind + rebind drops the busid for real.
            g = next(iter(self.gadgets.values()))
            try:
                g.plug(self.udc)
                wait_until(lambda: driver_of(self.busid) == "usb", 60, f"{self.busid} on usb")
                stub.bind(self.busid)
                stub.release(self.busid)
                wait_until(lambda: driver_of(self.busid) == "usb", 60, "back on usb")
            except Exception as exc:
                say(f"could not clear {self.busid} from match_busid: {exc}")
            with contextlib.suppress(Exception):
                g.unplug(timeout=CLEAN_TIMEOUT)
        with contextlib.suppress(BenchError):
            self.wait_ports_free()
        if self.daemon is not None:
            with contextlib.suppress(BenchError):
                self.reload_daemon(SERIAL_PREFIX["daemon"])


# --------------------------------------------------------------------------- main


def schedule(variants: list[str], rounds: int, warmup: int) -> Iterator[tuple[str, int]]:
    """Warm-up rounds (index -1), then `rounds` of each variant, the order rotating."""
    for _ in range(warmup):
        for v in variants:
            yield v, -1
    for r in range(rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            yield v, r


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench_main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        sys.exit("bench.vm_compare_guest: run as root inside the test VM (bench.vm_compare)")
    bench = Bench(args)
    rounds: list[Round] = []
    fatal: str | None = None
    t_start = now()
    loads = [loadavg()]
    try:
        bench.setup()
        for variant, index in schedule(args.variants, args.rounds, args.warmup):
            if now() - t_start > args.budget:
                fatal = f"time budget of {args.budget:.0f} s used up; stopped early"
                say(fatal)
                break
            rnd = bench.run_round(variant, index)
            rounds.append(rnd)
            label = "warm-up" if index < 0 else f"round {index + 1}/{args.rounds}"
            shown = " ".join(f"{m}={rnd.marks[m]:.3f}" for m in MARKS if m in rnd.marks)
            error = f" ERROR {rnd.error}" if rnd.error else ""
            say(f"{variant:6} {label}: {shown} {rnd.notes}{error}")
            loads.append(loadavg())
    except BenchError as exc:
        fatal = str(exc)
        say(f"FATAL: {exc}")
    finally:
        bench.teardown()
    result = {
        "info": bench.info,
        "interval_s": args.interval,
        "guest_loadavg": loads,
        "rounds": [
            {"variant": r.variant, "round": r.index, "marks": r.marks, "notes": r.notes,
             "error": r.error}
            for r in rounds
        ],
        "fatal": fatal,
    }  # fmt: skip
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0 if fatal is None and all(r.error is None for r in rounds) else 1


# --------------------------------------------------------------------------- the floor exporter


def floor_main(args: argparse.Namespace) -> int:
    """The floor: an exporter that is already running, reacting to sysfs itself.

    stdin commands: `arm` (note the devices present now, then poll until a new
    one with the serial prefix appears, export it, print a JSON report),
    `release` (unexport it: usbipa detaches, the device goes back to its driver).
    """
    from hotplug.device.export import ExportError, export, unexport
    from hotplug.device.transport import Remote
    from hotplug.kernel.stub import UsbipHost
    from hotplug.kernel.sysfs import KernelError
    from hotplug.wire.address import parse_endpoint
    from hotplug.wire.sockets import Timeouts

    stub = UsbipHost()
    endpoint = parse_endpoint(args.target)
    timeouts = Timeouts()
    exported: str | None = None
    print("ready", flush=True)
    for raw in sys.stdin:
        cmd = raw.strip()
        if cmd == "arm":
            before = set(os.listdir(SYS_USB))
            print("armed", flush=True)
            report: dict[str, Any] = {"tries": 0, "errors": []}
            deadline = now() + args.timeout
            busid = None
            while busid is None and now() < deadline:
                for name in os.listdir(SYS_USB):
                    if name in before or ":" in name:
                        continue
                    serial = read(SYS_USB / name / "serial") or ""
                    if serial.startswith(args.serial_prefix):
                        busid = name
                        break
                else:
                    time.sleep(FLOOR_POLL)
            if busid is None:
                report["error"] = "the device never showed up"
            else:
                report["seen"] = now()
                while now() < deadline:
                    report["tries"] += 1
                    try:
                        export(stub, busid, Remote.plain(endpoint, timeouts))
                    except (KernelError, ExportError) as exc:
                        # e.g. caught mid-probe: the bind loses the race; try again at once
                        report["errors"].append(str(exc))
                        time.sleep(FLOOR_POLL)
                        continue
                    report["exported"] = now()
                    exported = busid
                    break
                else:
                    report["error"] = f"export failed: {report['errors'][-1:]}"
            print(json.dumps(report), flush=True)
        elif cmd == "release" and exported is not None:
            unexport(stub, exported, Remote.plain(endpoint, timeouts))
            exported = None
            print("released", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vm_compare_guest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per variant (5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds per variant first (1)")
    p.add_argument(
        "--variants",
        type=lambda s: [v for v in s.split(",") if v],
        default=list(VARIANTS),
        help="comma-separated subset of daemon,udev,floor",
    )
    p.add_argument("--interval", type=float, default=0.005, help="sysfs poll interval (0.005 s)")
    p.add_argument("--round-timeout", type=float, default=60.0, help="plug to disk, at most (60 s)")
    p.add_argument("--quiet", type=float, default=1.0, help="calm before each plug (1 s)")
    p.add_argument("--budget", type=float, default=780.0, help="start no round after this (s)")
    p.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the daemon (experiments)",
    )
    p.add_argument("--floor-exporter", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", default=f"127.0.0.1:{USBIPA_PORT}", help=argparse.SUPPRESS)
    p.add_argument("--serial-prefix", default=SERIAL_PREFIX["floor"], help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.floor_exporter:
        return floor_main(args)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
