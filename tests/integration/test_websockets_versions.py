"""The wss:// code on both websockets APIs it must run on: the version pinned in
constraints.txt (this virtualenv) and Debian 12's python3-websockets 10.4, which
the .deb depends on (issue 15, item 1). 10.4 has the same sans-I/O protocol as
later releases under its first names (ClientConnection, ServerConnection,
websockets.connection) and takes an HTTPStatus, not an int, in reject().
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.tlscerts import make_pki

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = Path("/usr/bin/python3")
# Debian's interpreter, isolated from the environment, with the checkout first on its
# path: it imports hotplug from here and everything else from Debian's packages.
RUN = (
    "import runpy, sys; root, script = sys.argv[1:3]; sys.path.insert(0, root);"
    " sys.argv = [script, *sys.argv[3:]]; runpy.run_path(script, run_name='__main__')"
)


def _debian_websockets() -> str:
    probe = subprocess.run(
        [str(DEBIAN_PYTHON), "-I", "-c", "import websockets.version as v; print(v.version)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.fail(
            "Debian's python3-websockets is not installed (scripts/bootstrap installs it):"
            f" {probe.stderr.strip().splitlines()[-1:]}"
        )
    return probe.stdout.strip()


@pytest.mark.parametrize("python", ["virtualenv", "debian"])
def test_wss_channel_round_trip_and_refusal(python: str, tmp_path: Path) -> None:
    """Issue 15, item 1: wss:// works with Debian 12's websockets 10.4 and the pinned one."""
    pki = make_pki(tmp_path)
    script = ROOT / "tests/integration/wss_roundtrip.py"
    args = [str(pki.ca), str(pki.server.cert), str(pki.server.key)]
    if python == "virtualenv":
        argv = [sys.executable, "-I", "-c", RUN, str(ROOT), str(script), *args]
        expected = "ok websockets 1"  # the pin: >= 13
    else:
        version = _debian_websockets()
        assert version.startswith("10."), f"Debian 12 ships websockets 10.4, found {version}"
        argv = [str(DEBIAN_PYTHON), "-I", "-c", RUN, str(ROOT), str(script), *args]
        expected = f"ok websockets {version}"
    r = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(expected), r.stdout
