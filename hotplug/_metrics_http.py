"""The HTTP side of the metrics endpoint: the standard library's threading WSGI
server around prometheus_client's WSGI application (metrics.py says why).

Imported only when metrics are served. A client of the port gets its own
thread, at most MAX_CLIENTS at once (more are closed unread), and loses it
after CLIENT_TIMEOUT s of silence: a flood of connections costs threads and
the scrapes during it, never the daemon's loop or its memory.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from hotplug.wire.address import Endpoint

CLIENT_TIMEOUT = 10.0
MAX_CLIENTS = 8  # a Prometheus or two, a curl, and room for a retry


class _Handler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes come every few seconds: not worth a journal line each."""


class Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds up the daemon's exit
    allow_reuse_address = True

    def __init__(self, address: tuple[Any, ...], family: socket.AddressFamily) -> None:
        self.address_family = family
        self.clients = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for our own name (getfqdn): a stall
        # at start on a machine whose resolver is down, for a name no one reads.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.clients.acquire(blocking=False):
            self.shutdown_request(request)  # closed unread: the port is busy
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.clients.release()  # no thread started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.clients.release()


def bind(listen: Endpoint, registry: CollectorRegistry) -> Server:
    """A server bound to `listen` (OSError if it cannot be), not yet serving."""
    try:
        infos = socket.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(f"unknown host: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    server = Server(address, family)
    server.set_app(make_wsgi_app(registry))
    return server
