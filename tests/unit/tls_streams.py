"""TLS streams for the unit tests that run in one process over loopback: a
client/server pair made with the test PKI (`tls_pair`), reading a stream until
it gave what a test expects (`expect`), reading the kernel's end of a relay
(`kernel_read`), and `run`, asyncio.run with a deadline. Shared by the tests of
the TLS channel and of the metrics (relayed bytes).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable
from typing import TypeVar

from hotplug.wire.channel import Channel, TlsStream
from hotplug.wire.relay import loopback_pair
from hotplug.wire.tls import client_context, server_context
from tests.tlscerts import Pair, Pki

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 10) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def contexts(pki: Pki, client: Pair | None = None) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    client = client or pki.client
    server = server_context(str(pki.server.cert), str(pki.server.key), str(pki.ca))
    return server, client_context(str(client.cert), str(client.key), str(pki.ca))


async def tls_pair(pki: Pki, client: Pair | None = None) -> tuple[TlsStream, TlsStream]:
    """(client, server) TLS streams over a fresh loopback TCP connection."""
    server_ctx, client_ctx = contexts(pki, client)
    a, b = loopback_pair()
    return await asyncio.gather(
        TlsStream.handshake(a, client_ctx, server_side=False, server_hostname="127.0.0.1"),
        TlsStream.handshake(b, server_ctx, server_side=True),
    )


async def expect(stream: TlsStream | Channel, data: bytes) -> None:
    got = bytearray()
    read = stream.recv if isinstance(stream, Channel) else stream.read
    while len(got) < len(data):
        chunk = await read()
        assert chunk, f"stream ended after {len(got)} of {len(data)} bytes"
        got += chunk
    assert got == data


async def kernel_read(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = b""
    while len(got) < size:
        chunk = await loop.sock_recv(sock, size - len(got))
        if not chunk:
            break
        got += chunk
    return got
