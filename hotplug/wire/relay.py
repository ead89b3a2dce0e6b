"""Getting an encrypted session's bytes to the kernel: a loopback pair and a relay.

usbip-host and vhci_hcd take a plain connected stream socket, so for tls://
and wss:// the kernel gets one end of a loopback TCP connection made for this
session alone, and `relay()` moves bytes between the other end and the
encrypted channel:

- cheap: 256 KiB reads, whole chunks handed on, no per-byte Python work;
  TCP_NODELAY on the loopback ends (USB/IP is request/response);
- backpressure both ways: each direction awaits the far side's drain before
  reading more, and asyncio stops reading a socket whose buffer is full;
- link loss is the kernel's to see: the moment the outer connection ends or
  fails, the kernel's end is aborted, so usbip-host / vhci_hcd tear the data
  phase down exactly as when a plain TCP link dies, and the usual link-loss
  handling (re-export, port reaping) works unchanged;
- private: the listener is bound to 127.0.0.1, accepts only the connection
  from the port we connected from, and is closed once the pair exists.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable

from hotplug.wire.channel import CHUNK, STREAM_LIMIT, WRITE_HIGH_WATER, Channel, ChannelError

PAIR_TIMEOUT = 5.0
_STRANGERS = 16  # connections from other local processes we refuse before giving up


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    """(kernel end, relay end) of a fresh loopback TCP connection."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    relay_end: socket.socket | None = None
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(_STRANGERS)
        listener.settimeout(PAIR_TIMEOUT)
        relay_end = socket.create_connection(listener.getsockname()[:2], timeout=PAIR_TIMEOUT)
        expected = relay_end.getsockname()
        for _ in range(_STRANGERS):
            kernel_end, address = listener.accept()
            if address == expected:
                break
            kernel_end.close()  # another local process raced us to the port
        else:
            raise OSError("loopback pair: too many foreign connections to a private port")
    except BaseException:
        if relay_end is not None:
            relay_end.close()
        raise
    finally:
        listener.close()  # no one else can connect from now on
    for end in (kernel_end, relay_end):
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end.settimeout(None)
    return kernel_end, relay_end


async def relay(
    outer: Channel,
    inner: socket.socket,
    pending: bytes = b"",
    count: Callable[[str, int], None] | None = None,
) -> str:
    """Move bytes between `outer` and the kernel's loopback peer `inner` until
    either ends; `pending` (bytes that followed the control reply) goes to the
    kernel first. Closes both; returns why it ended, for the log. `count`
    (direction, size) is told of each chunk: "from_peer" or "to_peer"."""

    def counted(direction: str, size: int) -> None:
        if count is not None:
            count(direction, size)

    reader, writer = await asyncio.open_connection(sock=inner, limit=STREAM_LIMIT)
    writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    async def to_peer() -> str:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                return "the local kernel closed the connection"
            counted("to_peer", len(data))
            await outer.send(data)

    async def to_kernel() -> str:
        if pending:
            counted("from_peer", len(pending))
            writer.write(pending)
        while True:
            data = await outer.recv()
            if not data:
                return "the peer closed the connection"
            counted("from_peer", len(data))
            writer.write(data)
            await writer.drain()

    async def keepalive() -> str:
        await outer.keepalive()
        return "keepalive ended"

    tasks = [asyncio.create_task(f()) for f in (to_kernel, to_peer, keepalive)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        writer.transport.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        outer.abort()  # the daemon is stopping
        raise
    writer.transport.abort()  # first: the kernel must see the link go at once
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    first = done.pop()
    error = first.exception() if not first.cancelled() else None
    if error is None and first is tasks[1]:
        await outer.close()  # the kernel ended the session: say goodbye properly
    else:
        outer.abort()
    if error is None:
        return str(first.result()) if not first.cancelled() else "cancelled"
    return _why(error)


def _why(error: BaseException) -> str:
    if isinstance(error, ChannelError):
        return str(error)
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error}"
    if isinstance(error, OSError):
        return f"connection lost: {error.strerror or error}"
    return f"relay failed: {error!r}"
