"""The soak, bounded: 500 plug/unplug cycles over 50 devices and 3 targets, one of
them crashing and rebooting all along (bench/soak.py runs 10,000)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault.soak import run_soak


# Bounded by its count (500 cycles), not by time: on an idle machine it takes
# about a minute, on a loaded one more than the suite's default 120 s per test.
@pytest.mark.timeout(400)
def test_soak_converges_and_leaks_nothing(tmp_path: Path) -> None:
    result = run_soak(tmp_path, cycles=500, devices=50, flaps=6, seed=7, timeout=30)
    assert result.cycles == 500
    assert len(result.flaps) == 6
    assert result.problems == []
