from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice

if TYPE_CHECKING:
    from tests.tlscerts import Pki

DISK = FakeUsbDevice(busid="1-1", vendor=0x1D6B, product=0x0104, serial="TESTDISK01")


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[FakeTree]:
    tree = FakeTree(tmp_path / "root").create()
    proc = tree.start_server()
    try:
        yield tree
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # The fake kernel judges as the real one would: a write that would have
    # oopsed Linux fails the test that caused it.
    assert not tree.kernel_faults(), "\n".join(tree.kernel_faults())


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
