"""The outer connection of an encrypted session, as a byte stream.

USB/IP is a byte stream; over tls:// it travels as TLS application data, over
wss:// as the payload of binary WebSocket frames (frame boundaries mean
nothing). `Channel` hides which. It has two faces:

- for the control phase (asyncio): `recv()` gives the next bytes (b"" at
  the end), `send()` writes with backpressure;
- for the data phase (`relay.py`, one thread, non-blocking): `relay_read()`,
  `relay_queue()`, `relay_flush()` and, for tls:// with kTLS, the socket
  itself to splice into.

TLS is the stdlib's, on OpenSSL's own socket I/O (`SSLContext.wrap_socket`,
non-blocking, driven here): not memory BIOs, because only a socket OpenSSL
owns can have its keys handed to the kernel (kTLS, `tls.py` asks for it), and
OpenSSL then writes to and reads from the socket directly, without copies
into and out of BIOs. Not asyncio's own SSL transport either, because it
drops the TLS alert when a handshake fails: the peer would see only a closed
connection instead of "unknown ca" or "certificate expired". Here OpenSSL
writes its alert to the socket itself before the error reaches us.

kTLS on Debian 12 (OpenSSL 3.0, Linux 6.1): OpenSSL gives the kernel the
sending key for TLS 1.2 and 1.3, the receiving key only for TLS 1.2 (3.0
offloads TLS 1.3 sends only; 3.2's record layer does both). So a TLS 1.3
session here encrypts in the kernel and decrypts in OpenSSL. `TlsStream`
reads which keys the kernel holds (`ktls_send`, `ktls_recv`) from the socket.

WebSocket framing and the HTTP upgrade are the `websockets` library's sans-I/O
protocol, driven here over that TLS stream; driving it ourselves (rather than
its client or server) keeps the TLS handshake, the peer check, the connection
limits and the HTTP proxy in our hands, and lets the relay move bytes without
message reassembly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib.util
import os
import select
import socket
import ssl
from collections import deque
from collections.abc import Callable
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
# Largest WebSocket message we accept. We send one message per CHUNK; the
# limit bounds what a hostile peer can make us buffer.
MAX_MESSAGE = 4 * CHUNK
PING_INTERVAL = 20.0  # seconds: keeps proxies and NATs from idling the link out
CLOSE_TIMEOUT = 1.0
TLS_RECORD = 16 * 1024  # largest TLS plaintext record

# What the relay's non-blocking calls return instead of data.
END = 0  # the stream ended (close_notify, EOF, a WebSocket close)
WANT_READ = -1  # come back when the socket is readable
WANT_WRITE = -2  # come back when the socket is writable

# <linux/tls.h>: the kernel's TLS socket options. Python 3.11 has no names for them.
SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
_CRYPTO_INFO_HEAD = 4  # struct tls_crypto_info: version and cipher, never the key
_TCP_CLOSE = 7  # struct tcp_info's first byte, tcpi_state, after a reset

_Event = TypeVar("_Event", Request, Response)
_T = TypeVar("_T")


class ChannelError(HotplugError):
    """The outer connection broke its protocol (not TLS's or TCP's own errors)."""


def _kernel_holds(sock: socket.socket, direction: int) -> bool:
    """Whether the kernel holds this socket's TLS key for `direction` (kTLS).

    Asks for the 4-byte head of the crypto info only: the kernel then answers
    without copying the key out (EBUSY if not set, an error without the ULP).
    """
    try:
        sock.getsockopt(SOL_TLS, direction, _CRYPTO_INFO_HEAD)
    except OSError:
        return False
    return True


class _Readiness:
    """asyncio waits for a socket to become readable or writable, any number of
    waiters per direction (a read may need the socket writable while a write
    waits for it too: TLS can need either for either)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.waiters: tuple[list[asyncio.Future[None]], list[asyncio.Future[None]]] = ([], [])

    async def wait(self, write: bool) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiters = self.waiters[write]
        if not waiters:
            (loop.add_writer if write else loop.add_reader)(self.fd, self._wake, write)
        waiters.append(future)
        try:
            await future
        finally:
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                (loop.remove_writer if write else loop.remove_reader)(self.fd)

    def _wake(self, write: bool) -> None:
        for future in self.waiters[write]:
            if not future.done():
                future.set_result(None)


class TlsStream:
    """TLS over a connected socket: handshake, read, write, close.

    The async methods are the control phase's (the caller bounds the time;
    one reader at a time, writers may overlap: a lock keeps each write whole
    on the wire). The `relay_*` methods are the data phase's: non-blocking,
    from the relay's one thread, once the control phase is over."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.send_lock = asyncio.Lock()
        self.ready = _Readiness(sock.fileno())
        self.ktls_send = False
        self.ktls_recv = False
        self.eof = False  # the connection ended without close_notify (relay_read)
        self._probe: select.poll | None = None

    @classmethod
    async def handshake(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> TlsStream:
        """Raises ssl.SSLError (the alert has been sent to the peer) or OSError.
        The stream owns `sock` from here on: on failure it is closed."""
        sock.setblocking(False)
        tls = context.wrap_socket(
            sock,
            server_side=server_side,
            server_hostname=server_hostname,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=False,  # an EOF is told apart from a reset: _end()
        )
        self = cls(tls)
        try:
            await self._retried(tls.do_handshake)
        except BaseException:
            tls.close()
            raise
        self.ktls_send = _kernel_holds(tls, TLS_TX)
        self.ktls_recv = _kernel_holds(tls, TLS_RX)
        return self

    @property
    def ktls(self) -> str:
        """Which way the kernel does the TLS work, for the log."""
        ways = [w for w, on in (("send", self.ktls_send), ("receive", self.ktls_recv)) if on]
        return "+".join(ways) or "off"

    async def _retried(self, call: Callable[[], _T]) -> _T:
        """`call` (an OpenSSL operation on the non-blocking socket) again and again,
        each time after the socket became what OpenSSL asked for (a read may need
        it writable, e.g. to answer a TLS 1.3 key update, and a write readable)."""
        while True:
            try:
                return call()
            except ssl.SSLWantReadError:
                await self.ready.wait(write=False)
            except ssl.SSLWantWriteError:
                await self.ready.wait(write=True)

    async def read(self) -> bytes:
        """The next decrypted bytes; b"" at the end of the stream (close_notify)."""
        try:
            return await self._retried(functools.partial(self.sock.recv, CHUNK))
        except ssl.SSLEOFError:
            self._end()
            return b""

    async def write(self, data: bytes) -> None:
        async with self.send_lock:  # OpenSSL retries a write with the same bytes: one at a time
            view = memoryview(data)
            while view:
                try:
                    sent = await self._retried(functools.partial(self.sock.send, view))
                    view = view[sent:]
                except ssl.SSLEOFError:
                    # SSL_write_ex reports a failed send() as EOF, without its errno.
                    raise self._alert() or BrokenPipeError(
                        errno.EPIPE, "the peer closed the connection"
                    ) from None
                except OSError as exc:  # ssl.SSLError too
                    raise self._alert() or exc from None

    def _end(self) -> None:
        """The connection ended without close_notify: a plain end of the stream,
        unless it was reset (OpenSSL reports both as EOF, without the errno)."""
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
        except OSError:
            return  # not TCP (a socket pair in tests)
        if info[0] == _TCP_CLOSE:  # a FIN leaves it in CLOSE_WAIT; a reset closes it
            raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))

    def _alert(self) -> ssl.SSLError | None:
        """The alert the peer sent before it closed, if that is why a write failed
        (a TLS 1.3 server refuses our certificate after our handshake is done)."""
        try:
            self.sock.recv(CHUNK)
        except ssl.SSLError as exc:
            if not isinstance(exc, ssl.SSLWantReadError | ssl.SSLWantWriteError | ssl.SSLEOFError):
                return exc
        except OSError:
            pass
        return None

    def peercert(self) -> dict[str, Any] | None:
        cert = self.sock.getpeercert()
        return dict(cert) if cert else None

    def peercert_der(self) -> bytes | None:
        """The verified peer's certificate itself (what its fingerprint is of)."""
        return self.sock.getpeercert(binary_form=True)

    async def close(self) -> None:
        """close_notify, then close the socket; bounded in time."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                while True:
                    try:
                        self.sock.unwrap()  # sends close_notify (then would wait for theirs)
                        break
                    except ssl.SSLWantWriteError:
                        await self.ready.wait(write=True)
                    except ssl.SSLWantReadError:
                        break  # ours is out; theirs is not worth waiting for
        self.abort()

    def abort(self) -> None:
        self.sock.close()

    # -- the relay's side: non-blocking, one thread ---------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def buffered(self) -> bool:
        """Decrypted bytes OpenSSL holds already (no poll would announce them)."""
        return self.sock.pending() > 0

    def relay_read(self, buf: memoryview) -> int:
        """Decrypted bytes into `buf`, as many as are there (several records);
        their count, or END, WANT_READ, WANT_WRITE."""
        filled = 0
        while filled < len(buf) and not self.eof:
            try:
                n = self.sock.recv_into(buf[filled:])
            except ssl.SSLEOFError:
                self.eof = True
                break
            except ssl.SSLWantReadError:
                return filled or WANT_READ
            except ssl.SSLWantWriteError:
                return filled or WANT_WRITE
            if n == 0:
                return filled or END
            filled += n
            # More at once only if it is there already: never wait with bytes in hand.
            if not self.sock.pending() and not self._readable_now():
                break
        if filled == 0 and self.eof:
            self._end()  # a reset raises here
            return END
        return filled

    def _readable_now(self) -> bool:
        if self._probe is None:
            self._probe = select.poll()
            self._probe.register(self.sock.fileno(), select.POLLIN)
        return bool(self._probe.poll(0))

    def relay_write(self, views: deque[memoryview]) -> int:
        """Write the queued buffers, popping what is sent; 0 once the queue is
        empty, else WANT_WRITE or WANT_READ. A buffer partly sent stays first."""
        while views:
            if self.ktls_send:
                # The kernel encrypts: plain bytes to the socket, several buffers a call.
                try:
                    sent = os.writev(self.sock.fileno(), list(views)[:64])
                except BlockingIOError:
                    return WANT_WRITE
            else:
                try:
                    sent = self.sock.send(views[0])
                except ssl.SSLWantWriteError:
                    return WANT_WRITE
                except ssl.SSLWantReadError:
                    return WANT_READ
            while sent:
                first = views[0]
                if sent < len(first):
                    views[0] = first[sent:]
                    break
                sent -= len(first)
                views.popleft()
        return 0


class Channel:
    """A TLS byte stream. `WebSocketChannel` puts WebSocket framing on top."""

    def __init__(self, stream: TlsStream) -> None:
        self.stream = stream
        self.outgoing: deque[memoryview] = deque()  # the relay's queue to the peer

    def peercert(self) -> dict[str, Any] | None:
        return self.stream.peercert()

    async def recv(self) -> bytes:
        return await self.stream.read()

    async def send(self, data: bytes) -> None:
        await self.stream.write(data)

    async def close(self) -> None:
        """Orderly close, bounded in time."""
        await self.stream.close()

    def abort(self) -> None:
        self.stream.abort()

    # -- the relay's side (relay.py): non-blocking, one thread ------------------------

    def relay_fd(self) -> int:
        return self.stream.fileno()

    def splice_fd(self) -> int | None:
        """The socket to splice the kernel's bytes into, when the kernel encrypts
        them itself (kTLS) and nothing else is written: zero copies through us."""
        return self.stream.fileno() if self.stream.ktls_send else None

    def relay_buffered(self) -> bool:
        return self.stream.buffered()

    def relay_read(self, buf: memoryview) -> memoryview | bytes | int:
        """Bytes for the kernel (a view of `buf`, valid until the next call), or
        END, WANT_READ, WANT_WRITE."""
        n = self.stream.relay_read(buf)
        return buf[:n] if n > 0 else n

    def relay_queue(self, data: memoryview) -> None:
        """Queue bytes for the peer (framed as the channel needs); kept by
        reference until `relay_flush` has sent them."""
        self.outgoing.append(data)

    def relay_flush(self) -> int:
        """Send what is queued: 0 once all is out, else WANT_WRITE or WANT_READ."""
        return self.stream.relay_write(self.outgoing)

    def relay_timer(self) -> float | None:
        """Seconds between the relay's calls of `relay_tick`; None: never."""
        return None

    def relay_tick(self) -> bool:
        """Periodic work (WebSocket pings); False once the channel is closing."""
        return True

    async def relay_done(self) -> None:
        """After the relay, before an abort: what the protocol still owes the peer."""


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

    # -- the relay's side (relay.py): non-blocking, one thread ------------------------

    def splice_fd(self) -> int | None:
        return None  # frames carry the bytes: never spliced

    def relay_buffered(self) -> bool:
        return bool(self.early) or self.stream.buffered()

    def relay_read(self, buf: memoryview) -> memoryview | bytes | int:
        if self.early:
            data, self.early = self.early, b""
            return data
        n = self.stream.relay_read(buf)
        if n == END:
            self.protocol.receive_eof()
            return END
        if n < 0:
            return n
        self.protocol.receive_data(buf[:n])  # type: ignore[arg-type]  # it copies what it keeps
        events = self.protocol.events_received()
        self._queue_protocol()  # pongs, a close reply
        payload = self._payload(events)
        if payload:
            return payload
        if self.protocol.state in (State.CLOSING, State.CLOSED):
            return END
        return WANT_READ  # only control frames so far

    def relay_queue(self, data: memoryview) -> None:
        self.protocol.send_binary(bytes(data))  # framed (and masked) into new bytes anyway
        self._queue_protocol()

    def relay_timer(self) -> float | None:
        return PING_INTERVAL

    def relay_tick(self) -> bool:
        if self.protocol.state is not State.OPEN:
            return False
        self.protocol.send_ping(b"")
        self._queue_protocol()
        return True

    async def relay_done(self) -> None:
        """A close reply the relay had no time to send (the peer closed first)."""
        self._queue_protocol()
        if not self.outgoing:
            return
        data = b"".join(self.outgoing)
        self.outgoing.clear()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.stream.write(data)

    def _queue_protocol(self) -> None:
        # b"" asks for a half-close, which TLS cannot do: close() does the rest.
        self.outgoing.extend(memoryview(d) for d in self.protocol.data_to_send() if d)

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
