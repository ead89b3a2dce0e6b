"""The Debian package built from this checkout (scripts/build-deb), for the tests
that look into it (tests/integration/test_deb_contents.py) and the one that
installs it in the VM (tests/vm/guest/test_units_from_the_deb.py)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A cold build installs nothing (scripts/bootstrap did) but runs dpkg-buildpackage
# and lintian: about a minute here; the limit allows for a loaded CI machine.
BUILD_TIMEOUT = 900.0


class DebBuildError(Exception):
    """scripts/build-deb failed; the message carries the end of its output."""


@dataclass(frozen=True)
class BuiltDeb:
    path: Path
    said: str  # "built in N s into DIR" or "source unchanged since the build in DIR"


def build_deb() -> BuiltDeb:
    """The .deb of this tree: built, or the cached one if the sources did not change."""
    try:
        r = subprocess.run(
            [str(ROOT / "scripts/build-deb")],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise DebBuildError(f"scripts/build-deb took more than {BUILD_TIMEOUT:.0f}s") from None
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines or not lines[-1].endswith(".deb"):
        raise DebBuildError(f"scripts/build-deb: exit {r.returncode}\n{r.stdout}{r.stderr}"[-3000:])
    return BuiltDeb(Path(lines[-1]), lines[-2] if len(lines) > 1 else "")
