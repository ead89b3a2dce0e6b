"""Settings and fixtures for the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

if TYPE_CHECKING:  # loaded by the fixtures only: the VM guest's sessions never use them
    from hotplug.testing.fake_kernel import FakeTree
    from tests.tlscerts import Pki

# Hypothesis' default 200 ms deadline per example is a timing assertion: on a
# loaded machine it fails tests whose code is correct. Tests that mean to bound
# a parser's time (the fuzz targets against input bombs) set their own.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[FakeTree]:
    """A fake sysfs with its kernel process running (unit tests of the kernel
    layer and the integration tests share it)."""
    from hotplug.testing.fake_kernel import FakeTree

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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for the TLS tests, made once per run (keys never committed);
    the integration tests and the unit tests of the metrics share them."""
    from tests.tlscerts import make_pki  # needs `cryptography` (the test extra)

    return make_pki(tmp_path_factory.mktemp("pki"))
