"""The Prometheus endpoint both daemons share: a private registry, served over HTTP.

Each daemon keeps its metric families in a registry of its own (its module,
`hotplug.device.metrics` or `hotplug.app.metrics`, says which), with the library's process,
platform and garbage-collector collectors beside them. Counters count whether
or not anything serves them; `MetricsServer` serves the registry only when
the admin asks for it (`settings.metrics.listen`, `metrics.listen`, or
`--metrics-listen`).

How it serves, and why so:
- In a thread of its own, not on the daemon's asyncio loop: a scrape (or a
  slow or hostile client of the port) never delays a device event, and the
  loop's work never delays a scrape. Metric objects are the library's, which
  lock; what a collector reads from the daemon is a snapshot the loop
  published, or a copy taken in one step.
- With the library's WSGI application (`make_wsgi_app`: the text format,
  OpenMetrics on request, gzip, `name[]` filters) on the standard library's
  threading WSGI server: that is what `prometheus_client.start_http_server`
  is made of, but in 0.16.0 (Debian 12) it returns nothing, so a daemon could
  neither learn the port it got nor stop the server. Here both are ours.
- No authentication and no TLS: anyone who reaches the port reads device
  states and target names. Listen on loopback, or firewall the port.
"""

from __future__ import annotations

import argparse
import threading
from typing import TYPE_CHECKING

from hotplug.errors import HotplugError
from hotplug.wire.address import AddressError, Endpoint, parse_listen

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from hotplug._metrics_http import Server

__all__ = ["MetricsError", "MetricsServer", "listen_arg", "new_registry"]


class MetricsError(HotplugError):
    """The metrics endpoint cannot be served; the message says why and where."""


def listen_arg(text: str) -> Endpoint:
    """argparse type of both programs' --metrics-listen."""
    try:
        return parse_listen(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def new_registry() -> CollectorRegistry:
    """A registry with the library's standard process_* and python_* families."""
    # Imported here, by the daemons only: every other command (and each tab
    # completion) imports the daemon's module too, and need not pay for it.
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        PlatformCollector,
        ProcessCollector,
    )

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsServer:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self.listen: Endpoint | None = None  # as asked for
        self.url: str | None = None  # as bound: the port, when 0 was asked for

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, listen: Endpoint) -> str:
        """Bind `listen` and serve /metrics from a thread; returns the URL."""
        from hotplug._metrics_http import bind

        try:
            server = bind(listen, self.registry)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
        host, port = str(server.server_address[0]), int(server.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        self._server, self.listen, self.url = server, listen, f"http://{shown}:{port}/metrics"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        self.listen = self.url = None
        if server is None:
            return
        server.shutdown()  # returns once serve_forever has
        server.server_close()
        if thread is not None:
            thread.join(5)
