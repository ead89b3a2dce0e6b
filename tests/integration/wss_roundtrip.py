"""A wss:// channel both ways over real TLS on a socket pair, on whatever websockets
this interpreter has (run as a program by test_websockets_versions.py).

    python wss_roundtrip.py CA CERT KEY

Prints "ok websockets X.Y" or fails with a traceback. Kept free of test-only
packages: Debian's /usr/bin/python3 runs it with nothing but the package's
dependencies installed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys

import websockets.version

from hotplug.wire.channel import ChannelError, TlsStream, WebSocketChannel

PATH = "/usbip"
UPLOAD = bytes(range(256)) * 1200  # several WebSocket messages (one per channel chunk)


async def tls_pair(ca: str, cert: str, key: str) -> tuple[TlsStream, TlsStream]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=ca)
    a, b = socket.socketpair()
    return await asyncio.gather(
        TlsStream.handshake(a, server_ctx, server_side=True),
        TlsStream.handshake(b, client_ctx, server_side=False, server_hostname="localhost"),
    )


async def read_all(channel: WebSocketChannel, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await channel.recv()
        assert chunk, f"stream ended after {len(data)} of {size} bytes"
        data += chunk
    return data


async def round_trip(ca: str, cert: str, key: str) -> None:
    s, c = await tls_pair(ca, cert, key)
    server, client = await asyncio.gather(
        WebSocketChannel.server(s, PATH), WebSocketChannel.client(c, "localhost", 443, PATH)
    )
    # Concurrently: the socket pair's buffers are smaller than the upload.
    _, received = await asyncio.gather(client.send(UPLOAD), read_all(server, len(UPLOAD)))
    assert received == UPLOAD
    await server.send(b"reply")
    assert await read_all(client, 5) == b"reply"
    await client.close()  # a close frame, then the socket closes without waiting
    try:
        end = await server.recv()
    except BrokenPipeError:  # the server's close reply met the closed socket: also the end
        end = b""
    assert end == b"", end
    server.abort()


async def wrong_path(ca: str, cert: str, key: str) -> None:
    s, c = await tls_pair(ca, cert, key)
    results = await asyncio.gather(
        WebSocketChannel.server(s, PATH),
        WebSocketChannel.client(c, "localhost", 443, "/elsewhere"),
        return_exceptions=True,
    )
    assert all(isinstance(r, ChannelError) for r in results), results
    assert "'/elsewhere', which is not '/usbip'" in str(results[0]), results[0]
    assert "refused: HTTP 404" in str(results[1]), results[1]
    s.abort()
    c.abort()


async def main(ca: str, cert: str, key: str) -> None:
    async with asyncio.timeout(30):
        await round_trip(ca, cert, key)
        await wrong_path(ca, cert, key)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
    print(f"ok websockets {websockets.version.version}")
