"""Boot a throw-away QEMU guest with Debian's stock kernel and run commands in it.

The host side of the test VM (kernels.py fetches the kernel, agent.py is what
runs inside).

The guest gives tests real USB/IP drivers (usbip-host, vhci-hcd, usbip-vudc),
dummy_hcd and configfs gadgets, without touching the host's kernel.

How it works
------------
* `ensure_kernel()` downloads Debian's `linux-image-<release>` package once
  (`apt-get download`), unpacks it with `dpkg-deb -x` and runs `depmod` on the
  unpacked tree, into `<cache>/kernel-<release>` where `<cache>` is
  `${USBIP_HOTPLUG_CACHE:-${XDG_CACHE_HOME:-~/.cache}/usbip-hotplug}`.
  Later runs use the cached tree and need no network.
* `GuestVM` boots that kernel with virtme-ng's `virtme-run` (QEMU): the host's
  root filesystem is shared read-only into the guest (writes land in per-guest
  overlays; /tmp and /run are the guest's own), so the guest runs this checkout
  with the host's Python and packages. The host's root is shared a second time
  with 9p `cache=loose`, which a small boot script bind-mounts over the Python
  installation and the project before the agent starts: Python then starts
  about ten times faster under emulation.
* Inside the guest the boot command is a small agent (`python -m
  hotplug.testing.vm.agent`) that talks JSON lines over the guest's
  stdin/stdout (virtio-serial ports wired to virtme-run's stdin/stdout). The host
  asks it to run commands (several at once if needed) and to read or write
  files; it streams the commands' output back line by line. One boot serves
  any number of commands; leaving the context manager powers the guest off.
* QEMU also gets a `qemu-xhci` controller and what its device models need
  (qemu_usb.py), a QMP socket (`GuestVM.qmp`), and an exchange directory of
  this guest's own, shared read-only at `/run/usbip-vm/exchange`, through
  which in-guest tests get the replies to their QMP requests (qmp.py).

KVM is used when it works: `USBIP_VM_KVM=auto` (default) tries a KVM boot with a
short deadline and falls back to emulation (TCG), remembering a failed probe per
host kernel and QEMU binary in the cache dir so it is paid once; `1` forces KVM,
`0` forces emulation.

This module uses only the standard library so that it can run as the in-guest
agent with `python -S` (no site-packages: faster start).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import hotplug
from hotplug.testing.vm import qemu_usb
from hotplug.testing.vm.agent import FRAME_MARK
from hotplug.testing.vm.kernels import (
    KVM_PROBE_TIMEOUT,
    Kernel,
    OutputFn,
    VMBootError,
    VMError,
    _kvm_known_broken,
    _kvm_probe_file,
    _kvm_record,
    _stderr_line,
    _which,
    cache_dir,
    check_host,
    ensure_kernel,
    kvm_setting,
)
from hotplug.testing.vm.qmp import GUEST_EXCHANGE, REPLIES, QmpChannel, QmpClient

DEFAULT_MEMORY = "1536M"
DEFAULT_CPUS = 2
# Emulated boot of Debian's kernel to a running agent takes 10-20 s on two
# busy cores; leave room for slow CI machines.
BOOT_TIMEOUT = 240.0
# A working KVM guest reaches the agent in a few seconds.
SHUTDOWN_TIMEOUT = 30.0
# Modules udev's coldplug would load that the tests never need. Under
# emulation each costs time (loaded over 9p; the crypto ones run self-tests,
# kvm_amd because the emulated CPU advertises SVM): together ~5-10 s of boot.
# This only stops loading by alias (udev); an explicit `modprobe` still works.
_GUEST_SKIP_MODULES = (
    "kvm,kvm_amd,kvm_intel,ccp,irqbypass,"
    "ahci,libahci,libata,sr_mod,cdrom,"  # QEMU q35's SATA controller and DVD drive
    "iTCO_wdt,iTCO_vendor_support,intel_pmc_bxt,lpc_ich,i2c_i801,i2c_smbus,"
    "pcspkr,psmouse,serio_raw,powernow_k8,acpi_cpufreq,"
    "aesni_intel,ghash_clmulni_intel,polyval_clmulni,sha1_ssse3,sha256_ssse3,sha512_ssse3,"
    "crc32_pclmul,crct10dif_pclmul,crc32c_intel"
)
GUEST_KERNEL_OPTIONS = (
    f"modprobe.blacklist={_GUEST_SKIP_MODULES}",
    # Freed objects of the kmalloc caches that hold a struct usb_device are
    # poisoned: a use after free of a device (usbip-host's `rebind` on an unplugged
    # one, issue 11) oopses at once instead of passing quietly (seen: without it the
    # same write "succeeded"). Not every cache: with all of them poisoned, 6.1's
    # usbip-host itself oopses now and then in stub_rx_loop on a freed stub_priv
    # during ordinary data transfer (docs/PROTOCOL.md), which no test of ours causes.
    # USBIP_VM_SLUB_DEBUG overrides it ("P" poisons everything, "-" nothing).
    "slub_debug=" + (os.environ.get("USBIP_VM_SLUB_DEBUG") or "P,kmalloc-1k,kmalloc-2k,kmalloc-4k"),
    # Errors, warnings and notices reach the serial console, which the host reads
    # whatever state the guest is in: oopses, WARNINGs and the tests' own markers
    # (tests/vm/conftest.py). Later on the command line than virtme's loglevel=1.
    "loglevel=6",
)
# The directories virtme-ng gives the guest as writable overlays (as `vng` does).
GUEST_OVERLAY_DIRS = ("/etc", "/lib", "/home", "/opt", "/srv", "/usr", "/var", "/tmp")
# Second share of the host root, mounted with cache=loose in the guest.
HOSTFS_TAG = "usbipvm_hostfs"
HOSTFS_MOUNT = "/run/usbip-vm/hostfs"
# A host directory of this guest's own, shared read-only (and uncached) with it:
# the replies of the QMP channel, the files QEMU's USB devices write (qmp.py).
EXCHANGE_TAG = "usbipvm_xchg"


class GuestCommandError(VMError):
    """A guest command failed (raised by `check=True`)."""

    def __init__(self, result: GuestResult) -> None:
        self.result = result
        what = "timed out" if result.timed_out else f"exited with {result.returncode}"
        tail = (result.stderr or result.stdout)[-2000:]
        super().__init__(f"guest command {shlex.join(result.argv)} {what}\n{tail}")


# ---------------------------------------------------------------------------
# host side of the guest


@dataclass
class GuestResult:
    """Outcome of one guest command."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass
class GuestProcess:
    """A command running in the guest (see `GuestVM.start`)."""

    vm: GuestVM
    id: int
    argv: list[str]
    timeout: float
    echo: OutputFn | None
    started: float = field(default_factory=time.monotonic)
    _out: list[str] = field(default_factory=list)
    _err: list[str] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    _rc: int = -1
    _timed_out: bool = False
    _error: str | None = None
    _ended: float = 0.0

    def _feed(self, msg: Mapping[str, Any]) -> None:
        op = msg.get("op")
        if op == "out":
            text = str(msg.get("text", ""))
            (self._err if msg.get("fd") == 2 else self._out).append(text)
            if self.echo is not None:
                self.echo(text.rstrip("\n"))
        elif op == "exit":
            self._rc = int(msg.get("rc", -1))
            self._timed_out = bool(msg.get("timed_out", False))
            self._error = msg.get("error")
            self._ended = time.monotonic()
            self._done.set()

    def _abort(self, reason: str) -> None:
        if not self._done.is_set():
            self._error = reason
            self._rc = -1
            self._ended = time.monotonic()
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def kill(self) -> None:
        """Kill the command's whole process group in the guest."""
        if not self._done.is_set():
            self.vm._send({"op": "kill", "target": self.id})

    def wait(self, timeout: float | None = None, *, check: bool = False) -> GuestResult:
        """Wait for the command; the guest kills it at its own timeout.

        `timeout` bounds this wait only (default: the command's timeout plus a
        margin); if it passes, the command is killed and `VMError` raised.
        """
        limit = self.timeout + 30.0 if timeout is None else timeout
        if not self._done.wait(limit):
            self.kill()
            if not self._done.wait(10.0):
                raise VMError(
                    f"guest command {shlex.join(self.argv)} gave no answer for {limit:.0f}s"
                )
        if self._error and self._rc == -1 and not self._timed_out:
            raise VMError(f"guest command {shlex.join(self.argv)}: {self._error}")
        result = GuestResult(
            argv=self.argv,
            returncode=self._rc,
            stdout="".join(self._out),
            stderr="".join(self._err),
            duration=self._ended - self.started,
            timed_out=self._timed_out,
        )
        if self._error:
            result.stderr += f"\n[agent] {self._error}\n"
        if check and not result.ok:
            raise GuestCommandError(result)
        return result


def project_root() -> Path:
    """The directory holding the `hotplug` package this module came from."""
    return Path(hotplug.__file__).resolve().parent.parent


class GuestVM:
    """One QEMU guest running Debian's kernel; a context manager.

    >>> with GuestVM() as vm:                       # doctest: +SKIP
    ...     vm.run(["modprobe", "vhci-hcd"], timeout=30, check=True)
    ...     print(vm.run("cat /sys/devices/platform/vhci_hcd.0/status", timeout=10).stdout)

    Commands run as root in the guest, with cwd = the project root, and env
    `USBIP_IN_VM=1`, `PYTHONPATH=<project root>`, the host Python's bin dir
    first on `PATH`. Their output is echoed line by line through `output`
    (default: stderr) with `prefix`, unless `echo=False`.
    """

    def __init__(
        self,
        kernel: Kernel | None = None,
        *,
        memory: str | None = None,
        cpus: int | None = None,
        kvm: str | None = None,
        output: OutputFn | None = None,
        prefix: str = "[vm] ",
        cwd: str | Path | None = None,
        boot_timeout: float | None = None,
        console_log: str | Path | None = None,
        verbose: bool | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.kernel = kernel
        self.memory = memory or os.environ.get("USBIP_VM_MEMORY") or DEFAULT_MEMORY
        self.cpus = cpus or int(os.environ.get("USBIP_VM_CPUS") or DEFAULT_CPUS)
        self.kvm = kvm if kvm is not None else kvm_setting()
        self.output: OutputFn = output or _stderr_line
        self.prefix = prefix
        self.cwd = str(cwd or project_root())
        self.boot_timeout = boot_timeout or float(
            os.environ.get("USBIP_VM_BOOT_TIMEOUT") or BOOT_TIMEOUT
        )
        self.verbose = (
            verbose if verbose is not None else os.environ.get("USBIP_VM_VERBOSE", "") == "1"
        )
        self.console_log_path = Path(console_log) if console_log else None
        self.extra_env = dict(env or {})
        self.accel: str | None = None  # "kvm" or "tcg" once booted
        self.boot_seconds: float | None = None
        self.notes: list[str] = []  # what happened while booting (fallbacks)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # the tables below; never held while blocking
        self._send_lock = threading.Lock()  # whole frames on the guest's stdin
        self._ids = itertools.count(1)
        self._procs: dict[int, GuestProcess] = {}
        self._replies: dict[int, tuple[threading.Event, list[Mapping[str, Any]]]] = {}
        self._hello = threading.Event()
        self._dead: str | None = None
        self._threads: list[threading.Thread] = []
        self._console_tail: collections.deque[str] = collections.deque(maxlen=80)
        self._console_file: IO[str] | None = None
        # Called with every console line (the guest kernel's log, QEMU's messages),
        # from the reader thread: keep them quick.
        self.console_watchers: list[OutputFn] = []
        self.guest_info: dict[str, Any] = {}
        self._boot_script: Path | None = None
        # QMP (qmp.py): the host's client and the channel in-guest tests use; the
        # exchange directory (`GUEST_EXCHANGE` in the guest) and QEMU's socket
        # are in a temporary directory of this guest's (`_workdir`).
        self._workdir: Path | None = None
        self.exchange: Path | None = None
        self.qmp: QmpClient | None = None
        self._qmp_channel: QmpChannel | None = None
        self._qemu_usb_opts: list[str] = []

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> GuestVM:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _say(self, text: str) -> None:
        self.output(f"{self.prefix}{text}")

    def start(self) -> None:
        """Boot the guest and wait for its agent (bounded)."""
        if self._proc is not None:
            raise VMError("this GuestVM is already started")
        check_host(usbip=False)
        if self.kernel is None:
            self.kernel = ensure_kernel(log=self._say)
        self._prepare_qmp()
        plans: list[tuple[str, float]]
        if self.kvm == "0":
            plans = [("tcg", self.boot_timeout)]
        elif self.kvm == "1":
            plans = [("kvm", self.boot_timeout)]
        elif not os.access("/dev/kvm", os.R_OK | os.W_OK):
            self.notes.append("no usable /dev/kvm: using emulation (TCG)")
            plans = [("tcg", self.boot_timeout)]
        elif (why := _kvm_known_broken()) is not None:
            self.notes.append(
                f"KVM failed on this host before ({why}); using emulation (TCG)."
                f" Delete {_kvm_probe_file()} or set USBIP_VM_KVM=1 to try again"
            )
            plans = [("tcg", self.boot_timeout)]
        else:
            probe = float(os.environ.get("USBIP_VM_KVM_PROBE_TIMEOUT") or KVM_PROBE_TIMEOUT)
            plans = [("kvm", probe), ("tcg", self.boot_timeout)]
        for note in self.notes:
            self._say(note)
        try:
            self._boot_plans(plans)
        finally:  # read once by the guest at boot; not needed after that
            if self._boot_script is not None:
                self._boot_script.unlink(missing_ok=True)
                self._boot_script = None

    def _prepare_qmp(self) -> None:
        """The exchange directory, QEMU's QMP socket, the channel that serves the
        guest's requests, and what QEMU's USB devices need on the host."""
        self._workdir = Path(tempfile.mkdtemp(prefix="usbip-vm-"))
        self.exchange = self._workdir / "exchange"
        self.exchange.mkdir()
        self._qemu_usb_opts = qemu_usb.host_setup(self.exchange)
        self.qmp = QmpClient(self._workdir / "qmp.sock")
        self._qmp_channel = QmpChannel(self.qmp, self.exchange / REPLIES, log=self._say)
        self.console_watchers.append(self._qmp_channel.feed)

    def _boot_plans(self, plans: Sequence[tuple[str, float]]) -> None:
        for i, (accel, timeout) in enumerate(plans):
            last = i == len(plans) - 1
            try:
                self._boot(accel, timeout)
            except VMBootError as e:
                if last:
                    raise
                detail = str(e).splitlines()[0]
                note = f"KVM guest did not come up ({detail}); falling back to emulation (TCG)"
                self.notes.append(note)
                self._say(note)
                _kvm_record(False, detail)
                continue
            if accel == "kvm" and self.kvm == "auto":
                _kvm_record(True, "booted")
            return

    def _write_boot_script(self) -> Path:
        """The guest's boot command, as a file on the shared root filesystem.

        virtme-run passes `--script-sh` on the kernel command line (2048 bytes
        in all), so the real work lives in this file. It mounts the cached 9p
        share over the Python installation and the project *before* Python
        starts, then execs the agent.
        """
        binds = _fast_paths([self.cwd, str(project_root())])
        q = shlex.quote
        opts = "trans=virtio,version=9p2000.L,access=any,msize=524288,cache=loose,ro"
        lines = [
            "#!/bin/sh",
            "# usbip-hotplug test VM: boot script for one guest (hotplug/testing/vm/guest.py)",
            f"mkdir -p {HOSTFS_MOUNT}",
            f"if mount -t 9p -o {opts} {HOSTFS_TAG} {HOSTFS_MOUNT}; then",
        ]
        for b in binds:
            lines.append(
                f"  mount --bind {q(HOSTFS_MOUNT + b)} {q(b)}"
                f" || echo 'usbip-vm: bind-mount of {b} failed' >&2"
            )
        lines += [
            "else",
            "  echo 'usbip-vm: cached 9p mount failed; Python will start slowly' >&2",
            "fi",
            f"mkdir -p {GUEST_EXCHANGE}",
            f"mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,ro {EXCHANGE_TAG}"
            f" {GUEST_EXCHANGE} || echo 'usbip-vm: no exchange directory: QMP will not work' >&2",
            "exec env "
            + shlex.join(
                [
                    f"PYTHONPATH={project_root()}",
                    "PYTHONDONTWRITEBYTECODE=1",
                    sys.executable,
                    "-S",
                    "-u",
                    "-m",
                    "hotplug.testing.vm.agent",
                    *(f"--fast-path={b}" for b in binds),
                ]
            ),
        ]
        rundir = cache_dir() / "run"
        rundir.mkdir(parents=True, exist_ok=True)
        for stale in rundir.glob("boot-*.sh"):  # left by killed sessions
            with contextlib.suppress(OSError, ValueError):
                pid = int(stale.stem.split("-")[1])
                if not os.path.exists(f"/proc/{pid}"):
                    stale.unlink()
        path = rundir / f"boot-{os.getpid()}-{id(self):x}.sh"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _base_env(self) -> dict[str, str]:
        bindir = os.path.dirname(sys.executable)
        env = {
            "PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(project_root()),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "USBIP_IN_VM": "1",
        }
        env.update(self.extra_env)
        return env

    def _command(self, accel: str) -> list[str]:
        assert self.kernel is not None
        virtme_run = _which(["virtme-run"], [os.path.dirname(sys.executable)]) or "virtme-run"
        cmd = [
            virtme_run,
            "--kimg",
            str(self.kernel.image),
            "--mods",
            "auto",
            "--name",
            "usbip-vm",
            "--memory",
            self.memory,
            "--cpus",
            str(self.cpus),
            "--force-9p",  # Debian 12's virtiofsd is not the one virtme-ng drives
            "--show-boot-console",
            "--cwd",
            self.cwd,
        ]
        if os.geteuid() != 0:
            cmd += ["--user", "root"]
        if accel == "tcg":
            cmd.append("--disable-kvm")
        if self.verbose:
            cmd.append("--verbose")
        for d in GUEST_OVERLAY_DIRS:
            cmd.append(f"--overlay-rwdir={d}")
        for opt in GUEST_KERNEL_OPTIONS:
            cmd.append(f"--kopt={opt}")
        cmd += ["--script-sh", f"exec /bin/sh {shlex.quote(str(self._boot_script))}"]
        cmd += [
            "--qemu-opts",
            "-fsdev",
            "local,id=usbipvmfs,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            f"virtio-9p-pci,fsdev=usbipvmfs,mount_tag={HOSTFS_TAG}",
        ]
        if self._workdir is not None and self.exchange is not None:
            cmd += [
                "-qmp",
                f"unix:{self._workdir / 'qmp.sock'},server=on,wait=off",
                "-fsdev",
                f"local,id=usbipvmxchg,path={self.exchange},security_model=none,readonly=on",
                "-device",
                f"virtio-9p-pci,fsdev=usbipvmxchg,mount_tag={EXCHANGE_TAG}",
                *self._qemu_usb_opts,
            ]
        return cmd

    def _boot(self, accel: str, timeout: float) -> None:
        if self._boot_script is None:
            self._boot_script = self._write_boot_script()
        cmd = self._command(accel)
        self._hello.clear()
        self._dead = None
        self._console_tail.clear()
        if self.console_log_path is not None:
            self.console_log_path.parent.mkdir(parents=True, exist_ok=True)
            self._console_file = open(self.console_log_path, "a", encoding="utf-8")  # noqa: SIM115
            self._console_file.write(f"=== {time.ctime()} {shlex.join(cmd)}\n")
        what = "KVM" if accel == "kvm" else "emulation (TCG)"
        assert self.kernel is not None
        self._say(
            f"booting {self.kernel.release} with {what}, {self.cpus} vCPUs, {self.memory}"
            f" (deadline {timeout:.0f}s)"
        )
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
            start_new_session=True,  # one process group to stop at the end
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, name="vm-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="vm-stderr", daemon=True),
        ]
        for t in self._threads:
            t.start()
        deadline = t0 + timeout
        while not self._hello.wait(0.2):
            if self._proc.poll() is not None or self._dead is not None:
                self._reap()
                raise VMBootError(
                    f"QEMU exited ({self._proc.returncode}) before the guest came up\n"
                    + self.console_tail()
                )
            if time.monotonic() > deadline:
                self._kill()
                raise VMBootError(f"guest not up within {timeout:.0f}s\n" + self.console_tail())
        self.accel = accel
        self.boot_seconds = time.monotonic() - t0
        self._say(
            f"guest up in {self.boot_seconds:.1f}s ({what}; kernel {self.guest_info.get('release')}"
            f" up {self.guest_info.get('uptime', -1):.1f}s when the agent started)"
        )

    def console_tail(self, lines: int = 40) -> str:
        """The last lines QEMU, virtme-run and the guest console printed."""
        return "\n".join(list(self._console_tail)[-lines:])

    def close(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Power the guest off (bounded); kill QEMU if it does not stop."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(VMError):
                    self._send({"op": "shutdown"})
                with contextlib.suppress(OSError):
                    assert proc.stdin is not None
                    proc.stdin.close()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._say(f"guest did not power off within {timeout:.0f}s; killing QEMU")
                    self._kill()
            self._reap()
            self._proc = None
        if self._qmp_channel is not None:
            with contextlib.suppress(ValueError):
                self.console_watchers.remove(self._qmp_channel.feed)
            self._qmp_channel.close()
            self._qmp_channel = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(5)
                return
            except subprocess.TimeoutExpired:
                continue

    def _reap(self) -> None:
        for t in self._threads:
            t.join(5)
        self._threads = []
        if self._console_file is not None:
            self._console_file.close()
            self._console_file = None
        self._mark_dead("the VM has stopped")

    def _mark_dead(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        with self._lock:
            procs = list(self._procs.values())
            replies = list(self._replies.values())
        for p in procs:
            p._abort(self._dead)
        for ev, _ in replies:
            ev.set()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._dead is None

    # -- I/O threads -------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith(FRAME_MARK):
                try:
                    msg = json.loads(line[len(FRAME_MARK) :])
                except ValueError:
                    self.output(f"{self.prefix}(bad frame) {line!r}")
                    continue
                self._dispatch(msg)
            elif line.strip():
                self.output(f"{self.prefix}{line}")
        self._mark_dead("the guest's output ended (VM stopped)")

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for raw in self._proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self._console_tail.append(line)
            if self._console_file is not None:
                self._console_file.write(line + "\n")
                self._console_file.flush()
            for watcher in list(self.console_watchers):
                with contextlib.suppress(Exception):
                    watcher(line)
            if self.verbose:
                self.output(f"{self.prefix}[console] {line}")

    def _dispatch(self, msg: Mapping[str, Any]) -> None:
        op = msg.get("op")
        if op == "hello":
            self.guest_info = dict(msg)
            for note in msg.get("notes", []):
                self._say(f"guest: {note}")
            self._hello.set()
            return
        rid = int(msg.get("id", 0))
        with self._lock:
            proc = self._procs.get(rid)
            reply = self._replies.get(rid)
        if proc is not None:
            proc._feed(msg)
            if proc.done:
                with self._lock:
                    self._procs.pop(rid, None)
        elif reply is not None:
            reply[1].append(msg)
            reply[0].set()

    def _send(self, msg: Mapping[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or self._dead is not None:
            raise VMError(f"the VM is not running ({self._dead or 'not started'})")
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        # Not self._lock: the stdout reader must never wait for a blocked write,
        # or QEMU (stuck writing our stdout) would stop reading our stdin.
        with self._send_lock:
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError) as e:
                raise VMError(f"the VM is not running ({e})") from e

    def _request(self, msg: dict[str, Any], timeout: float) -> Mapping[str, Any]:
        rid = next(self._ids)
        ev = threading.Event()
        box: list[Mapping[str, Any]] = []
        with self._lock:
            self._replies[rid] = (ev, box)
        try:
            self._send({**msg, "id": rid})
            if not ev.wait(timeout) or not box:
                raise VMError(
                    f"guest agent gave no answer to {msg.get('op')} within {timeout:.0f}s"
                    f" ({self._dead or 'VM running'})"
                )
        finally:
            with self._lock:
                self._replies.pop(rid, None)
        reply = box[0]
        if reply.get("op") == "error":
            raise VMError(f"guest {msg.get('op')} {msg.get('path', '')}: {reply.get('error')}")
        return reply

    # -- public API ---------------------------------------------------------

    def start_command(
        self,
        cmd: Sequence[str] | str,
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        echo: bool = True,
        prefix: str | None = None,
    ) -> GuestProcess:
        """Start `cmd` in the guest and return at once.

        `cmd` is an argv list, or a string run by `/bin/sh -c`. The guest kills
        the command's process group after `timeout` seconds.
        """
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        rid = next(self._ids)
        pfx = self.prefix if prefix is None else prefix
        out = self.output

        def echo_fn(line: str) -> None:
            out(f"{pfx}{line}")

        proc = GuestProcess(self, rid, argv, timeout, echo_fn if echo else None)
        with self._lock:
            self._procs[rid] = proc
        merged = self._base_env()
        merged.update(env or {})
        try:
            self._send(
                {
                    "op": "run",
                    "id": rid,
                    "argv": argv,
                    "env": merged,
                    "cwd": cwd or self.cwd,
                    "timeout": timeout,
                }
            )
        except VMError:
            with self._lock:
                self._procs.pop(rid, None)
            raise
        return proc

    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        check: bool = False,
        echo: bool = True,
        prefix: str | None = None,
    ) -> GuestResult:
        """Run `cmd` in the guest and wait for it (at most `timeout` seconds)."""
        proc = self.start_command(cmd, timeout=timeout, env=env, cwd=cwd, echo=echo, prefix=prefix)
        return proc.wait(check=check)

    def read_file(self, path: str, *, timeout: float = 60.0) -> bytes:
        """Contents of a file in the guest (e.g. its private /tmp)."""
        reply = self._request({"op": "read", "path": path}, timeout)
        return base64.b64decode(str(reply.get("data", "")))

    def write_file(
        self, path: str, data: bytes, *, mode: int = 0o644, timeout: float = 60.0
    ) -> None:
        """Create or replace a file in the guest."""
        self._request(
            {
                "op": "write",
                "path": path,
                "mode": mode,
                "data": base64.b64encode(data).decode("ascii"),
            },
            timeout,
        )


def _fast_paths(extra: Sequence[str]) -> list[str]:
    """Host directories to re-mount with 9p cache=loose in the guest.

    The Python installation(s) and the project: everything Python imports.
    Never system directories or ancestors of virtme's overlays (that would
    hide the guest's writable /usr, /etc, modules...).
    """
    system = ("/usr", "/etc", "/var", "/lib", "/proc", "/sys", "/dev", "/run", "/boot")
    picked: list[str] = []
    for p in [sys.base_prefix, sys.prefix, *extra]:
        rp = os.path.realpath(p)
        if rp == "/" or not os.path.isdir(rp):
            continue
        if any(rp == s or rp.startswith(s + "/") for s in system):
            continue
        if any(d == rp or d.startswith(rp + "/") for d in GUEST_OVERLAY_DIRS):
            continue
        picked.append(rp)
    picked = sorted(set(picked), key=len)
    out: list[str] = []
    for p in picked:
        if not any(p == q or p.startswith(q + "/") for q in out):
            out.append(p)
    return out
