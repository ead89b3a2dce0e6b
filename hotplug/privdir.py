"""The state directories (/run/usbip-hotplug, /run/usbipa): ours alone, 0700.

They hold the control socket and the records that say which device is
exported where. A directory left more open (made by hand, by an older
version, or by `mkdir -p` of a parent) is tightened; one that belongs to
another user, or is not a plain directory, is refused: its owner could swap
our records or our socket.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hotplug.state import StateError

__all__ = ["ensure_private_dir"]


def ensure_private_dir(path: Path) -> bool:
    """Make `path` (and missing parents) and leave it 0700; True if an existing
    directory had to be tightened. Raises StateError with what to do."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = os.lstat(path)
    except OSError as exc:
        raise StateError(f"cannot create state directory {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise StateError(f"state directory {path} is not a directory (a symlink?): remove it")
    if info.st_uid != os.geteuid():
        raise StateError(
            f"state directory {path} belongs to uid {info.st_uid}, not to us "
            f"(uid {os.geteuid()}): remove it, or give it to us with chown"
        )
    if stat.S_IMODE(info.st_mode) == 0o700:
        return False
    try:
        os.chmod(path, 0o700)
    except OSError as exc:
        raise StateError(f"cannot make state directory {path} 0700: {exc.strerror}") from exc
    return True
