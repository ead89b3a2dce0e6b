"""Noticing that the policy files changed, without inotify (not in the stdlib).

A fingerprint is (name, inode, size, mtime) of every file `load_policy` would
read, plus the policy.d directory itself (its mtime changes when a file is
added, removed or renamed in it). Compared every couple of seconds it costs a
few stat() calls. The inode catches editors that replace the file
atomically; size and mtime_ns catch in-place writes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hotplug.device.policy import DEFAULT_CONFIG_DIR, DROPIN_DIR, MAIN_FILE

Fingerprint = tuple[tuple[str, int, int, int], ...]


def _stat(path: Path) -> tuple[str, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), -1, -1, -1)
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def policy_files(path: Path | None) -> list[Path]:
    """The paths whose change means the policy may have changed."""
    base = path if path is not None else DEFAULT_CONFIG_DIR
    if not base.is_dir():
        return [base]
    dropins = base / DROPIN_DIR
    paths = [base / MAIN_FILE, dropins]
    with contextlib.suppress(OSError):  # no policy.d: only policy.yaml counts
        paths.extend(sorted(p for p in dropins.iterdir() if not p.name.startswith(".")))
    return paths


def fingerprint(path: Path | None) -> Fingerprint:
    return tuple(_stat(p) for p in policy_files(path))


class PolicyWatcher:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.last = fingerprint(path)

    def changed(self) -> bool:
        """True once per change: the next call compares with the new state."""
        now = fingerprint(self.path)
        if now == self.last:
            return False
        self.last = now
        return True

    def mark(self) -> None:
        """Take the files as they are now as seen (after a reload by SIGHUP)."""
        self.last = fingerprint(self.path)
