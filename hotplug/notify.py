"""systemd's notify protocol (READY, STATUS, WATCHDOG, RELOADING, STOPPING).

A no-op outside systemd (no NOTIFY_SOCKET). RELOADING follows systemd's
Type=notify-reload convention: it carries MONOTONIC_USEC so systemd can tell
when the reload finished.
"""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        if self._notifier is not None and self._notifier.socket is not None:
            # A full notify queue (systemd busy, or a test not reading) must
            # cost a lost message, never a blocked event loop.
            self._notifier.socket.setblocking(False)
        self.last_status = ""

    def _send(self, text: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(text)

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self.last_status = status

    def status(self, text: str) -> None:
        if text != self.last_status:
            self.last_status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half the watchdog timeout systemd asked for, in seconds, or None."""
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec or not usec.isdigit():
            return None
        pid = os.environ.get("WATCHDOG_PID")
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None
        return int(usec) / 2e6
