from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hotplug.testing.fake_kernel import FakeUsbDevice

if TYPE_CHECKING:
    from tests.tlscerts import Pki

DISK = FakeUsbDevice(busid="1-1", vendor=0x1D6B, product=0x0104, serial="TESTDISK01")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for the TLS tests, made once per run (keys never committed)."""
    from tests.tlscerts import make_pki  # needs `cryptography` (the test extra)

    return make_pki(tmp_path_factory.mktemp("pki"))
