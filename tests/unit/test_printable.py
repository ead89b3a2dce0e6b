"""The one escaping helper for human output and logs (issue 12, finding 13)."""

from __future__ import annotations

import logging

from hotplug.log import StderrFormatter
from hotplug.printable import printable


def test_controls_and_bidi_are_escaped_and_the_rest_is_kept() -> None:
    """Issue 12, finding 13: C0, DEL, C1, bidi controls and line separators are
    written as escapes; accents, CJK and emoji are not touched."""
    assert printable("Totally Legit\x1b[8m hidden") == "Totally Legit\\x1b[8m hidden"
    assert printable("a\x00\x07\x7f\x85\x9b") == "a\\x00\\x07\\x7f\\x85\\x9b"
    assert printable("\u202egnp.exe\u2066\u2069\u200f\u061c") == (
        "\\u202egnp.exe\\u2066\\u2069\\u200f\\u061c"
    )
    assert printable("x\ny\tz\r\u2028") == "x\\ny\\tz\\r\\u2028"
    assert printable("Élan 日本 🎹") == "Élan 日本 🎹"
    assert printable("one\ntwo\x1b", keep="\n") == "one\ntwo\\x1b"


def test_stderr_log_lines_escape_messages_and_fields() -> None:
    """Issue 12, finding 13: a log line cannot carry a raw escape, and a newline in
    a message cannot start a line that reads as a log line of its own."""
    message = "p\x1b[2J\nfake: x"
    record = logging.LogRecord("hotplug.daemon", logging.INFO, "f", 1, message, (), None)
    record.usbip_fields = {"rule": "r\x1b]0;t\x07"}
    line = StderrFormatter(with_time=False).format(record)
    assert line == "hotplug.daemon: p\\x1b[2J\n  fake: x rule=r\\x1b]0;t\\x07"
