"""usbipa's `Appd` served on an event loop in a thread of the test process, for
the fault tests that must see inside it (its tasks, counters and sessions; the
sockets it hands to vhci): the bookkeeping and keepalive tests.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from hotplug.app.server import Appd
from hotplug.wire.address import Endpoint


class LoopThread:
    """An Appd serving on its own event loop in a background thread."""

    def __init__(self, appd: Appd) -> None:
        self.appd = appd
        self.loop = asyncio.new_event_loop()
        self.unhandled: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.unhandled.append(context))
        appd.open_listeners()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(appd.serve(),))
        self.thread.start()

    @property
    def port(self) -> int:
        return self.appd.bound_port

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    def books(self) -> tuple[int, int, dict[str, int], int]:
        async def read() -> tuple[int, int, dict[str, int], int]:
            a = self.appd
            return len(a.tasks), a.total_connections, dict(a.connections), len(a.sessions.by_port)

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(5)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.appd.stop)
        self.thread.join(timeout=10)
        self.loop.close()
