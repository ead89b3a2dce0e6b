"""How this package starts another Python process of its own.

`python -m MODULE` puts the working directory first on `sys.path`: run as root
from /tmp or a shared checkout, a planted `hotplug/` package there would be
imported instead of ours (issue 12, finding 1). So a child interpreter runs
isolated (`-I`: no cwd or script directory on the path, no PYTHON* variables,
no user site), from `/`, with an environment reduced to what the child reads.
The directory our own `hotplug` package was imported from goes first on the
child's path, so the child runs the very code the parent runs, whether that
is installed or a checkout the parent was started from on purpose.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import hotplug

# Variables a child may read: the journal connection, and our own settings
# (state directory, the test kernel's root and socket, the relay's log file).
_KEPT = ("JOURNAL_STREAM",)
_KEPT_PREFIXES = ("USBIP_HOTPLUG_", "USBIPA_")

# Run with `-I -c`: put our package's parent first, then run the module as -m would.
_BOOT = (
    "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)


def package_root() -> str:
    """The directory that holds the `hotplug` package this process runs."""
    return str(Path(hotplug.__file__).resolve().parent.parent)


def python_module(module: str, *args: str) -> list[str]:
    """argv that runs `module` like `python -m`, isolated from cwd and environment."""
    return [sys.executable, "-I", "-c", _BOOT, package_root(), module, *args]


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a child process of ours gets: only the variables it reads."""
    env = os.environ if env is None else env
    return {
        name: value
        for name, value in env.items()
        if name in _KEPT or name.startswith(_KEPT_PREFIXES)
    }


CHILD_CWD = "/"
