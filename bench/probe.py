"""`usbip-hotplug` with timing probes: the daemon, unchanged, with timestamps taken
around the steps of each export, for bench.latency's daemon-level breakdown.

    BENCH_PROBE_OUT=marks.json python -m bench.probe run -c policy.yaml --events FIFO

Wraps (from outside, before the daemon starts) the functions the daemon
calls: reading an event, starting an operation, export(), bind, connect, the
handshake, the hand-over. Each stamp is CLOCK_MONOTONIC in nanoseconds, the
same clock as time.monotonic_ns() in the benchmark's process, so the two
sides' stamps can be compared. The stamps are written as JSON at exit
(SIGTERM; not after SIGKILL).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Mark = tuple[str, str, int]  # step, busid, CLOCK_MONOTONIC ns

MARKS: list[Mark] = []
_current = threading.local()  # the busid the export in this thread is for


def mark(step: str, busid: str) -> None:
    MARKS.append((step, busid, time.monotonic_ns()))


def _around(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Stamp `step-start` and `step-end` around calls made inside an export."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        busid = getattr(_current, "busid", None)
        if busid is None:
            return fn(*args, **kwargs)
        mark(f"{step}-start", busid)
        try:
            return fn(*args, **kwargs)
        finally:
            mark(f"{step}-end", busid)

    return wrapped


def install() -> None:
    import hotplug.device.daemon as daemon
    import hotplug.device.transport as transport
    import hotplug.testing.fifo_events as fifo_events
    from hotplug.device.events import DeviceEvent
    from hotplug.device.reconcile import Export
    from hotplug.kernel.stub import UsbipHost

    read_events = fifo_events.JsonLinesSource.read_events

    def read_and_mark(self: fifo_events.JsonLinesSource) -> list[DeviceEvent]:
        found = read_events(self)
        for event in found:
            mark(f"event-{event.action}", event.busid)
        return found

    fifo_events.JsonLinesSource.read_events = read_and_mark  # type: ignore[method-assign]

    start = daemon.Daemon._start

    def start_and_mark(self: daemon.Daemon, action: Any) -> None:
        if isinstance(action, Export):
            mark("decided", action.busid)
        start(self, action)

    daemon.Daemon._start = start_and_mark  # type: ignore[method-assign]

    names = vars(daemon)  # `export` as the daemon module imported it
    real_export = names["export"]

    def export_and_mark(stub: Any, busid: str, *args: Any, **kwargs: Any) -> Any:
        _current.busid = busid
        mark("export-start", busid)
        try:
            return real_export(stub, busid, *args, **kwargs)
        finally:
            mark("export-end", busid)
            _current.busid = None

    names["export"] = export_and_mark
    UsbipHost.bind = _around("bind", UsbipHost.bind)  # type: ignore[method-assign]
    UsbipHost.hand_over = _around("hand-over", UsbipHost.hand_over)  # type: ignore[method-assign]
    transport.connect = _around("connect", transport.connect)
    transport._exchange = _around("handshake", transport._exchange)


def _dump() -> None:
    out = os.environ.get("BENCH_PROBE_OUT")
    if out:
        Path(out).write_text(json.dumps(MARKS))


def main() -> int:
    install()
    atexit.register(_dump)
    from hotplug.device import cli

    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
