"""usbipa's metric families (`usbipa_*`), fed by one-line hooks in server.py.

Who a session belongs to is labelled by the `allow` entry that admitted it
(its index: usbipa.yaml's entries in order, then those of --allow and
--allow-client) and, on the TLS and wss listeners, by the first 16 hex digits
of the client certificate's SHA-256 fingerprint. Not by address: any host
that reaches the port picks its own, and every new one would make a series.
An entry index is bounded by the config; a fingerprint by the certificates the
admin's CA issued, and only admitted clients have attached ports at all.
Refusals are labelled by a fixed set of reasons (REASONS).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from hotplug import log
from hotplug.app.config import AppdConfig, peer_address
from hotplug.metrics import MetricsServer, new_registry
from hotplug.usb import Speed
from hotplug.wire.address import Endpoint
from hotplug.wire.protocol import (
    DeviceRecord,
    DevlistRequest,
    ExportRequest,
    ImportRequest,
    Pdu,
    UnexportRequest,
)

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from hotplug.app.server import Appd
    from hotplug.app.sessions import Session
    from hotplug.wire.peercert import PeerCert

logger = log.get("usbipa")

# A plain EXPORT over loopback takes ~1 ms; TLS adds a handshake, a slow or
# hostile client runs into limits.control_timeout (10 s by default).
CONTROL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The refusal reasons, and how the messages server.py logs map to them (first match).
REASONS = (
    "address",  # no allow entry admits the address: closed at accept
    "peer_connections",  # limits.per_peer_connections reached
    "prefix_connections",  # limits.per_prefix_connections reached
    "max_connections",  # limits.max_connections reached
    "unproven_connections",  # the slots kept for known peers are all that is left
    "tls",  # TLS or WebSocket handshake failed (no or an untrusted certificate, ...)
    "not_allowed",  # no allow entry admits this peer (address and certificate)
    "device_not_allowed",  # an entry admits the peer, none this vid:pid
    "max_devices",  # the entry's max_devices reached
    "bad_record",  # the EXPORT's device record does not fit the kernel
    "no_free_port",  # no free vhci port of the needed speed
    "other",
)
_MESSAGES = (
    ("no allow entry admits this address", "address"),
    ("too many connections from this peer", "peer_connections"),
    ("too many connections from peers not yet authorized", "unproven_connections"),
    ("too many connections from ", "prefix_connections"),
    ("too many connections", "max_connections"),
    ("peer not in any allow list", "not_allowed"),
    ("client ", "not_allowed"),  # "client CN=... (from ...) not in any allow entry"
    ("peer already exports", "max_devices"),
    ("busnum ", "bad_record"),
    ("devnum ", "bad_record"),
    ("device speed unknown", "bad_record"),
    ("device ", "device_not_allowed"),  # "device vvvv:pppp not allowed for this peer"
)
_REQUESTS: tuple[tuple[type, str], ...] = (
    (ExportRequest, "export"),
    (UnexportRequest, "unexport"),
    (DevlistRequest, "devlist"),
    (ImportRequest, "import"),
)


def refusal_reason(why: str) -> str:
    """One of REASONS for a refusal message (or a reason given as such)."""
    if why in REASONS:
        return why
    for start, reason in _MESSAGES:
        if why.startswith(start):
            return reason
    return "other"


def admitting_entry(
    config: AppdConfig, peer: str, record: DeviceRecord, cert: PeerCert | None
) -> str:
    """The index of the allow entry that admits this export, as `authorize` picks
    it (the first that admits the peer and the device); "" if none does."""
    address = peer_address(peer)
    for index, rule in enumerate(config.allow):
        if rule.admits_peer(address, cert) and rule.admits_device(
            record.id_vendor, record.id_product
        ):
            return str(index)
    return ""


def fingerprint_prefix(client_id: str | None) -> str:
    if client_id is None or not client_id.startswith("sha256:"):
        return ""
    return client_id.removeprefix("sha256:")[:16]


class AppdMetrics:
    def __init__(self, appd: Appd) -> None:
        self.appd = appd
        self.registry = new_registry()
        self.server = MetricsServer(self.registry)
        self.owners: dict[int, tuple[str, str]] = {}  # port -> (allow entry, fingerprint prefix)
        r = self.registry
        self.refusals = Counter(
            "usbipa_refusals",
            "Connections and requests refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.control = Histogram(
            "usbipa_control_phase_seconds",
            "From accepting a connection to the end of its control phase, by request "
            "(export, unexport, devlist, import; none: no complete request).",
            ["request"],
            buckets=CONTROL_BUCKETS,
            registry=r,
        )
        self.enumeration_timeouts = Counter(
            "usbipa_enumeration_timeouts",
            "Ports detached because their device did not enumerate within "
            "limits.enumeration_timeout.",
            registry=r,
        )
        self.relay_bytes = Counter(
            "usbipa_relay_bytes",
            "Bytes of TLS and wss sessions' data phase relayed to and from the device side "
            "(plain TCP sessions are the kernel's own).",
            ["direction"],
            registry=r,
        )
        for reason in REASONS:  # zeros, so that rate() works from the first refusal
            self.refusals.labels(reason)
        for direction in ("from_peer", "to_peer"):
            self.relay_bytes.labels(direction)
        r.register(_Live(self))

    # ------------------------------------------------------------------ serving

    def serve(self, listen: Endpoint | None) -> None:
        """Serve `listen` (None: off); MetricsError if it cannot be bound."""
        if listen is not None:
            url = self.server.start(listen)
            log.event(logger, logging.INFO, f"serving metrics on {url}", event="metrics")

    def stop(self) -> None:
        self.server.stop()

    # ------------------------------------------------------------------ hooks

    def refused(self, why: str) -> None:
        self.refusals.labels(refusal_reason(why)).inc()

    def control_phase(self, request: Pdu | None, started: float) -> None:
        kind = next((name for cls, name in _REQUESTS if isinstance(request, cls)), "none")
        self.control.labels(kind).observe(time.monotonic() - started)

    def attached(self, port: int, peer: str, record: DeviceRecord, cert: PeerCert | None) -> None:
        entry = admitting_entry(self.appd.config, peer, record, cert)
        self.owners[port] = (entry, fingerprint_prefix(cert.identity if cert else None))

    def enumeration_timeout(self) -> None:
        self.enumeration_timeouts.inc()

    def relayed(self, direction: str, size: int) -> None:
        self.relay_bytes.labels(direction).inc(size)

    # ------------------------------------------------------------------ scrapes

    def owner_labels(self, session: Session) -> tuple[str, str]:
        known = self.owners.get(session.port)
        if known is not None:
            return known
        # Adopted from a previous run: its certificate is gone with that run,
        # so an entry is found for plain sessions only.
        record = DeviceRecord.bare(
            session.busid,
            path=session.path,
            speed=Speed(session.speed),
            id_vendor=session.vendor,
            id_product=session.product,
        )
        plain = session.client_id is None
        entry = admitting_entry(self.appd.config, session.peer, record, None) if plain else ""
        return entry, fingerprint_prefix(session.client_id)


class _Live(Collector):
    """What usbipa holds right now, read at scrape time from the metrics thread."""

    def __init__(self, metrics: AppdMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        appd = self.metrics.appd
        # dict.copy() runs without releasing the GIL: a consistent view of a
        # dict the loop changes (iterating it here could see it change size).
        sessions = appd.sessions.by_port.copy()
        ports = GaugeMetricFamily(
            "usbipa_attached_ports",
            "vhci ports attached for a device side, by the allow entry that admitted it "
            "and the client certificate's fingerprint prefix (empty for plain TCP).",
            labels=["allow", "client"],
        )
        counts: dict[tuple[str, str], int] = {}
        for session in sessions.values():
            key = self.metrics.owner_labels(session)
            counts[key] = counts.get(key, 0) + 1
        for (entry, client), count in sorted(counts.items()):
            ports.add_metric([entry, client], count)
        yield ports
        yield GaugeMetricFamily(
            "usbipa_control_connections",
            "Connections in their control phase now (limits.max_connections caps them).",
            value=appd.total_connections,
        )
