"""Regression tests for issue 12 (security hardening), one or more per finding."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from hotplug.testing.fake_kernel import FakeTree
from tests.integration.tls_support import client_flags
from tests.rig import env_for
from tests.tlscerts import Pki

CLI = str(Path(sys.executable).parent / "usbip-hotplug")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_relay_does_not_import_from_the_working_directory(
    tree: FakeTree, state: Path, pki: Pki, tmp_path: Path
) -> None:
    """Issue 12, finding 1: a `hotplug/` package planted in the caller's working
    directory (/tmp, a shared checkout) must not run when the relay starts."""
    shared = tmp_path / "shared"
    (shared / "hotplug").mkdir(parents=True)
    shared.chmod(0o1777)
    marker = tmp_path / "planted-code-ran"
    (shared / "hotplug" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('owned')\n")
    env = env_for(tree, state)
    for name in ("PYTHONPATH", "PYTHONSAFEPATH"):
        env.pop(name, None)
    remote = f"tls://127.0.0.1:{closed_port()}"
    result = subprocess.run(
        [CLI, "disconnect", "-r", remote, "-b", "1-1", *client_flags(pki), "--timeout", "3"],
        cwd=shared,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert not marker.exists(), "the planted hotplug package ran in the relay process"
    # The relay did run (ours): it reports the refused connection.
    assert result.returncode == 1
    assert "Connection refused" in result.stderr, result.stderr
