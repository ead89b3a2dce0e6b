"""Where the policy is read from: the one part of the policy that touches files.

`/etc/usbip-hotplug/policy.yaml`, then `/etc/usbip-hotplug/policy.d/*.yaml`
in file-name order (`load_policy`); the watcher (watch.py) stats the same
files to notice a change.
"""

from __future__ import annotations

from pathlib import Path

from hotplug import yamlnodes
from hotplug.device.policy import DEFAULT_CONFIG_DIR, DROPIN_DIR, MAIN_FILE
from hotplug.device.policy.merge import parse_policy
from hotplug.device.policy.model import Policy, PolicyError

# --------------------------------------------------------------------------
# I/O edge: the only function in this module that touches the file system.


def load_policy(path: str | Path | None = None) -> Policy:
    """Read the policy files and parse them.

    - None: `/etc/usbip-hotplug/policy.yaml` if present, then
      `/etc/usbip-hotplug/policy.d/*.yaml`. None of them present = the empty
      policy (exports nothing).
    - A directory DIR (`-c DIR`): the same layout below DIR; DIR must exist
      and hold policy.yaml or policy.d/.
    - A file (`-c FILE`): that file alone, without drop-ins.

    Drop-ins are `*.yaml` files directly in policy.d, in file-name order;
    hidden files are skipped; a `*.yml` file is an error (rename it), so it
    is not silently ignored. File names in errors are the paths as read.
    """
    explicit = path is not None
    base = Path(path) if path is not None else DEFAULT_CONFIG_DIR
    files: list[Path] = []
    try:
        if base.is_dir():
            main, dropins = base / MAIN_FILE, base / DROPIN_DIR
            if explicit and not main.exists() and not dropins.is_dir():
                raise PolicyError(
                    str(base), None, None, f"no {MAIN_FILE} and no {DROPIN_DIR}/ in this directory"
                )
            if main.exists():
                files.append(main)
            if dropins.is_dir():
                entries = sorted(dropins.iterdir(), key=lambda p: p.name)
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.name.endswith(".yml"):
                        raise PolicyError(
                            str(entry),
                            None,
                            None,
                            f"policy.d files must end in .yaml; rename it to {entry.stem}.yaml",
                        )
                    if entry.name.endswith(".yaml") and not entry.is_dir():
                        files.append(entry)
        elif explicit or base.exists():
            files.append(base)
    except OSError as e:
        raise PolicyError(str(e.filename or base), None, None, f"cannot read: {e.strerror}") from e

    sources: list[tuple[str, str]] = []
    for file in files:
        try:
            with file.open("rb") as f:
                data = yamlnodes.read_limited(f)  # parse_policy refuses a larger file
        except OSError as e:
            raise PolicyError(str(file), None, None, f"cannot read: {e.strerror}") from e
        if len(data) > yamlnodes.MAX_FILE_BYTES:
            raise PolicyError(str(file), None, None, yamlnodes.TOO_LARGE)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise PolicyError(str(file), line, None, "not valid UTF-8") from e
        sources.append((str(file), text))
    return parse_policy(sources)
