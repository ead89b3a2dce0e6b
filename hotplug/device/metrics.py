"""The device side's metric families (`usbip_hotplug_*`), fed by one-line hooks in daemon.py.

Labels are what the admin named (targets, rules) or small fixed sets (state,
result); never a busid or a serial number, which would make a series per
device ever plugged. The hooks run on the daemon's loop; scrapes run in the
metrics thread and read only the library's (locked) metric objects, the
snapshot of device states the loop publishes after each step, and
usbip-host's table straight from sysfs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from hotplug import log
from hotplug.device.reconcile import Note, Slot, Wanted
from hotplug.kernel.stub import TABLE_SLOTS, UsbipHost
from hotplug.kernel.sysfs import KernelError
from hotplug.metrics import MetricsError, MetricsServer, new_registry
from hotplug.wire.address import Endpoint

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from hotplug.device.policy.model import Target

logger = log.get("hotplug.daemon")

# Plug-in to exported: a first attempt over loopback takes ~10 ms, a slow
# target a handshake timeout or two, a round of retries up to minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BACKOFF_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

StateOf = Callable[[Slot, Wanted | None], str]


class DeviceMetrics:
    def __init__(self, stub: UsbipHost, state_of: StateOf) -> None:
        self.registry = new_registry()
        self.server = MetricsServer(self.registry)
        self.state_of = state_of
        self.plugged_at: dict[str, float] = {}  # busid -> monotonic time of its plug event
        self._devices: dict[tuple[str, str], int] = {}  # (state, rule) -> count, replaced whole
        r = self.registry
        self.exports = Counter(
            "usbip_hotplug_exports",
            "Export attempts that ended, by target and result (ok, error, cancelled).",
            ["target", "result"],
            registry=r,
        )
        self.unexports = Counter(
            "usbip_hotplug_unexports",
            "Unexports (OP_UNEXPORT, then the device given back), by target and result.",
            ["target", "result"],
            registry=r,
        )
        self.latency = Histogram(
            "usbip_hotplug_export_latency_seconds",
            "From a device's plug event to its first successful export, retries included.",
            ["target"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.link_losses = Counter(
            "usbip_hotplug_link_losses",
            "Exported devices whose link the kernel reported lost, by target.",
            ["target"],
            registry=r,
        )
        self.retries = Counter(
            "usbip_hotplug_export_retries",
            "Failed exports that will be tried again (a fallback now, or after a backoff).",
            ["target"],
            registry=r,
        )
        self.backoff = Histogram(
            "usbip_hotplug_backoff_seconds",
            "Waits before the next round of attempts, by the rule's first target.",
            ["target"],
            buckets=BACKOFF_BUCKETS,
            registry=r,
        )
        r.register(_Snapshot(self))
        r.register(_Table(stub))

    # ------------------------------------------------------------------ serving

    def serve(self, listen: Endpoint | None) -> None:
        """Serve `listen` (None: off); MetricsError if it cannot be bound."""
        if listen is None:
            return
        url = self.server.start(listen)
        log.event(logger, logging.INFO, f"serving metrics on {url}", event="metrics")

    def reconfigure(self, listen: Endpoint | None) -> None:
        """After a reload: follow a changed address; a failure is logged, not fatal."""
        if listen == self.server.listen:
            return
        self.server.stop()
        try:
            self.serve(listen)
        except MetricsError as exc:
            log.event(logger, logging.ERROR, f"{exc}; metrics are off", event="metrics-error")
        if listen is None:
            log.event(logger, logging.INFO, "metrics off", event="metrics")

    def stop(self) -> None:
        self.server.stop()

    # ------------------------------------------------------------------ hooks

    def devices(
        self, wanted: Mapping[str, Wanted], slots: Mapping[str, Slot], settling: Mapping[str, float]
    ) -> None:
        """After each loop step: how many devices are in each state, by rule."""
        counts: dict[tuple[str, str], int] = {}
        for busid in set(wanted) | set(slots):
            w = wanted.get(busid)
            state = "settling" if busid in settling else self.state_of(slots.get(busid, Slot()), w)
            key = (state.replace(" ", "_"), (w.rule if w is not None else None) or "")
            counts[key] = counts.get(key, 0) + 1
        self._devices = counts  # one reference swap: a scrape sees one step or the next

    def plugged(self, busid: str) -> None:
        self.plugged_at[busid] = time.monotonic()

    def unplugged(self, busid: str) -> None:
        self.plugged_at.pop(busid, None)

    def exported(self, busid: str, target: Target) -> None:
        self.exports.labels(target.name, "ok").inc()
        since = self.plugged_at.pop(busid, None)
        if since is not None:
            self.latency.labels(target.name).observe(time.monotonic() - since)

    def export_failed(
        self, target: Target, chain: tuple[Target, ...], cut: bool, new: Slot, now: float
    ) -> None:
        """`chain`: the targets the policy still wants it at (empty: none, no retry);
        `cut`: the daemon cut it short (unplugged, moved, stopping); `new`: the slot now."""
        self.exports.labels(target.name, "cancelled" if cut else "error").inc()
        if chain and not cut:
            self.retries.labels(target.name).inc()
        if new.phase == "backoff" and new.next_at is not None and chain:
            # The round's wait is the rule's own target's, as reconcile reckons it.
            self.backoff.labels(chain[0].name).observe(max(0.0, new.next_at - now))

    def unexport_done(self, target: Target, error: str | None) -> None:
        self.unexports.labels(target.name, "ok" if error is None else "error").inc()

    def note(self, note: Note) -> None:
        if note.event == "link-lost":
            self.link_losses.labels(note.target or "").inc()


class _Snapshot(Collector):
    def __init__(self, metrics: DeviceMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "usbip_hotplug_devices",
            "Devices the daemon knows, by state (as 'usbip-hotplug status' shows it) and rule.",
            labels=["state", "rule"],
        )
        for (state, rule), count in sorted(self.metrics._devices.items()):
            family.add_metric([state, rule], count)
        yield family


class _Table(Collector):
    """usbip-host's busid table, read at scrape time (a few small sysfs reads)."""

    def __init__(self, stub: UsbipHost) -> None:
        self.stub = stub

    def collect(self) -> Iterator[Metric]:
        try:
            used, leaked = len(self.stub.table()), len(self.stub.leftovers())
        except (KernelError, OSError):
            return  # no series rather than wrong ones; `status` says what failed
        for name, value, text in (
            ("slots", TABLE_SLOTS, "Busid slots in usbip-host's table (a module constant)."),
            ("slots_used", used, "Busid slots in use; exports fail once all are."),
            (
                "slots_leaked",
                leaked,
                "Slots held by devices unplugged while bound; freed by a module reload.",
            ),
        ):
            yield GaugeMetricFamily(f"usbip_hotplug_busid_table_{name}", text, value=value)
