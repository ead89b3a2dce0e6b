"""The Prometheus endpoint both daemons share: a private registry, served over HTTP.

Each daemon keeps its metric families in a registry of its own (its module,
`daemon_metrics` or `appd_metrics`, says which), with the library's process,
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
import socket
import socketserver
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

from hotplug.address import AddressError, Endpoint, parse_listen

__all__ = ["MetricsError", "MetricsServer", "listen_arg", "new_registry"]

# A client that sends nothing for this long loses its connection (and thread).
CLIENT_TIMEOUT = 10.0


class MetricsError(Exception):
    """The metrics endpoint cannot be served; the message says why and where."""


def listen_arg(text: str) -> Endpoint:
    """argparse type of both programs' --metrics-listen."""
    try:
        return parse_listen(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def new_registry() -> CollectorRegistry:
    """A registry with the library's standard process_* and python_* families."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class _Handler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes come every few seconds: not worth a journal line each."""


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds up the daemon's exit
    allow_reuse_address = True

    def __init__(self, address: tuple[Any, ...], family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for our own name (getfqdn): a stall
        # at start on a machine whose resolver is down, for a name no one reads.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class MetricsServer:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.listen: Endpoint | None = None  # as asked for
        self.url: str | None = None  # as bound: the port, when 0 was asked for

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, listen: Endpoint) -> str:
        """Bind `listen` and serve /metrics from a thread; returns the URL."""
        try:
            infos = socket.getaddrinfo(
                listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise MetricsError(f"metrics listen address {listen}: {exc.strerror}") from exc
        family, _, _, _, address = infos[0]
        try:
            server = _Server(address, family)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
        server.set_app(make_wsgi_app(self.registry))
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
