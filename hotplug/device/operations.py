"""Blocking work of the daemon, each operation in a thread of its own.

An export, unexport or release writes to sysfs and talks to a target: it
blocks. Each runs in its own thread (`in_thread`), at most one per device,
bounded by its target's timeouts (plus KERNEL_SLACK for the sysfs writes), so
that a slow or dead target only ever delays its own device. Threads and not
the default executor: a few black-hole targets must not use up a small pool
and make everyone else queue. `Canceller` lets the loop cut a handshake short.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

from hotplug import log
from hotplug.device.transport import ExportError

# The daemon's own lines: these are part of its story.
logger = log.get("hotplug.daemon")

T = TypeVar("T")

# Sysfs writes (to the real kernel, or to the fake one over a socket) get this
# much on top of a target's own connect and handshake timeouts.
KERNEL_SLACK = 10.0


class Canceller:
    """Lets the loop cut short a handshake that runs in a thread.

    The export thread registers its socket as soon as it is connected;
    `fire()` shuts the socket down, which wakes the thread's blocked recv,
    and the export rolls back as on any failure.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.fired = False

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self.fired:
                raise ExportError("cancelled before the handshake")
            self._sock = sock

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                with contextlib.suppress(OSError):  # EBADF: export closed it already
                    self._sock.shutdown(socket.SHUT_RDWR)

    def forget(self) -> None:
        """The export is over; from now on the socket (if any) is the kernel's."""
        with self._lock:
            self._sock = None


async def in_thread(
    name: str, fn: Callable[[], T], limit: float, canceller: Canceller | None = None
) -> T:
    """Run `fn` in a thread of its own; wait for it without blocking the loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def runner() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=runner, name=name, daemon=True).start()
    done, _ = await asyncio.wait({future}, timeout=limit)
    if not done:
        cut = "; cutting it short" if canceller is not None else ""
        logger.warning("%s: still running after %.0f s%s", name, limit, cut)
        if canceller is not None:
            canceller.fire()
    return await future  # the kernel layer and socket timeouts bound the rest
