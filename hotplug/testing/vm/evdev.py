"""Key events from an evdev node (/dev/input/eventN), as the guest tests read them."""

from __future__ import annotations

import os
import select
import struct
import time

INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on 64-bit: time, type, code, value
EV_KEY = 0x01
KEY_A, KEY_B = 30, 48  # what hid-input maps the keyboard page's usages 0x04, 0x05 to


def read_keys(
    fd: int, timeout: float, until: tuple[int, int] | None = None
) -> list[tuple[int, int]]:
    """(code, value) of the EV_KEY events read from an evdev fd (opened O_NONBLOCK)
    until `until` is among them (None: until the first press) or `timeout`
    seconds pass; bounded selects, never a blocking read."""
    keys: list[tuple[int, int]] = []

    def done() -> bool:
        if until is None:
            return any(value == 1 for _, value in keys)
        return until in keys

    deadline = time.monotonic() + timeout
    while not done() and (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        data = os.read(fd, INPUT_EVENT.size * 64)
        for off in range(0, len(data) - INPUT_EVENT.size + 1, INPUT_EVENT.size):
            _, _, kind, code, value = INPUT_EVENT.unpack_from(data, off)
            if kind == EV_KEY:
                keys.append((code, value))
    return keys


def drain(fd: int) -> None:
    """Read and drop what is queued on an evdev fd (opened O_NONBLOCK)."""
    while select.select([fd], [], [], 0)[0]:
        if not os.read(fd, INPUT_EVENT.size * 64):
            return
