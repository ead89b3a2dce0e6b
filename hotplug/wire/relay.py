"""Getting an encrypted session's bytes to the kernel: a loopback pair and a relay.

usbip-host and vhci_hcd take a plain connected stream socket, so for tls://
and wss:// the kernel gets one end of a loopback TCP connection made for this
session alone, and `relay()` moves bytes between the other end and the
encrypted channel:

- cheap: the data phase runs in a thread of its own, one small poll loop over
  the two sockets, all non-blocking: no asyncio task, future or callback per
  message (under emulation those dominated a USB/IP round trip). 256 KiB
  reads into one reused buffer, several TLS records read per wake-up and
  handed on in one write; for tls:// with kTLS (the kernel encrypts) the
  kernel's bytes are spliced through a pipe into the TLS socket, never
  copied through Python. TCP_NODELAY on the loopback ends (USB/IP is
  request/response);
- backpressure both ways: a direction reads only once what it read before is
  written out; until then its source is not polled for reading;
- link loss is the kernel's to see: the moment the outer connection ends or
  fails, the kernel's end is shut down and closed, so usbip-host / vhci_hcd
  tear the data phase down exactly as when a plain TCP link dies, and the
  usual link-loss handling (re-export, port reaping) works unchanged;
- private: the listener is bound to 127.0.0.1, accepts only the connection
  from the port we connected from, and is closed once the pair exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable

from hotplug.wire.channel import CHUNK, END, WANT_READ, WANT_WRITE, Channel, ChannelError

PAIR_TIMEOUT = 5.0
_TROUBLE = select.POLLERR | select.POLLHUP  # reported whatever was asked: the next call says what
STOP_TIMEOUT = 5.0  # the relay's thread ends at once when told; this only bounds a bug
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
    (direction, size) is told of each chunk: "from_peer" or "to_peer" (from
    the relay's thread)."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[tuple[str, bool]] = loop.create_future()
    session = _Session(outer, inner, pending, count)

    def run() -> None:
        try:
            outcome = session.run()
        except BaseException as exc:  # reported below, never lost in the thread
            outcome = (_why(exc), False)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(_settle, ended, outcome)

    thread = threading.Thread(target=run, name="relay", daemon=True)
    thread.start()
    try:
        why, kernel_ended = await asyncio.shield(ended)
    except asyncio.CancelledError:
        session.stop()  # the daemon is stopping
        thread.join(STOP_TIMEOUT)
        session.close(thread)
        outer.abort()
        raise
    thread.join(STOP_TIMEOUT)  # it has returned: this is at once
    session.close(thread)
    if kernel_ended:
        await outer.close()  # the kernel ended the session: say goodbye properly
    else:
        await outer.relay_done()
        outer.abort()
    return why


def _settle(future: asyncio.Future[tuple[str, bool]], outcome: tuple[str, bool]) -> None:
    if not future.done():
        future.set_result(outcome)


class _Session:
    """The data phase of one session, in the relay's thread.

    Two flows share one poll loop. Kernel to peer: read the kernel's socket
    (or splice it into a pipe) only while nothing read before is still
    waiting to go out; then send to the peer as far as the socket takes it.
    Peer to kernel: read the channel (TLS records, WebSocket frames) only while
    nothing is still waiting for the kernel's socket; OpenSSL may hold bytes
    already decrypted, which no poll announces, so those are read first.
    """

    def __init__(
        self,
        outer: Channel,
        inner: socket.socket,
        pending: bytes,
        count: Callable[[str, int], None] | None,
    ) -> None:
        self.outer = outer
        self.inner = inner
        self.to_kernel: memoryview = memoryview(pending)
        self.count = count or (lambda direction, size: None)
        self.stop_r, self.stop_w = os.pipe()
        os.set_blocking(self.stop_w, False)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.stop_w, b"x")

    def close(self, thread: threading.Thread) -> None:
        """Once the thread is gone (the pipe is the caller's: stop() may race the end)."""
        if thread.is_alive():
            return  # a bug kept it: leak two fds rather than close them under it
        os.close(self.stop_r)
        os.close(self.stop_w)

    def run(self) -> tuple[str, bool]:
        """(why it ended, whether the kernel ended it cleanly)."""
        try:
            return self._loop()
        finally:
            # First: the kernel must see the link go at once.
            with contextlib.suppress(OSError):
                self.inner.shutdown(socket.SHUT_RDWR)
            self.inner.close()

    def _loop(self) -> tuple[str, bool]:
        outer, inner = self.outer, self.inner
        inner.setblocking(False)
        if self.to_kernel:
            self.count("from_peer", len(self.to_kernel))
        inner_fd, outer_fd = inner.fileno(), outer.relay_fd()
        splice_to = outer.splice_fd()
        pipe = _Pipe() if splice_to is not None else None
        buf_in = memoryview(bytearray(CHUNK))  # peer -> kernel
        buf_out = memoryview(bytearray(CHUNK))  # kernel -> peer
        poller = select.poll()
        poller.register(self.stop_r, select.POLLIN)
        registered: dict[int, int] = {}
        read_wants = select.POLLIN  # what reading the channel waits for
        flush_wants = 0  # what sending to the peer waits for (0: nothing queued)
        interval = outer.relay_timer()
        next_tick = time.monotonic() + interval if interval is not None else None
        try:
            while True:
                # -- what each socket is polled for. A socket with nothing to wait
                # for is left out: poll would report its hang-up over and over.
                inner_mask = 0 if flush_wants else select.POLLIN
                outer_mask = flush_wants
                if self.to_kernel:
                    inner_mask |= select.POLLOUT
                else:
                    outer_mask |= read_wants
                for fd, mask in ((inner_fd, inner_mask), (outer_fd, outer_mask)):
                    if registered.get(fd, 0) != mask:
                        if mask:
                            poller.register(fd, mask)  # again = modify
                            registered[fd] = mask
                        else:
                            poller.unregister(fd)
                            del registered[fd]
                buffered = not self.to_kernel and outer.relay_buffered()
                timeout: float | None = None
                if buffered:
                    timeout = 0  # OpenSSL holds decrypted bytes: no poll would say so
                elif next_tick is not None:
                    timeout = max(0.0, next_tick - time.monotonic()) * 1000
                events = dict(poller.poll(timeout))
                if self.stop_r in events:
                    return "stopped", False
                inner_ev = events.get(inner_fd, 0)
                outer_ev = events.get(outer_fd, 0)

                # -- peer -> kernel
                if self.to_kernel and inner_ev & (select.POLLOUT | _TROUBLE):
                    self._to_kernel()
                if not self.to_kernel and (buffered or outer_ev & (read_wants | _TROUBLE)):
                    data = outer.relay_read(buf_in)
                    if isinstance(data, int):
                        if data == END:
                            return "the peer closed the connection", False
                        read_wants = select.POLLOUT if data == WANT_WRITE else select.POLLIN
                    else:
                        read_wants = select.POLLIN
                        self.count("from_peer", len(data))
                        self.to_kernel = memoryview(data)
                        self._to_kernel()
                    if outer.outgoing and not flush_wants:
                        flush_wants = self._flush(pipe, splice_to)  # pongs, a close reply

                # -- kernel -> peer
                if flush_wants and outer_ev & (flush_wants | _TROUBLE):
                    flush_wants = self._flush(pipe, splice_to)
                if not flush_wants and inner_ev & ~select.POLLOUT:
                    if pipe is not None and splice_to is not None:
                        got = pipe.fill_from(inner_fd)
                    else:
                        got = _recv_into(inner, buf_out)
                        if got > 0:
                            outer.relay_queue(buf_out[:got])
                    if got == 0:
                        return "the local kernel closed the connection", True
                    if got > 0:
                        self.count("to_peer", got)
                        flush_wants = self._flush(pipe, splice_to)

                # -- keepalive
                if next_tick is not None and interval is not None:
                    now = time.monotonic()
                    if now >= next_tick:
                        if not outer.relay_tick():
                            return "keepalive ended", False
                        next_tick = now + interval
                        if not flush_wants:
                            flush_wants = self._flush(pipe, splice_to)
        finally:
            if pipe is not None:
                pipe.close()

    def _to_kernel(self) -> None:
        """Write what waits for the kernel, as far as its socket takes it."""
        try:
            sent = self.inner.send(self.to_kernel)
        except BlockingIOError:
            return
        self.to_kernel = self.to_kernel[sent:]

    def _flush(self, pipe: _Pipe | None, splice_to: int | None) -> int:
        """Send what waits for the peer; what the socket must become to take the rest
        (POLLOUT, or POLLIN while TLS waits for the peer), 0 if all is out."""
        if pipe is not None and splice_to is not None and pipe.size:
            return 0 if pipe.drain_to(splice_to) else select.POLLOUT
        status = self.outer.relay_flush()
        if status == WANT_READ:
            return select.POLLIN
        return select.POLLOUT if status == WANT_WRITE else 0


class _Pipe:
    """A pipe the kernel's bytes are spliced through into the TLS socket: from one
    socket to the other inside the kernel, which encrypts on the way (kTLS)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        with contextlib.suppress(OSError):  # a bigger pipe: fewer rounds for bulk data
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, CHUNK)
        self.size = 0  # bytes in the pipe

    def fill_from(self, fd: int) -> int:
        """Splice what the socket has into the pipe: the count, 0 at its end, -1 if none."""
        try:
            n = os.splice(fd, self.w, CHUNK, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return -1
        self.size += n
        return n

    def drain_to(self, fd: int) -> bool:
        """Splice the pipe into the socket as far as it takes; whether it is empty."""
        while self.size:
            try:
                self.size -= os.splice(self.r, fd, self.size, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                return False
        return True

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _recv_into(sock: socket.socket, buf: memoryview) -> int:
    """The count read, 0 at the end of the stream, -1 if nothing is there."""
    try:
        return sock.recv_into(buf)
    except BlockingIOError:
        return -1


def _why(error: BaseException) -> str:
    if isinstance(error, ChannelError):
        return str(error)
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error}"
    if isinstance(error, OSError):
        return f"connection lost: {error.strerror or error}"
    return f"relay failed: {error!r}"
