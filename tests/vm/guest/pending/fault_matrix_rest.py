"""Issue 11, item 3: the part of the real-kernel fault matrix not proven in the VM yet.

Not collected (the file name keeps pytest from collecting it). The collected part,
tests/vm/guest/test_fault_matrix.py (one-shot `connect` pulled out or its link cut
at every export step), passed in the VM. These cases (`disconnect` pulled at each
release step, `connect` SIGKILLed, and the daemon: pulled, link cut, SIGKILLed,
SIGTERMed with `on_stop: unexport` and withdrawn by a policy edit at each step,
usbipa killed, the storm, the final 1 MiB check) were written in the same session
(branch matrix2) but the machine (2 cores, load average 11-14 from other helpers'
suites) never let a guest session reach them: one run hit the 1200 s guest-session
timeout after the 9 connect cases (~1-2.5 min each at that load), the next guest
did not boot within 240 s, the one after lost each case's set-up to the daemon
missing READY within 90 s. None has failed; none has run yet. By hand, with the
collected part (they share its module-scoped rig only within one module, so this
file starts its own usbipa and daemon):

    pytest -m "vm or fault_matrix_full" -o python_files="test_*.py fault_matrix_rest.py" \
        tests/vm/guest/test_fault_matrix.py tests/vm/guest/pending/fault_matrix_rest.py

Once green twice in a row, move them into test_fault_matrix.py; the marks already
say which belong to the suite's fast subset (every fault point once per actor) and
which to `fault_matrix_full`.

The `disconnect` at release.before-rebind case that failed in the first version of
the matrix was not reached again either: the one run that got near it failed in
set-up (a daemon that missed READY was left running and made every later start
fail as "another daemon is running"; fixed in the rig, test_daemon_real.Rig._start).

Known kernel fault, not ours (seen by the first version under full slab poisoning,
USBIP_VM_SLUB_DEBUG=P, not under the suite's default): Debian's 6.1.192 usbip-host
reads its stub_priv after the URB it just submitted may have completed and been
freed by the tx thread (GPF at stub_rx_loop+0x8cb, address 0x6b6b...), during
ordinary data transfer, in about one case in five or six.
"""

# ruff: noqa: F811  (the fixtures imported from test_fault_matrix are test parameters here)
from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable

import pytest

from hotplug.testing.vm import gadget as gd
from tests.vm.guest.test_daemon_real import ENUM, MiB, used_ports
from tests.vm.guest.test_fault_matrix import (  # noqa: F401 - rig, udc, case, gadget: fixtures
    BIND_POINTS,
    CONNECT_SERIAL,
    DAEMON_SERIAL,
    EXPORT_POINTS,
    FULL,
    RELEASE_POINTS,
    SMALL,
    TARGET,
    MatrixRig,
    Pause,
    assert_clean,
    assert_clean_and_usable,
    case,
    cut_link,
    daemon_forgot,
    exported_by_daemon,
    gadget,
    moves_data,
    on_usbip_host,
    points,
    policy,
    rig,
    table,
    udc,
    wait_configured,
)


@pytest.mark.parametrize("point", RELEASE_POINTS)
def test_fault_disconnect_pulled_at(
    rig: MatrixRig,
    gadget: Callable[[str], gd.MassStorageGadget],
    udc: str,
    point: str,
    record_property: Callable[[str, object], None],
) -> None:
    """`disconnect` with the device pulled out while it is being given back: the
    device is gone, so there is nothing left to do; status 0."""
    g = gadget(CONNECT_SERIAL)
    g.plug(udc)
    busid = g.wait_busid(timeout=ENUM)
    wait_configured(busid)
    result = rig.cli_run("connect", "-r", TARGET, "-b", busid, "--timeout", "10")
    assert result.returncode == 0, result.stderr
    gd.wait_until(lambda: gd.exported_port(busid), timeout=ENUM, what=f"{busid} exported")
    with Pause(point) as pause:
        proc = rig.cli("disconnect", "-b", busid)
        pause.wait(proc.alive)
        g.unplug(timeout=ENUM)
    result = proc.wait()
    assert result.returncode == 0 and "Traceback" not in result.stderr, result
    assert_clean_and_usable(rig, g, udc, busid, record_property, by="connect")


def test_fault_connect_sigkilled_after_reply_then_disconnect_gives_back(
    rig: MatrixRig,
    gadget: Callable[[str], gd.MassStorageGadget],
    udc: str,
    record_property: Callable[[str, object], None],
) -> None:
    """`connect` SIGKILLed between the reply and the hand-over: the far side's port
    goes with the dead socket; the device stays with usbip-host (nobody can know
    it is orphaned) and `disconnect -r` gives it back."""
    g = gadget(CONNECT_SERIAL)
    g.plug(udc)
    busid = g.wait_busid(timeout=ENUM)
    wait_configured(busid)
    with Pause("export.after-reply") as pause:
        proc = rig.cli("connect", "-r", TARGET, "-b", busid, "--timeout", "10")
        pause.wait(proc.alive)
        proc.kill()
    gd.wait_until(lambda: not used_ports(), timeout=ENUM, what="the dead link's port freed")
    assert on_usbip_host() == [busid]
    result = rig.cli_run("disconnect", "-r", TARGET, "-b", busid)
    assert result.returncode == 0, result.stderr
    wait_configured(busid)
    assert busid not in table()
    g.unplug(timeout=ENUM)
    assert_clean_and_usable(rig, g, udc, busid, record_property, by="connect")


# --------------------------------------------------------------------------- the daemon


@pytest.mark.parametrize(
    "point",
    points(
        BIND_POINTS + EXPORT_POINTS,
        fast={"bind.after-match-add", "bind.after-stub-bind", "export.after-reply"},
    ),
)
def test_fault_daemon_pulled_at(
    rig: MatrixRig,
    gadget: Callable[[str], gd.MassStorageGadget],
    udc: str,
    point: str,
    record_property: Callable[[str, object], None],
) -> None:
    """The daemon exporting a freshly plugged disk, pulled out at `point`."""
    g = gadget(DAEMON_SERIAL)
    with Pause(point) as pause:
        g.plug(udc)
        busid = g.wait_busid(timeout=ENUM)
        pause.wait(rig.alive)
        g.unplug(timeout=ENUM)
    gd.wait_until(lambda: daemon_forgot(rig, busid), timeout=ENUM, what="the daemon done with it")
    assert_clean_and_usable(rig, g, udc, busid, record_property, by="daemon")


@pytest.mark.parametrize(
    "point", points(EXPORT_POINTS, fast={"export.after-connect", "export.after-hand-over"})
)
def test_fault_daemon_link_cut_at(
    rig: MatrixRig,
    gadget: Callable[[str], gd.MassStorageGadget],
    udc: str,
    point: str,
    record_property: Callable[[str, object], None],
) -> None:
    """The link cut at `point` of the daemon's export: the export fails (or its
    link dies right after), and the daemon exports the disk again; data moves."""
    g = gadget(DAEMON_SERIAL)
    with Pause(point) as pause:
        g.plug(udc)
        busid = g.wait_busid(timeout=ENUM)
        pause.wait(rig.alive)
        assert cut_link(), "no connection to usbipa to cut"
    gd.wait_until(
        lambda: (
            rig.usbipa_text().count(f"attached {busid} from") >= 1
            and rig.daemon_text().count(f"exporting {busid} to lab") >= 2
        ),
        timeout=ENUM,
        what="a second export attempt",
    )
    gd.wait_until(lambda: gd.exported_port(busid), timeout=ENUM, what=f"{busid} exported again")
    record_property("s_vhci_disk_and_data_again", f"{moves_data(g, SMALL):.2f}")
    g.unplug(timeout=ENUM)
    gd.wait_until(lambda: daemon_forgot(rig, busid), timeout=ENUM, what="the daemon done with it")
    assert_clean_and_usable(rig, g, udc, busid, record_property, by="daemon")


@pytest.mark.parametrize("point", points(RELEASE_POINTS, fast={"release.before-rebind"}))
def test_fault_daemon_withdrawn_by_policy_pulled_at(
    rig: MatrixRig,
    gadget: Callable[[str], gd.MassStorageGadget],
    udc: str,
    point: str,
    record_property: Callable[[str, object], None],
) -> None:
    """A policy edit withdraws an exported disk; it is pulled out at `point` of the
    release."""
    g = gadget(DAEMON_SERIAL)
    busid = exported_by_daemon(rig, g, udc)
    try:
        with Pause(point) as pause:
            rig.write_policy(policy("NOMATCH*"))
            pause.wait(rig.alive)
            g.unplug(timeout=ENUM)
        gd.wait_until(lambda: daemon_forgot(rig, busid), timeout=ENUM, what="the daemon done")
        assert f"released {busid}:" not in rig.daemon_text(), "the release reported an error"
    finally:
        rig.set_policy(policy())
    assert_clean_and_usable(rig, g, udc, busid, record_property, by="daemon")


@pytest.mark.parametrize("point", points(RELEASE_POINTS, fast={"release.before-unbind"}))
def test_fault_daemon_sigterm_pulled_at(
    rig: MatrixRig,
    gadget: Callable[[str], gd.MassStorageGadget],
    udc: str,
    point: str,
    record_property: Callable[[str, object], None],
) -> None:
    """SIGTERM with `on_stop: unexport` (the default) while a disk is exported; it
    is pulled out at `point` of the release on the way out. The daemon still
    exits 0, nothing is left attached or bound, and the next daemon starts clean."""
    g = gadget(DAEMON_SERIAL)
    busid = exported_by_daemon(rig, g, udc)
    assert rig.daemon is not None
    with Pause(point) as pause:
        rig.daemon.send_signal(signal.SIGTERM)
        pause.wait(rig.alive)
        g.unplug(timeout=ENUM)
    assert rig.stop_daemon(signal.SIGTERM) == 0, rig.daemon_text()
    text = rig.daemon_text()
    assert "stopping (unexporting exported devices)" in text and "Traceback" not in text, text
    assert not used_ports()
    rig.start_daemon()
    record_property("s_daemon_start", f"{rig.start_seconds:.2f}")
    assert_clean_and_usable(rig, g, udc, busid, record_property, by="daemon")


@pytest.mark.parametrize(
    "point",
    points(["bind.after-driver-unbind", "export.after-reply"], fast={"bind.after-driver-unbind"}),
)
def test_fault_daemon_sigkilled_at(
    rig: MatrixRig,
    gadget: Callable[[str], gd.MassStorageGadget],
    udc: str,
    point: str,
    record_property: Callable[[str, object], None],
) -> None:
    """SIGKILL of the daemon mid-export: the next daemon finds the device half
    done (no driver, or bound but not exported) and exports it; data moves."""
    g = gadget(DAEMON_SERIAL)
    with Pause(point) as pause:
        g.plug(udc)
        busid = g.wait_busid(timeout=ENUM)
        pause.wait(rig.alive)
        rig.stop_daemon(signal.SIGKILL)
    gd.wait_until(lambda: not used_ports(), timeout=ENUM, what="no port left by the dead daemon")
    rig.start_daemon()
    record_property("s_daemon_start", f"{rig.start_seconds:.2f}")
    gd.wait_until(lambda: gd.exported_port(busid), timeout=ENUM, what=f"{busid} exported again")
    record_property("s_vhci_disk_and_data_again", f"{moves_data(g, SMALL):.2f}")
    g.unplug(timeout=ENUM)
    gd.wait_until(lambda: daemon_forgot(rig, busid), timeout=ENUM, what="the daemon done with it")
    assert_clean_and_usable(rig, g, udc, busid, record_property, by="daemon")


@FULL
def test_fault_daemon_usbipa_killed_at_connect(
    rig: MatrixRig,
    gadget: Callable[[str], gd.MassStorageGadget],
    udc: str,
    record_property: Callable[[str, object], None],
) -> None:
    """usbipa SIGKILLed after it accepted the connection, before the request: the
    export fails and is rolled back; once usbipa is back, the disk is exported."""
    g = gadget(DAEMON_SERIAL)
    with Pause("export.after-connect") as pause:
        g.plug(udc)
        busid = g.wait_busid(timeout=ENUM)
        pause.wait(rig.alive)
        rig.stop_usbipa(signal.SIGKILL)
    gd.wait_until(
        lambda: f"export of {busid} to lab failed" in rig.daemon_text(),
        timeout=ENUM,
        what="the failed export logged",
    )
    assert not used_ports()
    rig.start_usbipa()
    gd.wait_until(lambda: gd.exported_port(busid), timeout=ENUM, what=f"{busid} exported")
    record_property("s_vhci_disk_and_data_again", f"{moves_data(g, SMALL):.2f}")
    g.unplug(timeout=ENUM)
    gd.wait_until(lambda: daemon_forgot(rig, busid), timeout=ENUM, what="the daemon done with it")
    assert_clean_and_usable(rig, g, udc, busid, record_property, by="daemon")


STORM_ROUNDS = int(os.environ.get("USBIP_FAULT_STORM_ROUNDS", "8"))
STORM_SEED = int(os.environ.get("USBIP_FAULT_STORM_SEED", "11"))


def test_fault_daemon_storm(
    rig: MatrixRig,
    gadget: Callable[[str], gd.MassStorageGadget],
    udc: str,
    record_property: Callable[[str, object], None],
) -> None:
    """Plug and pull at delays spread over 0-0.9 s after plug-in, while the daemon
    runs. Seeded (USBIP_FAULT_STORM_SEED, default fixed so that CI replays the
    same delays; the seed and delays are in the test's properties)."""
    print(f"storm seed {STORM_SEED}, {STORM_ROUNDS} rounds")
    record_property("seed", STORM_SEED)
    rng = random.Random(STORM_SEED)
    # Spread-out delays: one in each tenth of 0-0.9 s (shuffled), jittered.
    delays = [(i % 9) / 10 + rng.uniform(0, 0.1) for i in range(STORM_ROUNDS)]
    rng.shuffle(delays)
    record_property("delays", " ".join(f"{d:.2f}" for d in delays))
    g = gadget(DAEMON_SERIAL)
    g.plug(udc)  # round 0: pulled as soon as it has a busid
    busid = g.wait_busid(timeout=ENUM)
    g.unplug(timeout=ENUM)
    t0 = time.monotonic()
    for delay in delays:
        g.plug(udc)
        time.sleep(delay)  # the stimulus itself, not a synchronisation
        g.unplug(timeout=ENUM)
    record_property("s_storm", f"{time.monotonic() - t0:.2f}")
    gd.wait_until(lambda: daemon_forgot(rig, busid), timeout=ENUM, what="the daemon done with it")
    assert_clean_and_usable(rig, g, udc, busid, record_property, by="daemon")


def test_fault_matrix_full_data_at_the_end(
    rig: MatrixRig,
    gadget: Callable[[str], gd.MassStorageGadget],
    udc: str,
    record_property: Callable[[str, object], None],
) -> None:
    """After every case above, on the same busid and table slot: the daemon exports
    a fresh disk and 1 MiB goes through it intact; then all is clean again."""
    g = gadget(DAEMON_SERIAL)
    busid = exported_by_daemon(rig, g, udc)
    record_property("s_vhci_disk_and_data", f"{moves_data(g, MiB):.2f}")
    g.unplug(timeout=ENUM)
    gd.wait_until(lambda: daemon_forgot(rig, busid), timeout=ENUM, what="the daemon done with it")
    assert_clean(rig, g, busid, record_property)
