"""The host side of the test VM before it boots: host tools, Debian's kernel, KVM.

`check_host()` says which tools are missing (tests/vm/setup-host.sh installs
them). `ensure_kernel()` downloads Debian's `linux-image-<release>` package
once (`apt-get download`), unpacks it with `dpkg-deb -x` and runs `depmod` on
the unpacked tree, into `<cache>/kernel-<release>` where `<cache>` is
`${USBIP_HOTPLUG_CACHE:-${XDG_CACHE_HOME:-~/.cache}/usbip-hotplug}`. Later
runs use the cached tree and need no network. `kvm_setting()` and the probe
record decide whether a boot tries KVM (guest.py boots).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotplug.errors import HotplugError

KERNEL_META_PACKAGE = "linux-image-amd64"

OutputFn = Callable[[str], None]
# How long a KVM boot may take before we fall back to emulation (see GuestVM.start).
KVM_PROBE_TIMEOUT = 25.0


class VMError(HotplugError):
    """Something went wrong with the test VM."""


class MissingDependency(VMError):
    """A host tool or package the VM needs is not installed."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        lines = "\n".join(f"  - {m}" for m in self.missing)
        super().__init__(
            "the test VM cannot start, missing on this host:\n"
            f"{lines}\n(tests/vm/setup-host.sh installs all of it on Debian 12)"
        )


class VMBootError(VMError):
    """QEMU did not bring the guest up."""


# ---------------------------------------------------------------------------
# host checks


@dataclass(frozen=True)
class _Need:
    names: tuple[str, ...]  # any of these executables
    provider: str  # what to install
    dirs: tuple[str, ...] = ()  # extra dirs to look in (sbin, libexec)


_SBIN = ("/usr/sbin", "/sbin", "/usr/lib/systemd", "/lib/systemd")

_HOST_NEEDS: tuple[_Need, ...] = (
    _Need(("qemu-system-x86_64",), "Debian package qemu-system-x86"),
    _Need(
        ("virtme-run",),
        "Python package virtme-ng: pip install 'usbip-hotplug[vm]'",
        (os.path.dirname(sys.executable),),
    ),
    _Need(("busybox",), "Debian package busybox-static (virtme-ng's initramfs)", _SBIN),
    _Need(("file",), "Debian package file (virtme-ng reads the kernel version with it)"),
    _Need(("depmod",), "Debian package kmod", _SBIN),
    # Run by the guest from the shared root filesystem:
    _Need(("modprobe",), "Debian package kmod", _SBIN),
    _Need(("systemd-udevd", "udevd"), "Debian package udev", _SBIN),
    _Need(("mount",), "Debian package mount"),
)
_USBIP_NEEDS: tuple[_Need, ...] = (
    _Need(("usbip",), "Debian package usbip", _SBIN),
    _Need(("usbipd",), "Debian package usbip", _SBIN),
)
_DOWNLOAD_NEEDS: tuple[_Need, ...] = (
    _Need(("apt-get",), "Debian package apt (the kernel comes from Debian's archive)"),
    _Need(("apt-cache",), "Debian package apt"),
    _Need(("dpkg-deb",), "Debian package dpkg"),
    _Need(("depmod",), "Debian package kmod", _SBIN),
)


def _which(names: Sequence[str], dirs: Sequence[str] = ()) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for d in dirs:
            p = os.path.join(d, name)
            if os.access(p, os.X_OK):
                return p
    return None


def _is_static_elf(path: str) -> bool:
    """True unless the ELF file asks for a dynamic loader (PT_INTERP)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b"ld-linux" not in head and b"ld-musl" not in head


def _missing(needs: Sequence[_Need]) -> list[str]:
    out: list[str] = []
    for need in needs:
        path = _which(need.names, need.dirs)
        if path is None:
            out.append(f"{' or '.join(need.names)} ({need.provider})")
        elif need.names == ("busybox",) and not _is_static_elf(path):
            out.append(f"a statically linked busybox ({need.provider})")
    return list(dict.fromkeys(out))


def check_host(*, usbip: bool = True) -> None:
    """Raise `MissingDependency` naming everything the VM needs but lacks.

    `usbip=True` also requires the classic userspace tools (`usbip`,
    `usbipd`), used by the interop tests in the guest.
    """
    missing = _missing(_HOST_NEEDS + (_USBIP_NEEDS if usbip else ()))
    if missing:
        raise MissingDependency(missing)


# ---------------------------------------------------------------------------
# kernel cache


def cache_dir() -> Path:
    """`$USBIP_HOTPLUG_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/usbip-hotplug`."""
    explicit = os.environ.get("USBIP_HOTPLUG_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "usbip-hotplug"


@dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel package: image plus modules, depmod done."""

    release: str  # e.g. "6.1.0-56-amd64"
    root: Path  # the unpacked tree (boot/, lib/modules/<release>/)

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def info(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.root / _COMPLETE).read_text())
            return data
        except (OSError, ValueError):
            return {}


_COMPLETE = ".usbip-hotplug-complete"


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


def cached_kernels(base: Path | None = None) -> list[Kernel]:
    """Complete kernels in the cache, newest first."""
    base = base or cache_dir()
    found: list[Kernel] = []
    if base.is_dir():
        for d in base.glob("kernel-*"):
            if (d / _COMPLETE).is_file():
                k = Kernel(d.name.removeprefix("kernel-"), d)
                if k.image.is_file() and k.moddir.is_dir():
                    found.append(k)
    return sorted(found, key=lambda k: _release_key(k.release), reverse=True)


def _run_tool(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise VMError(f"{shlex.join(argv)} did not finish within {timeout:.0f}s") from e
    if proc.returncode != 0:
        raise VMError(
            f"{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def resolve_kernel_package() -> str:
    """Name of the kernel image package Debian's `linux-image-amd64` points at.

    `$USBIP_VM_KERNEL_PACKAGE` overrides it (e.g. `linux-image-6.1.0-56-amd64`).
    """
    pinned = os.environ.get("USBIP_VM_KERNEL_PACKAGE")
    if pinned:
        return pinned
    missing = _missing(_DOWNLOAD_NEEDS)
    if missing:
        raise MissingDependency(missing)
    out = _run_tool(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE], timeout=60)
    m = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,(]*)", out, re.MULTILINE)
    if not m:
        raise VMError(
            f"apt-cache does not know {KERNEL_META_PACKAGE} (or its Depends): run"
            " `apt-get update` first, or set USBIP_VM_KERNEL_PACKAGE"
        )
    return m.group(1)


def ensure_kernel(
    *, update: bool = False, package: str | None = None, log: OutputFn | None = None
) -> Kernel:
    """Return a ready kernel, downloading and unpacking it the first time.

    Without `update` (and without `package` / `$USBIP_VM_KERNEL_PACKAGE`) the
    newest cached kernel is used as is, so later runs need neither network
    nor apt. `update=True` asks apt which kernel is current and fetches it if
    it is not cached yet.
    """
    say = log or _stderr_line
    base = cache_dir()
    package = package or os.environ.get("USBIP_VM_KERNEL_PACKAGE")
    if not update and not package:
        cached = cached_kernels(base)
        if cached:
            return cached[0]
    package = package or resolve_kernel_package()
    release = package.removeprefix("linux-image-")
    for k in cached_kernels(base):
        if k.release == release:
            return k
    missing = _missing(_DOWNLOAD_NEEDS)
    if missing:
        raise MissingDependency(missing)
    base.mkdir(parents=True, exist_ok=True)
    dest = base / f"kernel-{release}"
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".kernel-{release}.", dir=base) as tmp_s:
        tmp = Path(tmp_s)
        say(f"usbip-hotplug vm: downloading {package} (Debian) into {base}")
        # As root apt wants to drop to the _apt user, who cannot write here.
        _run_tool(["apt-get", "download", "-o", "APT::Sandbox::User=root", package], cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise VMError(f"apt-get download {package} produced no .deb")
        tree = tmp / "tree"
        _run_tool(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        debs[0].unlink()
        shutil.rmtree(tree / "usr", ignore_errors=True)  # docs only
        k = Kernel(release, tree)
        if not k.image.is_file() or not k.moddir.is_dir():
            raise VMError(f"{package} has no boot/vmlinuz-{release} or lib/modules/{release}")
        depmod = _which(["depmod"], _SBIN) or "depmod"
        _run_tool([depmod, "-a", "-b", str(tree), release])
        info = {
            "package": package,
            "release": release,
            "deb": debs[0].name,
            "prepared": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tree / _COMPLETE).write_text(json.dumps(info, indent=1) + "\n")
        if dest.exists():  # an incomplete leftover, or a concurrent run won
            if (dest / _COMPLETE).is_file():
                return Kernel(release, dest)
            shutil.rmtree(dest)
        os.rename(tree, dest)
    say(f"usbip-hotplug vm: kernel {release} ready in {time.monotonic() - t0:.1f}s ({dest})")
    return Kernel(release, dest)


# ---------------------------------------------------------------------------
# KVM


def kvm_setting() -> str:
    """`USBIP_VM_KVM`: `auto` (default), `1` (force KVM) or `0` (emulation)."""
    value = os.environ.get("USBIP_VM_KVM", "auto").strip().lower() or "auto"
    aliases = {"yes": "1", "true": "1", "on": "1", "no": "0", "false": "0", "off": "0"}
    value = aliases.get(value, value)
    if value not in ("auto", "1", "0"):
        raise VMError(f"USBIP_VM_KVM must be auto, 1 or 0, not {value!r}")
    return value


def _kvm_probe_file() -> Path:
    return cache_dir() / "kvm-probe.json"


def _kvm_probe_key() -> str:
    qemu = _which(["qemu-system-x86_64"]) or "?"
    try:
        stamp = int(os.stat(qemu).st_mtime)
    except OSError:
        stamp = 0
    return f"{os.uname().release} {os.path.realpath(qemu)} {stamp}"


def _kvm_known_broken() -> str | None:
    try:
        data = json.loads(_kvm_probe_file().read_text())
    except (OSError, ValueError):
        return None
    if data.get("key") == _kvm_probe_key() and not data.get("ok", True):
        return str(data.get("detail", "KVM boot failed before"))
    return None


def _kvm_record(ok: bool, detail: str) -> None:
    with contextlib.suppress(OSError):
        _kvm_probe_file().parent.mkdir(parents=True, exist_ok=True)
        _kvm_probe_file().write_text(
            json.dumps({"key": _kvm_probe_key(), "ok": ok, "detail": detail}) + "\n"
        )


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
