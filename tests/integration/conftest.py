"""Fixtures of the integration tests: a state directory, and the `daemons` that
the daemon, claim, follow and metrics tests start (tests/integration/daemon_rig.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice
from tests.integration.daemon_rig import Daemon

DISK = FakeUsbDevice(busid="1-1", vendor=0x1D6B, product=0x0104, serial="TESTDISK01")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def daemons(tree: FakeTree, state: Path, tmp_path: Path) -> Iterator[Callable[[str], Daemon]]:
    """Make one daemon_rig.Daemon (the real `run`, notifications drained) per policy."""
    made: list[Daemon] = []

    def make(policy: str) -> Daemon:
        path = tmp_path / f"policy{len(made)}.yaml"  # its own: never one another's
        path.write_text(policy)
        daemon = Daemon(tree, state, tmp_path / f"daemon{len(made)}", path)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()
