"""The baseline peer: accept, read 8 bytes, answer 8 bytes, close.

It is shaped like usbipa (one asyncio task per connection, `sock_recv` of the
exact size, TCP_NODELAY) but does nothing else, so a benchmark that measures
a bare connect + 8-byte exchange against it in the same run gets the floor
that loopback TCP and an asyncio server impose on this machine. Prints its
port on stdout, then serves until SIGTERM.

    python -m bench.echo_server
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys

REPLY = b"\x01\x11\x00\x06\x00\x00\x00\x00"  # an OP_REP_EXPORT header, status 0


async def _handle(conn: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with conn:
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = b""
        with contextlib.suppress(OSError):
            while len(got) < 8:
                chunk = await loop.sock_recv(conn, 8 - len(got))
                if not chunk:
                    return
                got += chunk
            await loop.sock_sendall(conn, REPLY)


async def serve(listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks: set[asyncio.Task[None]] = set()

    async def accept_loop() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(_handle(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = asyncio.create_task(accept_loop())
    await stop.wait()
    acceptor.cancel()


def main() -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)  # as usbipa
    listener.setblocking(False)
    print(listener.getsockname()[1], flush=True)
    sys.stdout.close()
    asyncio.run(serve(listener))


if __name__ == "__main__":
    main()
