"""log.py: the journal's native protocol."""

from __future__ import annotations

from hotplug.log import encode_journal


def test_journal_encoding_multiline() -> None:
    data = encode_journal({"MESSAGE": "a\nb", "USBIP_BUSID": "1-1"})
    assert data.startswith(b"MESSAGE\n\x03\x00\x00\x00\x00\x00\x00\x00a\nb\n")
    assert data.endswith(b"USBIP_BUSID=1-1\n")
