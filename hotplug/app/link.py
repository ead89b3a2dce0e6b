"""One usbipa connection, plain or encrypted, as the control phase sees it.

`PlainLink` is a raw TCP socket: requests are read from it with `sock_recv`
of exactly the bytes needed, and on EXPORT the socket itself goes to vhci.
`SecureLink` is a TLS (or WebSocket-over-TLS) channel from the TLS or wss
listener: the same reads go through an `Inbox`, and on EXPORT vhci gets one
end of a loopback pair made for this session, which `relay()` then connects
to the channel (relay.py says why and how).

`SecureServer` holds what the secure listeners need (the TLS context, checked
at start, and the WebSocket path) and turns an accepted socket into a
`SecureLink`, or into one clear reason why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable

from hotplug import log
from hotplug.app.config import AppdConfig
from hotplug.errors import HotplugError
from hotplug.wire.channel import Channel, ChannelError, Inbox, TlsStream, WebSocketChannel
from hotplug.wire.peercert import PeerCert
from hotplug.wire.relay import loopback_pair, relay
from hotplug.wire.sockets import Timeouts, tune_socket
from hotplug.wire.tls import check_pair, describe, issued_by, server_context

logger = log.get("usbipa")


class LinkRefused(HotplugError):
    """The TLS or WebSocket handshake failed; the message says why."""


class PlainLink:
    client: PeerCert | None = None

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.port: int | None = None  # the vhci port it was attached to

    async def recv(self, size: int) -> bytes:
        return await asyncio.get_running_loop().sock_recv(self.conn, size)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.conn, data)

    def kernel_socket(self) -> socket.socket:
        return self.conn

    def finish(self, handed_over: bool) -> None:
        if not handed_over:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
        self.conn.close()  # after a hand-over the kernel keeps its own reference


class SecureLink:
    def __init__(self, channel: Channel, client: PeerCert | None) -> None:
        self.channel = channel
        self.client = client
        self.inbox = Inbox(channel)
        self.pair: tuple[socket.socket, socket.socket] | None = None
        self.port: int | None = None  # the vhci port it was attached to

    async def recv(self, size: int) -> bytes:
        try:
            return await self.inbox.read_some(size)
        except ChannelError as exc:  # e.g. a text frame: not USB/IP
            raise LinkRefused(str(exc)) from None

    async def send(self, data: bytes) -> None:
        await self.channel.send(data)

    def kernel_socket(self) -> socket.socket:
        if self.pair is None:
            self.pair = loopback_pair()
        return self.pair[0]

    def finish(self, handed_over: bool) -> None:
        if self.pair is not None:
            self.pair[0].close()  # vhci holds its own reference once attached
        if not handed_over:
            if self.pair is not None:
                self.pair[1].close()
            self.channel.abort()

    async def relay(self, count: Callable[[str, int], None] | None = None) -> str:
        """Run the data phase until either side ends it; returns why it ended.
        `count(direction, size)` sees every chunk ("from_peer", "to_peer")."""
        assert self.pair is not None
        return await relay(self.channel, self.pair[1], self.inbox.leftover(), count)


class SecureServer:
    def __init__(self, config: AppdConfig) -> None:
        assert config.tls is not None
        tls = config.tls
        self.context = server_context(tls.cert, tls.key, tls.client_ca)  # CertError if unusable
        self.wss_path = config.wss.path if config.wss else "/"
        self.info = check_pair(tls.cert, tls.key, "server")
        self.mismatch = issued_by(tls.cert, tls.key, "server", tls.client_ca)

    def log_start(self) -> None:
        logger.info("TLS certificate: %s", self.info.describe())
        if self.mismatch is not None:
            # Legitimate when clients trust another CA than the one that signs
            # their certificates, but usually a mixed-up file.
            logger.warning(
                "note: the client CA does not verify our own certificate (%s); clients must "
                "trust the CA that issued it",
                self.mismatch,
            )

    async def open(self, conn: socket.socket, kind: str) -> SecureLink:
        """TLS handshake (client certificate required), then for wss the upgrade."""
        tune_socket(conn, Timeouts())  # a vanished device side must end the relay
        try:
            stream = await TlsStream.handshake(conn, self.context, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raise LinkRefused(describe(exc, "server")) from None
        cert = stream.peercert()
        client = PeerCert.from_ssl(cert, stream.peercert_der()) if cert else None
        try:
            if kind == "wss":
                channel: Channel = await WebSocketChannel.server(stream, self.wss_path)
            else:
                channel = Channel(stream)
        except (ChannelError, ssl.SSLError, OSError) as exc:
            stream.abort()
            who = f" ({client.name})" if client else ""
            why = str(exc) if isinstance(exc, ChannelError) else describe(exc, "server")
            raise LinkRefused(f"{why}{who}") from None
        return SecureLink(channel, client)
