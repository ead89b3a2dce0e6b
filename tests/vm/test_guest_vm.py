"""Host-side tests of the VM harness itself (GuestVM's command channel).

They share the session's one guest (fixture `guest_vm`), so they add seconds,
not a boot.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

# The first of these may boot the VM in its setup (up to USBIP_VM_BOOT_TIMEOUT).
pytestmark = pytest.mark.timeout(420)


def test_run_returns_output_and_status(guest_vm: Any) -> None:
    r = guest_vm.run("echo out; echo err >&2; exit 3", timeout=60, echo=False)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert not r.ok and not r.timed_out


def test_guest_is_root_on_the_debian_kernel_with_our_env(guest_vm: Any) -> None:
    r = guest_vm.run(
        'id -u; uname -r; echo "$USBIP_IN_VM"; pwd', timeout=60, echo=False, check=True
    )
    uid, release, in_vm, cwd = r.stdout.split("\n")[:4]
    assert uid == "0"
    assert release == guest_vm.kernel.release
    assert in_vm == "1"
    assert cwd == guest_vm.cwd


def test_guest_kills_a_command_at_its_timeout(guest_vm: Any) -> None:
    t0 = time.monotonic()
    r = guest_vm.run(["sleep", "600"], timeout=2, echo=False)
    assert r.timed_out and r.returncode != 0
    assert time.monotonic() - t0 < 30


def test_commands_run_concurrently(guest_vm: Any) -> None:
    # A FIFO makes the first command depend on the second one running.
    guest_vm.run("rm -f /tmp/harness.fifo && mkfifo /tmp/harness.fifo", timeout=30, check=True)
    reader = guest_vm.start_command("cat /tmp/harness.fifo", timeout=60, echo=False)
    guest_vm.run("echo through-the-fifo > /tmp/harness.fifo", timeout=60, check=True)
    assert reader.wait().stdout == "through-the-fifo\n"


def test_files_round_trip_through_the_agent(guest_vm: Any) -> None:
    data = bytes(range(256)) * 64
    guest_vm.write_file("/tmp/harness.bin", data)
    assert guest_vm.read_file("/tmp/harness.bin") == data
    assert guest_vm.run("wc -c < /tmp/harness.bin", timeout=30).stdout.strip() == str(len(data))
    from hotplug.testing.vm.kernels import VMError

    with pytest.raises(VMError, match="No such file"):
        guest_vm.read_file("/tmp/does-not-exist")


def test_qmp_from_the_host(guest_vm: Any) -> None:
    """The host's QMP client on the booted guest's QEMU (hotplug.testing.vm.qmp);
    the guest's own use of it: tests/vm/guest/test_qemu_devices.py."""
    assert guest_vm.qmp.execute("query-status")["running"] is True
    peripherals = {
        p["name"] for p in guest_vm.qmp.execute("qom-list", {"path": "/machine/peripheral"})
    }
    assert {"usbipvm-xhci", "usbipvm-vser"} <= peripherals
