"""The one place tests and benchmarks start our programs and the fake kernel.

- `command(program, *args)`: the argv of `usbip-hotplug` or `usbipa` from this
  checkout (`python -m hotplug.device.cli`, `python -m hotplug.app.cli`).
- `env_for(tree, state)`: their environment on a fake machine: its sysfs tree
  and kernel process, its own state directories, no journal, no systemd.
- `run_cli`, `run_usbipa`: a one-shot command, its output captured.
- `start_ready` / `stop`: a daemon started as systemd would (Type=notify),
  waited for until READY=1, and stopped with SIGTERM (SIGKILL if it hangs).
- `running_usbipa`: usbipa on an ephemeral loopback port for one block.
- `FakeKernel`: one machine's kernel: a fake sysfs tree plus the process that
  plays the kernel behind it (hotplug.testing.fake_kernel).
- `Usbipa`, `HotplugDaemon`: the real daemons as long-lived children,
  restartable, logging to a file (the fault suite and the benchmarks).
- `ProcStats`, `proc_stats`, `fd_count`: what such a child costs, from /proc;
  `raise_fd_limit`, `free_tcp_port`: the room many of them need.

Nothing here sleeps to synchronise: waits poll a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import yaml

from hotplug.kernel.vhci import PortState
from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice, FakeUsbipHost, FakeVhci
from hotplug.wire.address import Endpoint
from tests.helpers import NotifySocket

__all__ = [
    "FakeKernel",
    "HotplugDaemon",
    "ProcStats",
    "Usbipa",
    "command",
    "env_for",
    "fd_count",
    "free_tcp_port",
    "proc_stats",
    "raise_fd_limit",
    "run_cli",
    "run_program",
    "run_usbipa",
    "running_usbipa",
    "start_ready",
    "stop",
    "usbipa_process",
]

PROGRAMS = {"usbip-hotplug": "hotplug.device.cli", "usbipa": "hotplug.app.cli"}
# usbipa's READY status ends with its listeners: "1 attached; listening on
# 127.0.0.1:40123, tls://127.0.0.1:40124, wss://127.0.0.1:40125/usbip".
LISTENER_RE = re.compile(r"(?:(tls|wss)://)?[\d.]+:(\d+)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def command(program: str, *args: str) -> list[str]:
    """The argv that runs `program` (usbip-hotplug or usbipa) from this checkout."""
    return [sys.executable, "-m", PROGRAMS[program], *args]


def env_for(tree: FakeTree, state: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(tree.env())
    env["USBIP_HOTPLUG_STATE_DIR"] = str(state / "device")
    env["USBIPA_STATE_DIR"] = str(state / "app")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    env.update(extra)
    return env


def run_program(
    program: str,
    tree: FakeTree,
    state: Path,
    *args: str,
    timeout: float = 30,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`program ARGS` (usbip-hotplug or usbipa) on the fake machine, to its end,
    its output captured."""
    return subprocess.run(
        command(program, *args),
        env=env if env is not None else env_for(tree, state),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli(
    tree: FakeTree, state: Path, *args: str, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_program("usbip-hotplug", tree, state, *args, timeout=timeout, env=env)


def run_usbipa(
    tree: FakeTree, state: Path, *args: str, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """usbipa expected to exit by itself (`status`, a bad configuration)."""
    return run_program("usbipa", tree, state, *args, timeout=timeout, env=env)


def start_ready(
    argv: list[str],
    env: dict[str, str],
    workdir: Path,
    *,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
    timeout: float = 10.0,
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Start a daemon of ours with a notify socket in `workdir`, as systemd's
    Type=notify would, and wait for READY=1; returns (process, its READY message).

    The socket is closed once READY is in: an unread one would fill up and
    block the daemon's STATUS updates (without it, sd_notify does nothing).
    A daemon that exits first, or is not ready in time, is killed and its
    failure raised as an AssertionError.
    """
    notify = NotifySocket(workdir)
    try:
        env = {**env, "NOTIFY_SOCKET": str(notify.path)}
        proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, text=True)
        try:
            ready = notify.wait("READY", timeout=timeout, proc=proc)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    finally:
        notify.close()
        notify.path.unlink(missing_ok=True)
    return proc, ready


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM (after SIGCONT, in case a test paused it) and wait; SIGKILL if it hangs."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def listener_ports(status: str) -> dict[str, int]:
    """usbipa's ports by kind ("tcp", "tls", "wss"), from its READY status."""
    return {kind or "tcp": int(port) for kind, port in LISTENER_RE.findall(status)}


@contextmanager
def usbipa_process(
    env: dict[str, str], workdir: Path, *args: str, log: Path | None = None
) -> Iterator[tuple[subprocess.Popen[str], dict[str, int]]]:
    """usbipa listening on 127.0.0.1 (ephemeral ports unless `args` say otherwise)
    for one block; yields (process, its ports by kind: "tcp", "tls", "wss").

    Its log is proc.stderr, readable once the block is left; or, with `log`,
    that file (stdout too), written from the start.
    """
    argv = command("usbipa", "--listen", "127.0.0.1", "-t", "0", *args)
    if log is None:
        proc, ready = start_ready(argv, env, workdir, stderr=subprocess.PIPE)
    else:
        with log.open("w") as out:
            proc, ready = start_ready(argv, env, workdir, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, listener_ports(ready["STATUS"])
    finally:
        stop(proc)


@contextmanager
def running_usbipa(
    tree: FakeTree, state: Path, *args: str, allow: str = "127.0.0.0/8"
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The real usbipa on an ephemeral loopback port; yield (process, port)."""
    allowed = ("--allow", allow) if allow else ()
    with usbipa_process(env_for(tree, state), state, *allowed, *args) as (proc, ports):
        yield proc, ports["tcp"]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (inherited by children); return it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


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


class Child:
    """One of our daemons as a child process: the subclass starts it (`start`);
    stopping, killing, signalling, its log and what it costs are the same for all."""

    proc: subprocess.Popen[str] | None
    log_path: Path
    stop_timeout = 10.0  # SIGTERM, then this long before SIGKILL

    def start(self, timeout: float = 15.0) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM and wait; returns the exit status (None if it was not running)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        return stop(proc, self.stop_timeout if timeout is None else timeout)

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


class Usbipa(Child):
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
        self.proc = None
        self.starts = 0

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    def command(self) -> list[str]:
        return [
            *command("usbipa"),
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
        env = {**env_for(self.kernel.tree, self.workdir), **self.extra_env}
        try:
            with self.log_path.open("a") as log:
                self.proc, ready = start_ready(
                    self.command(), env, self.workdir, stderr=log, timeout=timeout
                )
        except AssertionError:
            raise AssertionError(f"usbipa did not start; its log:\n{self.log()}") from None
        self.starts += 1
        self.port = listener_ports(ready["STATUS"])["tcp"]

    def status_json(self) -> list[dict[str, Any]]:
        """`usbipa status --json`, as an operator would run it."""
        result = run_usbipa(
            self.kernel.tree, self.workdir, "status", "--json", "--state-dir", str(self.state_dir)
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


class HotplugDaemon(Child):
    """The real `usbip-hotplug run` as a child process, fed device events through its
    test event source (a FIFO of JSON lines) instead of udev.

    Its state directory (control socket, export records) is `workdir/device`.
    `module` may be "bench.probe" to run it with timing probes.
    """

    stop_timeout = 30.0  # its stop unexports every device first

    def __init__(
        self,
        kernel: FakeKernel,
        workdir: Path,
        policy: str,
        args: tuple[str, ...] = (),
        module: str = PROGRAMS["usbip-hotplug"],
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
        self.proc = None

    def start(self, timeout: float = 15.0) -> None:
        env = {**env_for(self.kernel.tree, self.workdir), **self.extra_env}
        cmd = [sys.executable, "-m", self.module, "run", "-c", str(self.policy_path)]
        cmd += ["--events", str(self.fifo), *self.args]
        try:
            with self.log_path.open("a") as log:
                self.proc, _ = start_ready(
                    cmd, env, self.workdir, stdout=log, stderr=log, timeout=timeout
                )
        except AssertionError:
            raise AssertionError(f"the daemon did not start; its log:\n{self.log()}") from None

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
