"""Structured logging: journald fields when running under systemd, plain stderr otherwise.

Every event is logged with `event(logger, level, message, busid=..., target=...)`;
the keyword fields become journal fields (USBIP_BUSID, USBIP_TARGET, ...), so
`journalctl USBIP_BUSID=1-1.2` tells one device's story. On stderr they are
appended as key=value so the same facts are there without a journal.

The journal's native protocol (newline-separated FIELD=value datagrams on
/run/systemd/journal/socket) is small enough to speak directly, which saves a
compiled dependency (python-systemd) on every install.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from typing import Any

from hotplug.printable import printable

JOURNAL_SOCKET = "/run/systemd/journal/socket"
FIELDS_ATTR = "usbip_fields"

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def event(logger: logging.Logger, level: int, message: str, **fields: object) -> None:
    clean = {k: v for k, v in fields.items() if v is not None}
    logger.log(level, message, extra={FIELDS_ATTR: clean}, stacklevel=2)


def journal_field_name(key: str) -> str:
    return "USBIP_" + key.upper()


def _fields_of(record: logging.LogRecord) -> dict[str, object]:
    fields = getattr(record, FIELDS_ATTR, None)
    return dict(fields) if isinstance(fields, dict) else {}


class StderrFormatter(logging.Formatter):
    def __init__(self, with_time: bool) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.with_time:
            parts.append(self.formatTime(record, "%H:%M:%S"))
        parts.append(f"{record.name}: {_message(record.getMessage())}")
        fields = _fields_of(record)
        if fields:
            parts.append(" ".join(f"{k}={_quote(v)}" for k, v in fields.items()))
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + printable(self.formatException(record.exc_info), keep="\n")
        return text


def _message(text: str) -> str:
    """Escaped (USB strings reach messages); a message of several lines (a list of
    policy errors) keeps them, indented, so no line of it reads as a log line."""
    return printable(text, keep="\n").replace("\n", "\n  ")


def _quote(value: object) -> str:
    text = printable(str(value))
    return repr(text) if (" " in text or not text) else text


class JournalHandler(logging.Handler):
    """Sends records to journald over its native datagram socket."""

    def __init__(self, identifier: str, path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            fields: dict[str, object] = {
                "MESSAGE": printable(message, keep="\n"),
                "PRIORITY": _PRIORITY.get(record.levelno, 6),
                "SYSLOG_IDENTIFIER": self.identifier,
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,
                "CODE_FUNC": record.funcName,
                "LOGGER": record.name,
            }
            for key, value in _fields_of(record).items():
                fields[journal_field_name(key)] = printable(str(value))
            self.sock.sendto(encode_journal(fields), self.path)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def encode_journal(fields: dict[str, object]) -> bytes:
    out = bytearray()
    for key, value in fields.items():
        data = str(value).encode("utf-8", "replace")
        if b"\n" in data:
            # Multi-line values use the length-prefixed form of the protocol.
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def _journal_wanted() -> bool:
    # JOURNAL_STREAM is set by systemd when stderr is connected to the journal.
    return bool(os.environ.get("JOURNAL_STREAM")) and os.path.exists(JOURNAL_SOCKET)


def setup(identifier: str, verbose: bool = False, force_stderr: bool = False) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    if not force_stderr and _journal_wanted():
        root.addHandler(JournalHandler(identifier))
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(StderrFormatter(with_time=sys.stderr.isatty()))
        root.addHandler(stream)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def get(name: str) -> logging.Logger:
    return logging.getLogger(name)


def fields_for_test(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record (for tests asserting on log content)."""
    return _fields_of(record)


class Throttle:
    """At most `burst` lines per kind every `window` seconds, then one line with
    how many were left out: a flood (refused strangers, a device that plugs and
    unplugs itself over and over) must not flood the log.

    `summary` is a format string with {count}, {kind} and {window}; if
    `kind_field` is given, the kind goes into that journal field as well
    (e.g. "busid", so `journalctl USBIP_BUSID=...` shows the count too).
    """

    def __init__(
        self,
        logger: logging.Logger,
        burst: int,
        window: float,
        summary: str,
        kind_field: str | None = None,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self.summary = summary
        self.kind_field = kind_field
        self.windows: dict[str, tuple[float, int, int]] = {}  # kind -> (start, logged, dropped)

    def log(self, level: int, kind: str, message: str, now: float, **fields: object) -> None:
        """`now` is time.monotonic() (given, so tests and callers share one clock)."""
        start, logged, dropped = self.windows.get(kind, (now, 0, 0))
        if now - start >= self.window:
            self._report(kind, dropped)
            start, logged, dropped = now, 0, 0
        if logged < self.burst:
            self.logger.log(level, message, extra={FIELDS_ATTR: _clean(fields)}, stacklevel=2)
            logged += 1
        else:
            dropped += 1
        self.windows[kind] = (start, logged, dropped)

    def flush(self, now: float) -> None:
        """Report the windows that are over (call it now and then: a flood that
        stopped sends no more lines to trigger its count)."""
        for kind, (start, _, dropped) in list(self.windows.items()):
            if now - start >= self.window:
                self._report(kind, dropped)
                del self.windows[kind]

    def _report(self, kind: str, dropped: int) -> None:
        if not dropped:
            return
        fields: dict[str, object] = {"event": "throttled"}
        if self.kind_field is not None:
            fields[self.kind_field] = kind
        message = self.summary.format(count=dropped, kind=kind, window=self.window)
        self.logger.log(logging.WARNING, message, extra={FIELDS_ATTR: fields})


def _clean(fields: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in fields.items() if v is not None}
