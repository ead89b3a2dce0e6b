"""The outer connection of an encrypted session, as a byte stream (asyncio).

USB/IP is a byte stream; over tls:// it travels as TLS application data, over
wss:// as the payload of binary WebSocket frames (frame boundaries mean
nothing). `Channel` hides which: `recv()` gives the next bytes (b"" at the
end), `send()` writes with backpressure.

TLS is the stdlib's: an `ssl.SSLObject` (OpenSSL) driven over the socket with
asyncio's sock_recv/sock_sendall. Not asyncio's own SSL transport, because it
drops the TLS alert when a handshake fails: the peer would see only a closed
connection instead of "unknown ca" or "certificate expired", and each side
must be able to say clearly why the other refused it. WebSocket framing and
the HTTP upgrade are the `websockets` library's sans-I/O protocol, driven
here over that TLS stream; driving it ourselves (rather than its client or
server) keeps the TLS handshake, the peer check, the connection limits and
the HTTP proxy in our hands, and lets the relay move bytes without message
reassembly.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import ssl
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.uri import parse_uri

# The sans-I/O classes were renamed in websockets 11 (Connection -> Protocol);
# Debian 12 ships 10.4, with the same API under the first names. Type-checked
# against the new ones.
if TYPE_CHECKING or importlib.util.find_spec("websockets.protocol") is not None:
    from websockets.client import ClientProtocol
    from websockets.protocol import Protocol, State
    from websockets.server import ServerProtocol
else:  # websockets 10.x
    from websockets.client import ClientConnection as ClientProtocol
    from websockets.connection import Connection as Protocol
    from websockets.connection import State
    from websockets.server import ServerConnection as ServerProtocol

from hotplug import __version__
from hotplug.errors import HotplugError

CHUNK = 256 * 1024  # bytes per read: large enough that per-chunk Python work is noise
# The loopback side's asyncio buffers: reading stops above STREAM_LIMIT, drain()
# waits above WRITE_HIGH_WATER. Backpressure with room for a few chunks.
STREAM_LIMIT = 1 << 20
WRITE_HIGH_WATER = 1 << 20
# Largest WebSocket message we accept. We send one message per CHUNK; the
# limit bounds what a hostile peer can make us buffer.
MAX_MESSAGE = 4 * CHUNK
PING_INTERVAL = 20.0  # seconds: keeps proxies and NATs from idling the link out
CLOSE_TIMEOUT = 1.0

_Event = TypeVar("_Event", Request, Response)


class ChannelError(HotplugError):
    """The outer connection broke its protocol (not TLS's or TCP's own errors)."""


class TlsStream:
    """TLS over a connected socket: handshake, read, write, close. The caller
    bounds the time. One reader at a time; writers may overlap (a lock keeps
    the records in order on the wire)."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:  # fmt: skip
        self.sock = sock
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.send_lock = asyncio.Lock()

    @classmethod
    async def handshake(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> TlsStream:
        """Raises ssl.SSLError (the alert has been sent to the peer) or OSError."""
        sock.setblocking(False)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self = cls(sock, tls, incoming, outgoing)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    await self._flush()  # the alert: tell the peer why
                raise
        await self._flush()
        return self

    async def read(self) -> bytes:
        """The next decrypted bytes; b"" at the end of the stream."""
        while True:
            try:
                data = self.tls.read(CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()  # e.g. a TLS 1.3 key update answer
                if not await self._fill():
                    return b""
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # close_notify, or the TCP connection just ended
            if self.outgoing.pending:
                await self._flush()
            return data

    async def write(self, data: bytes) -> None:
        self.tls.write(data)  # into memory: never blocks
        await self._flush()

    def peercert(self) -> dict[str, Any] | None:
        cert = self.tls.getpeercert()
        return dict(cert) if cert else None

    def peercert_der(self) -> bytes | None:
        """The verified peer's certificate itself (what its fingerprint is of)."""
        return self.tls.getpeercert(binary_form=True)

    async def close(self) -> None:
        """close_notify, then close the socket; bounded in time."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                with contextlib.suppress(ssl.SSLWantReadError):
                    self.tls.unwrap()
                await self._flush()
        self.abort()

    def abort(self) -> None:
        self.sock.close()

    async def _fill(self) -> bool:
        data = await asyncio.get_running_loop().sock_recv(self.sock, CHUNK)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return bool(data)

    async def _flush(self) -> None:
        async with self.send_lock:  # take the bytes inside the lock: order is kept
            data = self.outgoing.read()
            if data:
                await asyncio.get_running_loop().sock_sendall(self.sock, data)


class Channel:
    """A TLS byte stream. `WebSocketChannel` puts WebSocket framing on top."""

    def __init__(self, stream: TlsStream) -> None:
        self.stream = stream

    def peercert(self) -> dict[str, Any] | None:
        return self.stream.peercert()

    async def recv(self) -> bytes:
        return await self.stream.read()

    async def send(self, data: bytes) -> None:
        await self.stream.write(data)

    async def keepalive(self) -> None:
        """Runs for the whole relay. TLS has no ping: TCP keepalive does this job."""
        await asyncio.Event().wait()

    async def close(self) -> None:
        """Orderly close, bounded in time."""
        await self.stream.close()

    def abort(self) -> None:
        self.stream.abort()


class WebSocketChannel(Channel):
    def __init__(self, stream: TlsStream, protocol: Protocol, early: bytes = b"") -> None:
        super().__init__(stream)
        self.protocol = protocol
        self.early = early  # frame payload that arrived with the handshake

    # -- client and server handshakes

    @classmethod
    async def client(cls, stream: TlsStream, host: str, port: int, path: str) -> WebSocketChannel:
        """Upgrade to WebSocket (the caller bounds the time). Raises ChannelError if refused."""
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        protocol = ClientProtocol(parse_uri(f"wss://{authority}{path}"), max_size=MAX_MESSAGE)
        request = protocol.connect()
        request.headers["User-Agent"] = f"usbip-hotplug/{__version__}"
        protocol.send_request(request)
        self = cls(stream, protocol)
        await self._flush()
        response = await self._handshake_event(Response)
        if protocol.handshake_exc is not None or protocol.state is not State.OPEN:
            detail = f"HTTP {response.status_code} {response.reason_phrase}"
            if response.status_code == 101:
                detail = str(protocol.handshake_exc)
            raise ChannelError(f"WebSocket upgrade to {path} refused: {detail}")
        return self

    @classmethod
    async def server(cls, stream: TlsStream, path: str) -> WebSocketChannel:
        """Accept an upgrade to `path` (the caller bounds the time); refuse anything else."""
        protocol = ServerProtocol(max_size=MAX_MESSAGE)
        self = cls(stream, protocol)
        request = await self._handshake_event(Request)
        if protocol.handshake_exc is not None or protocol.eof_sent:
            # The protocol gave up on this client already (a bad request, or data
            # sent before the upgrade was answered): its answer goes out, then we stop.
            await self._flush()
            why = protocol.handshake_exc or "data before the upgrade was answered"
            raise ChannelError(f"bad WebSocket upgrade request: {why}")
        asked = request.path.split("?", 1)[0]
        if asked != path:
            refusal = protocol.reject(HTTPStatus.NOT_FOUND, "no USB/IP service at this path\n")
            protocol.send_response(refusal)
            await self._flush()
            raise ChannelError(f"WebSocket request for {asked!r}, which is not {path!r}")
        protocol.send_response(protocol.accept(request))
        await self._flush()
        if protocol.handshake_exc is not None:
            raise ChannelError(f"bad WebSocket upgrade request: {protocol.handshake_exc}")
        return self

    async def _handshake_event(self, kind: type[_Event]) -> _Event:
        while True:
            data = await self.stream.read()
            if not data:
                raise ChannelError("connection closed during the WebSocket upgrade")
            self.protocol.receive_data(data)
            await self._flush()
            events = self.protocol.events_received()
            for index, event in enumerate(events):
                if isinstance(event, kind):
                    # Frames that came in the same read as the handshake are USB/IP data.
                    self.early = self._payload(events[index + 1 :])
                    return event
            if self.protocol.state is State.CLOSED:
                raise ChannelError("connection closed during the WebSocket upgrade")

    # -- the byte stream

    async def recv(self) -> bytes:
        if self.early:
            data, self.early = self.early, b""
            return data
        while True:
            data = await self.stream.read()
            if not data:
                self.protocol.receive_eof()
                return b""
            self.protocol.receive_data(data)
            await self._flush()  # pongs and close replies
            payload = self._payload(self.protocol.events_received())
            if payload:
                return payload
            if self.protocol.state in (State.CLOSING, State.CLOSED):
                return b""

    async def send(self, data: bytes) -> None:
        self.protocol.send_binary(data)
        await self._flush()

    async def keepalive(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL)
            if self.protocol.state is not State.OPEN:
                return
            self.protocol.send_ping(b"")
            await self._flush()

    async def close(self) -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._flush()
        await super().close()

    async def _flush(self) -> None:
        # b"" asks for a half-close, which TLS cannot do: close() does the rest.
        data = b"".join(self.protocol.data_to_send())
        if data:
            await self.stream.write(data)

    @staticmethod
    def _payload(events: list[Any]) -> bytes:
        parts = []
        for event in events:
            if not isinstance(event, Frame):
                continue
            if event.opcode is Opcode.TEXT:
                raise ChannelError("peer sent a text WebSocket frame; USB/IP needs binary frames")
            if event.opcode in (Opcode.BINARY, Opcode.CONT):
                parts.append(bytes(event.data))
        return b"".join(parts)


class Inbox:
    """Reads a channel exactly, keeping whatever follows for the kernel.

    The control phase must take exactly the bytes of its PDU: after an EXPORT
    reply the peer's kernel may already be sending URBs, and they belong to
    the local kernel, untouched (PROTOCOL.md, export handshake step 5).
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.buffer = bytearray()

    async def read_some(self, size: int) -> bytes:
        """Up to `size` bytes; b"" only at the end of the stream."""
        if not self.buffer:
            data = await self.channel.recv()
            if not data:
                return b""
            self.buffer += data
        chunk = bytes(self.buffer[:size])
        del self.buffer[:size]
        return chunk

    async def read_exactly(self, size: int) -> bytes:
        """`size` bytes, or fewer if the stream ends first."""
        out = bytearray()
        while len(out) < size:
            chunk = await self.read_some(size - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def leftover(self) -> bytes:
        data, self.buffer = bytes(self.buffer), bytearray()
        return data
