"""What survives a restart: small JSON records under /run, written atomically.

The kernel is the authority on whether a device is exported (usbip_status) or
a vhci port is used (status); these records only add what the kernel cannot
know: to which target, since when, on behalf of which rule. Readers always
check them against the kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEVICE_SIDE_DIR = "/run/usbip-hotplug"
APP_SIDE_DIR = "/run/usbipa"


def default_dir(kind: str) -> Path:
    env = os.environ.get("USBIP_HOTPLUG_STATE_DIR" if kind == "device" else "USBIPA_STATE_DIR")
    return Path(env or (DEVICE_SIDE_DIR if kind == "device" else APP_SIDE_DIR))


class StateError(Exception):
    pass


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never half."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
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
