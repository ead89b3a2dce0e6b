"""What survives a restart: small JSON records under /run, written atomically.

The kernel is the authority on whether a device is exported (usbip_status) or
a vhci port is used (status); these records only add what the kernel cannot
know: to which target, since when, on behalf of which rule. Readers always
check them against the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hotplug.errors import HotplugError

DEVICE_SIDE_DIR = "/run/usbip-hotplug"
APP_SIDE_DIR = "/run/usbipa"


def default_dir(kind: str) -> Path:
    env = os.environ.get("USBIP_HOTPLUG_STATE_DIR" if kind == "device" else "USBIPA_STATE_DIR")
    return Path(env or (DEVICE_SIDE_DIR if kind == "device" else APP_SIDE_DIR))


class StateError(HotplugError):
    pass


class RecordTaken(StateError):
    """`RecordDir.claim` found a record there already; `existing` is what it says
    (None when it cannot be read: a damaged file, or a directory in the way)."""

    def __init__(self, path: Path, existing: dict[str, Any] | None) -> None:
        super().__init__(f"{path} exists already")
        self.existing = existing


class _Taken(Exception):
    """write_json_atomic(exclusive=True) found the name taken."""


def write_json_atomic(path: Path, data: Any, exclusive: bool = False) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never half.

    `exclusive`: only create it; _Taken if there is a file there already (link(2)
    is atomic, so of two writers racing for one name exactly one wins).
    """
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except FileExistsError:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise _Taken from None
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise StateError(f"cannot write state file {path}: {exc.strerror}") from exc


def read_json(path: Path) -> Any | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a damaged record is as good as none: the kernel is asked anyway


class RecordDir:
    """One JSON record per key (a busid, a port number) in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        if "/" in key or key.startswith("."):
            raise ValueError(f"bad record key {key!r}")
        return self.directory / f"{key}.json"

    def put(self, key: str, data: dict[str, Any]) -> None:
        write_json_atomic(self._path(key), data)

    def claim(self, key: str, data: dict[str, Any]) -> None:
        """Create the record only if there is none: two writers (the daemon and a
        `connect`) racing for one device cannot both get it. RecordTaken if taken."""
        try:
            write_json_atomic(self._path(key), data, exclusive=True)
        except _Taken:
            raise RecordTaken(self._path(key), self.get(key)) from None

    def get(self, key: str) -> dict[str, Any] | None:
        data = read_json(self._path(key))
        return data if isinstance(data, dict) else None

    def remove(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"cannot remove state file {self._path(key)}: {exc.strerror}") from exc

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(
                f"cannot read state directory {self.directory}: {exc.strerror}"
            ) from exc
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                data = read_json(self.directory / name)
                if isinstance(data, dict):
                    yield name[: -len(".json")], data


def writer_alive(record: dict[str, Any]) -> bool:
    """Whether the process that wrote `record` (its "pid") still runs.

    A record of a process that is gone is no one's claim, unless the kernel
    still holds the device it describes (the caller checks that). Records of
    older versions have no pid: their writer is taken to be gone.
    """
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


LOCK_NAME = "daemon.lock"


class AlreadyLocked(StateError):
    pass


class InstanceLock:
    """An exclusive flock(2) on `<state_dir>/daemon.lock`, held while open.

    The kernel drops it when the process ends, however it ends, so a lock file
    left behind by a killed daemon locks nothing. The file holds the owner's pid
    for the message the next one prints.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open the lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f"pid {holder}" if holder is not None else "another process"
                raise AlreadyLocked(
                    f"another usbip-hotplug daemon is running ({who} holds the lock on "
                    f"{self.path}); stop it first ('systemctl stop usbip-hotplug')"
                ) from None
            raise StateError(f"cannot lock {self.path}: {exc.strerror}") from exc
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None
