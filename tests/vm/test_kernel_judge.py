"""The kernel judges every in-guest test (issue 11): a test during which the guest
kernel logs an oops fails with those lines, and the tests after it run in a
freshly booted guest. Checked end to end with a nested pytest session whose
first guest test oopses the kernel on purpose (tests/vm/guest/judge_cases/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = "tests/vm/guest/judge_cases/case_kernel_fault.py"

# Two boots and two short guest sessions under emulation.
pytestmark = pytest.mark.timeout(900)


def test_an_oops_fails_its_test_and_the_rest_runs_in_a_fresh_guest() -> None:
    if os.environ.get("USBIP_VM") == "0":
        pytest.skip("USBIP_VM=0: the real-kernel VM tests are disabled")
    env = {**os.environ, "USBIP_VM_REQUIRED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-o",
            "python_files=case_*.py",
            "-rA",
            f"{CASES}::test_rebind_of_an_entry_never_bound_through",
            f"{CASES}::test_runs_after_the_fault",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert f"FAILED {CASES}::test_rebind_of_an_entry_never_bound_through" in out, out[-4000:]
    assert "NULL pointer dereference" in out, out[-4000:]
    assert f"PASSED {CASES}::test_runs_after_the_fault" in out, out[-4000:]
    assert "fresh guests booted after a kernel fault: 1" in out, out[-4000:]
