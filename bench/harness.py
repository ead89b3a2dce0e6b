"""What the benchmarks measure with, beside the rig they start things with.

The programs and the fake kernel are started by tests/rig.py, the one place
that does it for tests and benchmarks alike (FakeKernel, Usbipa,
HotplugDaemon, ProcStats and proc_stats are re-exported here for the
benchmarks' convenience). This module adds the figures:

- `EchoServer`: the baseline peer (connect + 8 bytes each way).
- `DirWatch`: inotify on the fake vhci's status files, to time an attach
  the moment it happens.
- `summary`, `percentile`, `machine`: the figures printed by the benchmarks.
- `scratch_dir`: where a run's trees and state go.

The arrow points one way: bench/ imports tests/, and no test imports bench/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hotplug.kernel.sysfs import KernelError
from tests.helpers import wait_for
from tests.rig import (
    FakeKernel,
    HotplugDaemon,
    ProcStats,
    Usbipa,
    fd_count,
    free_tcp_port,
    proc_stats,
    raise_fd_limit,
)

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


# --------------------------------------------------------------------------- /proc


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


# --------------------------------------------------------------------------- fake kernel


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
