"""Shared test helpers: waiting for a condition, systemd's notify socket, a test
policy. Starting our programs and the fake kernel is tests/rig.py's job."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from hotplug.usb import Speed
from hotplug.wire.protocol import DeviceRecord

T = TypeVar("T")


# No wait gives up sooner than this: `timeout` says how long a condition takes
# on an idle machine, and a loaded one (CI neighbours, parallel VM runs) can be
# several times slower. A condition that holds returns at once, so a longer
# bound costs nothing when the test passes.
WAIT_FLOOR = 15.0


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout`
    seconds (at least WAIT_FLOOR)."""
    timeout = max(timeout, WAIT_FLOOR)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Child(Protocol):
    """A child process as NotifySocket.wait watches it (Popen, the guest's Program)."""

    returncode: int | None

    def poll(self) -> int | None: ...


class NotifySocket:
    """Plays systemd's side of sd_notify for a child process."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[dict[str, str]] = []

    def wait(self, key: str, timeout: float = 10.0, proc: Child | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            if proc is not None and proc.poll() is not None:
                stderr = getattr(proc, "stderr", None)  # the guest's Program has none
                err = stderr.read() if stderr else ""
                raise AssertionError(f"process exited with {proc.returncode} before {key}: {err}")
            for message in self.messages:
                if key in message:
                    self.messages.remove(message)
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key} notification within {timeout} s")
            self.sock.settimeout(min(remaining, 0.2))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def close(self) -> None:
        self.sock.close()


def disk_policy(
    address: str, serial_glob: str, *, rule: str = "test-disks", broken: bool = False, **target: str
) -> str:
    """A policy exporting Linux Foundation gadgets (vendor 1d6b) whose serial matches
    `serial_glob` to one target `lab` at `address`; `target` adds keys to it (YAML
    text values). `broken` appends a rule with a bad vendor, for the error paths."""
    lines = ["version: 1", "targets:", "  lab:", f'    address: "{address}"']
    lines += [f"    {key}: {value}" for key, value in target.items()]
    lines += ["rules:", f"  - name: {rule}", "    match:", '      vendor: "1d6b"']
    lines += [f'      serial: "{serial_glob}"', "    export: lab"]
    if broken:
        lines += ["  - name: broken", "    match:", '      vendor: "zz"', "    export: lab"]
    return "\n".join(lines) + "\n"


def disk_record(
    busid: str = "1-1", *, busnum: int = 1, devnum: int = 2, **known: Any
) -> DeviceRecord:
    """The USB/IP record of a Linux Foundation disk (1d6b:0104, high speed, one
    configuration, one interface) at `busid` of bus `busnum`; `known` overrides."""
    fields: dict[str, Any] = {
        "path": f"/sys/devices/pci0000:00/usb{busnum}/{busid}",
        "speed": Speed.HIGH,
        "id_vendor": 0x1D6B,
        "id_product": 0x0104,
        "bcd_device": 0x0100,
        "configuration_value": 1,
        "num_configurations": 1,
        "num_interfaces": 1,
    }
    return DeviceRecord.bare(busid, busnum=busnum, devnum=devnum, **{**fields, **known})


@contextmanager
def loopback_server(
    handle: Callable[[socket.socket], None], *, threaded: bool = False
) -> Iterator[int]:
    """A TCP server on 127.0.0.1 for one block, yielding its port, calling
    `handle(conn)` for each connection: in the accepting thread, the connection
    held open until the block ends; or, `threaded`, in a thread of its own that
    owns the connection (a stand-in for a slow or stateful peer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if threaded:
                threading.Thread(target=handle, args=(conn,), daemon=True).start()
            else:
                held.append(conn)
                handle(conn)

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join(timeout=5)
        listener.close()
        for conn in held:
            conn.close()
