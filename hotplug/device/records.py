"""The device side's export records under /run: to whom each device is exported,
since when, by whom (`connect` or the daemon), so that a restart or the other
writer knows. The kernel stays the authority on whether it is exported."""

from __future__ import annotations

from hotplug.state import RecordDir, default_dir


def exports_dir() -> RecordDir:
    """One record per device exported by `connect` or the daemon: to whom, since when."""
    return RecordDir(default_dir("device") / "exports")
