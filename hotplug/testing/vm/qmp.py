"""QMP, QEMU's machine protocol, for the test VM: the host's client, and the
channel through which tests inside the guest use it.

The client (`QmpClient`, host side) speaks QMP as QEMU documents it: JSON
objects, one per line, over the unix socket QEMU was started with (`-qmp
unix:PATH,server=on,wait=off`); a greeting, `qmp_capabilities`, then commands,
each answered by `{"return": ...}` or `{"error": {"class", "desc"}}`, with
asynchronous events (`{"event": ...}`) in between. Thirty lines of stdlib did
not justify a dependency.

The channel lets an in-guest test ask the host for a QMP command while the
guest's pytest session runs (the guest has no way to reach the QMP socket):

1. guest, `qmp()`: writes one line to the kernel's log, `/dev/kmsg`:
   `usbip-qmp: {"id": ..., "execute": ..., "arguments": ...}` at level notice,
   which the kernel prints on the console the host already reads live (the
   same path as the `usbip-test:` markers of tests/vm/conftest.py);
2. host, `QmpChannel.feed()` (a console watcher of `GuestVM`): picks the
   request off the console and hands it to its worker thread, which runs it
   on QMP and writes the reply, as QMP gave it, to `qmp/<id>.json` in the
   exchange directory (a host directory shared read-only with the guest over
   9p, uncached), atomically (a rename);
3. guest: waits for that file, bounded, and returns `reply["return"]` or
   raises `QmpError`.

The request sits in the guest's kernel log next to what the kernel made of it
(a device_add, then `usb 1-1: new SuperSpeed USB device`), which is where one
looks when a test fails. Standard library only.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hotplug.testing.vm.kernels import VMError
from hotplug.testing.vm.kmsg import QMP_MARK

# The request line's marker in the kernel log. The host reads nothing else of
# such a line; the kernel-log judge (kmsg.py) keeps these lines out of its
# fault search.
REQUEST_MARK = QMP_MARK
# Where the guest sees the exchange directory (guest.py mounts it at boot) and
# where the replies are, relative to it.
GUEST_EXCHANGE = "/run/usbip-vm/exchange"
REPLIES = "qmp"
# /dev/kmsg takes records of up to ~1 KiB; a request must fit in one.
MAX_REQUEST = 900
DEFAULT_TIMEOUT = 60.0  # a command under emulation on a busy host, request to reply
# The guest waits this much longer than the command's timeout: the host's own
# timeout then answers first, with what went wrong.
REPLY_MARGIN = 5.0


class QmpError(VMError):
    """QEMU refused a command (`error_class` is QMP's class, e.g. GenericError),
    or the command could not be carried to QEMU and back."""

    def __init__(self, message: str, error_class: str = "HarnessError") -> None:
        super().__init__(message)
        self.error_class = error_class


# ---------------------------------------------------------------------------
# host side: the client


class QmpClient:
    """One QMP connection; thread-safe (one command at a time), connects lazily."""

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def connect(self) -> None:
        """Connect, read the greeting and leave capabilities negotiation mode."""
        with self._lock:
            self._connect()

    def _connect(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise QmpError(f"cannot connect to QEMU's QMP socket {self.path}: {e}") from e
        self._sock, self._buf = sock, b""
        try:
            deadline = time.monotonic() + self.timeout
            greeting = self._read_message(deadline)
            if "QMP" not in greeting:
                raise QmpError(f"{self.path}: not a QMP greeting: {greeting}")
            self.greeting = greeting
            self._command("qmp_capabilities", None, deadline)
        except BaseException:
            self._drop()
            raise

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one command; its `return` value, or QmpError with QEMU's class and text."""
        with self._lock:
            self._connect()
            deadline = time.monotonic() + (timeout or self.timeout)
            try:
                return self._command(command, arguments, deadline)
            except (OSError, ValueError) as e:
                self._drop()  # the stream is in an unknown state: start afresh next time
                raise QmpError(f"QMP {command}: {e}") from e

    def _command(self, command: str, arguments: Mapping[str, Any] | None, deadline: float) -> Any:
        rid = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": rid}
        if arguments:
            msg["arguments"] = dict(arguments)
        assert self._sock is not None
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != rid:
                continue  # an answer to a command whose wait timed out earlier
            if "error" in reply:
                err = reply["error"]
                raise QmpError(
                    f"QMP {command}: {err.get('desc', err)}", str(err.get("class", "GenericError"))
                )
            return reply.get("return")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"no answer on QMP socket {self.path} in time")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                self._drop()
                raise QmpError(f"QEMU closed the QMP socket {self.path}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError(f"not a QMP message: {line[:200]!r}")
        return msg

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock, self._buf = None, b""

    def close(self) -> None:
        with self._lock:
            self._drop()


# ---------------------------------------------------------------------------
# host side: serving the guest's requests


class QmpChannel:
    """Runs the guest's QMP requests (seen on its console) and writes the replies
    where the guest waits for them (`replies`, inside the exchange directory)."""

    def __init__(
        self, client: QmpClient, replies: Path, *, log: Callable[[str], None] | None = None
    ) -> None:
        self.client = client
        self.replies = replies
        self.replies.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.served = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="vm-qmp", daemon=True)
        self._thread.start()

    def feed(self, line: str) -> None:
        """A console line; requests go to the worker (the console reader must not wait)."""
        if REQUEST_MARK not in line:
            return
        text = line.partition(REQUEST_MARK)[2].strip()
        try:
            request = json.loads(text)
            if not isinstance(request, dict) or not _valid_id(request.get("id")):
                raise ValueError("no valid id")
        except ValueError as e:
            self._say(f"ignoring a malformed QMP request from the guest ({e}): {text[:200]}")
            return
        self._queue.put(request)

    def _serve(self) -> None:
        while (request := self._queue.get()) is not None:
            rid = str(request["id"])
            command = request.get("execute")
            try:
                if not isinstance(command, str):
                    raise QmpError("the request names no command ('execute')")
                arguments = request.get("arguments") or {}
                timeout = request.get("timeout")
                if not isinstance(timeout, int | float) or not 0 < timeout <= 600:
                    timeout = None
                reply: dict[str, Any] = {
                    "return": self.client.execute(
                        command, arguments, timeout=request.get("timeout")
                    )
                }
            except QmpError as e:
                reply = {"error": {"class": e.error_class, "desc": str(e)}}
            self._write_reply(rid, reply)
            self.served += 1

    def _write_reply(self, rid: str, reply: Mapping[str, Any]) -> None:
        tmp = self.replies / f".{rid}.tmp"
        tmp.write_text(json.dumps(reply))
        os.replace(tmp, self.replies / f"{rid}.json")  # the guest never sees half a file

    def _say(self, text: str) -> None:
        if self.log is not None:
            self.log(text)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)
        self.client.close()


def _valid_id(rid: object) -> bool:
    """Ids become file names: letters, digits, '-' and '_' only."""
    return (
        isinstance(rid, str) and 0 < len(rid) <= 64 and all(c.isalnum() or c in "-_" for c in rid)
    )


# ---------------------------------------------------------------------------
# guest side

_request_ids = itertools.count(1)


def qmp(
    execute: str,
    arguments: Mapping[str, Any] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    exchange: str | Path = GUEST_EXCHANGE,
    kmsg: str | Path = "/dev/kmsg",
) -> Any:
    """Inside the guest: run one QMP command on the host's QEMU and return its
    `return` value; QmpError if QEMU refused it or no reply came within `timeout`."""
    replies = Path(exchange) / REPLIES
    if not replies.is_dir():
        raise QmpError(
            f"{replies} does not exist: not inside the test VM, or its exchange directory"
            " was not mounted (see the boot's console log)"
        )
    rid = f"{os.getpid()}-{next(_request_ids)}-{os.urandom(4).hex()}"
    request: dict[str, Any] = {"id": rid, "execute": execute, "timeout": timeout}
    if arguments:
        request["arguments"] = dict(arguments)
    line = f"<5>{REQUEST_MARK} {json.dumps(request, separators=(',', ':'))}\n"
    if len(line) > MAX_REQUEST:
        raise QmpError(f"QMP request of {len(line)} bytes is too long for one kernel log record")
    with open(kmsg, "w") as log:  # a new open file: its own rate limit
        log.write(line)
    reply_file = replies / f"{rid}.json"
    deadline = time.monotonic() + timeout + REPLY_MARGIN
    while True:
        try:
            reply = json.loads(reply_file.read_text())
            break
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise QmpError(
                    f"QMP {execute}: no reply from the host within {timeout + REPLY_MARGIN:.1f}s"
                    f" (request {rid}; is the guest's console reaching the host?)"
                ) from None
            time.sleep(0.02)  # polling a 9p file: the host writes it whenever QEMU answers
    if "error" in reply:
        err = reply["error"]
        raise QmpError(str(err.get("desc")), str(err.get("class", "GenericError")))
    return reply.get("return")
