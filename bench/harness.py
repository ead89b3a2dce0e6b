"""The rig shared by the benchmarks and the fault suite.

- `FakeKernel`: a fake sysfs tree and the process that plays the kernel behind
  it (hotplug.testing.fake_kernel). The device side and each application side get
  their own, as two machines have two kernels.
- `Usbipa`: the real `usbipa` as a child process on an ephemeral loopback
  port, configured by a YAML file, logging to a file, restartable on the
  same port and state directory.
- `HotplugDaemon`: the real `usbip-hotplug run`, fed device events through
  its test event source (a FIFO) instead of udev.
- `EchoServer`: the baseline peer (connect + 8 bytes each way).
- `DirWatch`: inotify on the fake vhci's status files, to time an attach
  the moment it happens.
- `ProcStats`: what a process costs, read from /proc (CPU seconds, context
  switches of all its threads, RSS, open fds).
- `summary`, `percentile`, `machine`: the figures printed by the benchmarks.

Nothing here sleeps to synchronise: waits poll a condition with a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from hotplug.kernel.sysfs import KernelError
from hotplug.kernel.vhci import PortState
from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice, FakeUsbipHost, FakeVhci
from hotplug.wire.address import Endpoint
from tests.helpers import NotifySocket, env_for, wait_for

__all__ = [
    "DirWatch",
    "EchoServer",
    "FakeKernel",
    "HotplugDaemon",
    "ProcStats",
    "Usbipa",
    "add_dir_option",
    "fd_count",
    "free_tcp_port",
    "machine",
    "percentile",
    "proc_stats",
    "raise_fd_limit",
    "scratch_dir",
    "summary",
    "time_ms",
    "wait_for",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcStats:
    cpu_seconds: float  # user + system
    ctxt_switches: int  # voluntary + involuntary, summed over all threads
    rss_kb: int
    hwm_kb: int  # peak RSS
    fds: int
    threads: int


def _status_fields(path: str) -> dict[str, str]:
    with open(path) as f:
        return dict(line.split(":", 1) for line in f if ":" in line)


def _kb(value: str) -> int:
    return int(value.split()[0])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_stats(pid: int) -> ProcStats:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After "pid (comm)": field 3 is fields[0]; utime is field 14, stime 15.
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    status = _status_fields(f"/proc/{pid}/status")
    switches = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            t = _status_fields(f"/proc/{pid}/task/{task}/status")
        except FileNotFoundError:
            continue  # the thread ended while we looked
        switches += int(t["voluntary_ctxt_switches"]) + int(t["nonvoluntary_ctxt_switches"])
    return ProcStats(
        cpu_seconds=cpu,
        ctxt_switches=switches,
        rss_kb=_kb(status["VmRSS"]),
        hwm_kb=_kb(status["VmHWM"]),
        fds=fd_count(pid),
        threads=int(status["Threads"]),
    )


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (inherited by children); return it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


# --------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": float(len(values)),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
        "mean": sum(values) / len(values) if values else float("nan"),
    }


def scratch_dir(prefix: str, base: str | None = None) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory for trees and state, in memory (/dev/shm) when possible.

    /run and sysfs are in memory on a real system; on a disk an fsync of a
    state record costs milliseconds that production does not pay.
    """
    if base is None and os.access("/dev/shm", os.W_OK):
        base = "/dev/shm"
    return tempfile.TemporaryDirectory(prefix=prefix, dir=base)


def add_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        metavar="PATH",
        help="where the fake trees and state go (default /dev/shm, in memory like /run)",
    )


def machine() -> str:
    """One line about where the figures come from, load included (the box may be shared)."""
    import platform

    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, load average {load}"
    )


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- fake kernel


class FakeKernel:
    """One machine's kernel: a fake sysfs tree plus its kernel process."""

    def __init__(
        self,
        root: Path,
        *,
        stub: bool = True,
        vhci: bool = True,
        vhci_controllers: int = 1,
        ports_per_hub: int = 15,  # USB_SS_MAXPORTS, as Debian 6.1 vhci_hcd
    ) -> None:
        self.tree = FakeTree(root, vhci_controllers=vhci_controllers, ports_per_hub=ports_per_hub)
        self.has_stub, self.has_vhci = stub, vhci
        self.tree.create(stub=stub, vhci=vhci)
        self.proc: subprocess.Popen[bytes] | None = None
        self._devnum = 1
        self._devnums: dict[str, tuple[int, int]] = {}  # busid -> (busnum, devnum) plugged

    def __enter__(self) -> FakeKernel:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.proc = self.tree.start_server()

    def terminate(self) -> None:
        """Ask the kernel process to stop, without waiting (see `stop`)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # in case a test paused it
            self.proc.terminate()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def reboot(self) -> None:
        """The machine restarts: its kernel drops every link it held, vhci starts empty,
        and what lived in /var/run (the `usbip port` records) is gone."""
        self.stop()
        shutil.rmtree(self.tree.paths.vhci_records, ignore_errors=True)
        self.tree.create(stub=self.has_stub, vhci=self.has_vhci)
        self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stub(self) -> FakeUsbipHost:
        return self.tree.stub()

    def vhci(self) -> FakeVhci:
        return self.tree.vhci()

    def plug(self, busid: str, vendor: int = 0x1D6B, product: int = 0x0104) -> int:
        """Add a device with a fresh devnum, as the kernel numbers each arrival anew
        (the next one not in use on its bus); returns the devnum."""
        busnum = int(busid.split("-")[0])
        taken = {d for b, d in self._devnums.values() if b == busnum}
        for _ in range(127):
            self._devnum = self._devnum % 127 + 1
            if self._devnum not in taken:
                break
        else:
            raise RuntimeError(f"bus {busnum} is full")
        self.tree.add_device(
            FakeUsbDevice(busid=busid, vendor=vendor, product=product, serial=f"S{busid}"),
            devnum=self._devnum,
        )
        self._devnums[busid] = (busnum, self._devnum)
        return self._devnum

    def devid(self, busid: str) -> int:
        """busnum << 16 | devnum of the device plugged at `busid` now."""
        busnum, devnum = self._devnums[busid]
        return (busnum << 16) | devnum

    def unplug(self, busid: str) -> None:
        self.tree.remove_device(busid)
        self._devnums.pop(busid, None)

    def used_ports(self) -> list[int]:
        return [p.port for p in self.vhci().ports() if p.state == PortState.USED]

    def used_devids(self) -> set[int]:
        """The devids (busnum << 16 | devnum, as the device side sent them) attached now."""
        return {p.devid for p in self.vhci().ports() if p.state == PortState.USED}

    def driver(self, busid: str) -> str | None:
        try:
            return os.path.basename(os.readlink(self.tree.paths.usb_devices / busid / "driver"))
        except OSError:
            return None

    def stub_status(self, busid: str) -> str | None:
        path = self.tree.paths.usb_devices / busid / "usbip_status"
        try:
            return path.read_text().strip()
        except OSError:
            return None

    def match_table(self) -> list[str]:
        return (self.tree.paths.stub_driver / "match_busid").read_text().split()

    def live_match_table(self) -> list[str]:
        """usbip-host's entries for devices still plugged in: the ones that can leak.

        The kernel keeps the entry of a device unplugged while bound, whatever we
        write (Debian's 6.1, seen in the VM; the fake does the same).
        """
        devices = self.tree.paths.usb_devices
        return [busid for busid in self.match_table() if (devices / busid).exists()]


# --------------------------------------------------------------------------- usbipa


def _text_proc(proc: subprocess.Popen[bytes]) -> subprocess.Popen[str]:
    """For NotifySocket.wait, which only polls it (its output goes to a log file)."""
    return cast("subprocess.Popen[str]", proc)


class Usbipa:
    """The real usbipa as a child process, listening on 127.0.0.1.

    `config` is written as usbipa.yaml (limits, allow, ...); the listen
    address, port and state directory come from the command line. A restart
    reuses the port and the state directory, as systemd would.
    """

    def __init__(
        self,
        kernel: FakeKernel,
        workdir: Path,
        config: dict[str, Any] | None = None,
        port: int = 0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.kernel = kernel
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = {"allow": [{"from": "127.0.0.0/8"}], **(config or {})}
        self.config_path = workdir / "usbipa.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.state_dir = workdir / "state"
        self.log_path = workdir / "usbipa.log"
        self.port = port
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def __enter__(self) -> Usbipa:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "hotplug.app.cli",
            "-c",
            str(self.config_path),
            "--listen",
            "127.0.0.1",
            "-t",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
        ]

    def start(self, timeout: float = 15.0) -> None:
        notify = NotifySocket(self.workdir)
        try:
            env = env_for(self.kernel.tree, self.workdir, NOTIFY_SOCKET=str(notify.path))
            env.update(self.extra_env)
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(self.command(), env=env, stderr=log)
            self.starts += 1
            try:
                ready = notify.wait("READY", timeout=timeout, proc=_text_proc(self.proc))
            except AssertionError:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"usbipa did not start; its log:\n{self.log()}") from None
            self.port = int(ready["STATUS"].rsplit(":", 1)[1])
        finally:
            notify.close()
            notify.path.unlink(missing_ok=True)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit status (None if it was not running)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                return proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a crash or the OOM killer."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.kill()
        proc.wait()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> ProcStats:
        return proc_stats(self.pid)

    def fds(self) -> int:
        return fd_count(self.pid)

    def status_json(self) -> list[dict[str, Any]]:
        """`usbipa status --json`, as an operator would run it."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "hotplug.app.cli",
                "status",
                "--json",
                "--state-dir",
                str(self.state_dir),
            ],
            env=env_for(self.kernel.tree, self.workdir),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise AssertionError(f"usbipa status failed: {result.stderr}")
        rows: list[dict[str, Any]] = json.loads(result.stdout)
        return rows

    def session_records(self) -> list[str]:
        """The port records usbipa keeps under its state directory."""
        try:
            return sorted(p.name for p in (self.state_dir / "ports").glob("*.json"))
        except NotADirectoryError:
            return []


# --------------------------------------------------------------------------- usbip-hotplug run


class HotplugDaemon:
    """The real `usbip-hotplug run` as a child process, fed device events through its
    test event source (a FIFO of JSON lines) instead of udev.

    Its state directory (control socket, export records) is `workdir/device`.
    `module` may be "bench.probe" to run it with timing probes.
    """

    def __init__(
        self,
        kernel: FakeKernel,
        workdir: Path,
        policy: str,
        args: tuple[str, ...] = (),
        module: str = "hotplug.device.cli",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.kernel = kernel
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.policy_path = workdir / "policy.yaml"
        self.policy_path.write_text(policy)
        self.fifo = workdir / "events"
        self.log_path = workdir / "daemon.log"
        self.state_dir = workdir / "device"
        self.args = args
        self.module = module
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HotplugDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> None:
        notify = NotifySocket(self.workdir)
        try:
            env = env_for(self.kernel.tree, self.workdir, NOTIFY_SOCKET=str(notify.path))
            env.update(self.extra_env)
            cmd = [sys.executable, "-m", self.module, "run", "-c", str(self.policy_path)]
            cmd += ["--events", str(self.fifo), *self.args]
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(cmd, env=env, stderr=log, stdout=log)
            try:
                notify.wait("READY", timeout=timeout, proc=_text_proc(self.proc))
            except AssertionError:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the daemon did not start; its log:\n{self.log()}") from None
        finally:
            # Closed after READY: an unread notify socket would fill up and block
            # the daemon's STATUS updates. Without it, sd_notify is a no-op.
            notify.close()
            notify.path.unlink(missing_ok=True)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def kill(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.kill()
        proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def events(self, *events: tuple[str, str]) -> None:
        """Send (action, busid) events in one write, as a burst from udev."""
        data = b"".join(
            json.dumps({"action": action, "busid": busid}).encode() + b"\n"
            for action, busid in events
        )
        fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    select.select([], [fd], [], 1.0)  # the FIFO is full: the daemon reads on
        finally:
            os.close(fd)

    def plug(self, busid: str, vendor: int = 0x1D6B, product: int = 0x0104) -> int:
        devnum = self.kernel.plug(busid, vendor, product)
        self.events(("add", busid))
        return devnum

    def unplug(self, busid: str) -> None:
        self.kernel.unplug(busid)
        self.events(("remove", busid))

    def status(self) -> dict[str, Any]:
        """The running daemon's `status --json` reply, over its control socket."""
        from hotplug.device.control import request, socket_path

        return request(socket_path(self.state_dir), {"command": "status"})

    def records(self) -> list[str]:
        """Busids the daemon keeps an export record for."""
        return sorted(p.stem for p in (self.state_dir / "exports").glob("*.json"))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> ProcStats:
        return proc_stats(self.pid)

    def fds(self) -> int:
        return fd_count(self.pid)


# --------------------------------------------------------------------------- watching files


class DirWatch:
    """Wakes when a file in one of `directories` is rewritten (inotify IN_CLOSE_WRITE), so a
    benchmark sees a fake-kernel status change the moment it happens, without polling."""

    IN_CLOSE_WRITE = 0x08
    IN_MOVED_TO = 0x80

    def __init__(self, *directories: Path) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        mask = self.IN_CLOSE_WRITE | self.IN_MOVED_TO
        for directory in directories:
            if libc.inotify_add_watch(self.fd, os.fsencode(directory), mask) < 0:
                os.close(self.fd)
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory} failed")

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 65536):
                pass

    def pause(self, timeout: float) -> bool:
        """Wait until some file changes or `timeout` passes; True if one changed."""
        readable, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        self._drain()
        return bool(readable)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> int:
        """CLOCK_MONOTONIC ns at which `predicate` was first seen true."""
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            try:
                if predicate():
                    return time.monotonic_ns()
            except (OSError, ValueError, KernelError):
                pass  # caught the file half-written: its close wakes us again
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            select.select([self.fd], [], [], remaining)


# --------------------------------------------------------------------------- baseline


class EchoServer:
    """bench.echo_server in a child process: the baseline peer (8 bytes in, 8 out)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.echo_server"], stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exchange(self) -> None:
        """One bare TCP connect + 8-byte request + 8-byte reply, as a client would."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"\x01\x11\x80\x06\x00\x00\x00\x00")
            got = b""
            while len(got) < 8:
                chunk = sock.recv(8 - len(got))
                if not chunk:
                    raise ConnectionError("echo server closed early")
                got += chunk


def time_ms(start: float) -> float:
    """Milliseconds since `start` (a time.perf_counter() reading)."""
    return (time.perf_counter() - start) * 1000.0
