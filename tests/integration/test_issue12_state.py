"""Issue 12, findings 5, 8, 10 and 11: the device side's records and its one daemon.

Real processes (`usbip-hotplug connect`, `usbip-hotplug run`, usbipa) against the
fake kernel over loopback; the steps in between are hit through the product's
fault points (hotplug/faultpoints.py), never by timing.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice
from tests.helpers import wait_for
from tests.integration.daemon_rig import (
    Notifications,
    driver,
    exported,
    free_port,
    match_table,
    policy_text,
    rule,
    stub_status,
    target,
    used_ports,
)
from tests.rig import command, env_for, run_cli, running_usbipa

DISK = FakeUsbDevice("1-1", 0x1D6B, 0x0104, serial="DISK01", product_name="Disk")
CLI = [*command("usbip-hotplug")]

RUN = [*command("usbip-hotplug"), "run"]


class Faults:
    """The fault-point directory of one test: pause a process at a named step."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(exist_ok=True)

    def env(self) -> dict[str, str]:
        return {"USBIP_HOTPLUG_FAULTPOINTS": str(self.dir)}

    def arm(self, name: str) -> None:
        (self.dir / f"{name}.reached").unlink(missing_ok=True)
        (self.dir / f"{name}.pause").touch()

    def wait(self, name: str, proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
        def there() -> bool:
            assert proc.poll() is None, f"the process exited ({proc.returncode}) before {name}"
            return (self.dir / f"{name}.reached").exists()

        wait_for(there, timeout, f"fault point {name} reached")

    def release(self, name: str) -> None:
        (self.dir / f"{name}.pause").unlink(missing_ok=True)


@pytest.fixture
def faults(tmp_path: Path) -> Faults:
    return Faults(tmp_path / "faults")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[Any]]]:
    """Processes a test starts: killed at the end if the test left them running."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def start_daemon(
    tree: FakeTree, state: Path, workdir: Path, policy: str, **env: str
) -> tuple[subprocess.Popen[str], Notifications]:
    """`usbip-hotplug run` with its own notify socket and log (workdir/daemon.log),
    not waiting for READY (the caller decides what to wait for)."""
    workdir.mkdir(exist_ok=True)
    (workdir / "policy.yaml").write_text(policy)
    notify = Notifications(workdir)
    cmd = [*RUN, "-c", str(workdir / "policy.yaml"), "--events", str(workdir / "events")]
    with open(workdir / "daemon.log", "a") as log:
        proc = subprocess.Popen(
            cmd,
            env=env_for(tree, state, NOTIFY_SOCKET=str(notify.socket.path), **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return proc, notify


def disk_policy(port: int, vendor: str = "1d6b") -> str:
    return policy_text({"lab": target(port)}, [rule("disks", vendor, "lab")])


def record(state: Path, busid: str) -> dict[str, Any] | None:
    path = state / "device" / "exports" / f"{busid}.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def given_back(tree: FakeTree, busid: str) -> bool:
    """On its usual driver, out of usbip-host's table, exported nowhere."""
    return (
        driver(tree, busid) == "usb"
        and busid not in match_table(tree)
        and stub_status(tree, busid) is None
        and not used_ports(tree)
    )


def connect(tree: FakeTree, state: Path, port: int, *extra: str, **env: str) -> Any:
    """A real `usbip-hotplug connect -b 1-1` to usbipa on `port`, not waited for."""
    return subprocess.Popen(
        [*CLI, "connect", "-r", f"127.0.0.1:{port}", "-b", "1-1", "--timeout", "5", *extra],
        env=env_for(tree, state, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def block(path: Path) -> None:
    """Put a file where a directory of records should be (as when /run is unusable:
    running as root, a read-only permission would not stop a write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a file in the way\n")


def daemon_pid(tree: FakeTree, state: Path) -> int:
    result = run_cli(tree, state, "status", "--json")
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["daemon"]["pid"])


# --------------------------------------------------------------------------- finding 11


def test_second_daemon_refused_by_the_lock_while_the_first_starts(
    tree: FakeTree, state: Path, tmp_path: Path, faults: Faults, procs: list[Any]
) -> None:
    """Issue 12, finding 11: single instance was "does the control socket answer",
    so a daemon started while another one was still starting (its socket not yet
    there) ran too. The first now holds an flock on the state directory's lock
    file from its first step; the second exits non-zero naming the holder."""
    policy = policy_text({"lab": target(free_port())}, [])
    faults.arm("run.after-lock")
    first, notify = start_daemon(tree, state, tmp_path / "one", policy, **faults.env())
    procs.append(first)
    try:
        faults.wait("run.after-lock", first)
        second, _ = start_daemon(tree, state, tmp_path / "two", policy)
        procs.append(second)
        try:
            code = second.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("a second daemon runs beside the first")
        log = (tmp_path / "two" / "daemon.log").read_text()
        assert code == 1, log
        lock = state / "device" / "daemon.lock"
        assert f"another usbip-hotplug daemon is running (pid {first.pid} holds" in log
        assert str(lock) in log
        faults.release("run.after-lock")
        notify.wait("READY", first)
        assert daemon_pid(tree, state) == first.pid
        first.send_signal(signal.SIGTERM)
        assert first.wait(15) == 0
    finally:
        notify.close()


def test_two_daemons_started_at_once_exactly_one_runs(
    tree: FakeTree, state: Path, tmp_path: Path, procs: list[Any]
) -> None:
    """Issue 12, finding 11: two daemons started at the same moment on one state
    directory: exactly one runs, the other exits 1 and says which pid holds the lock."""
    policy = policy_text({"lab": target(free_port())}, [])
    started = [start_daemon(tree, state, tmp_path / name, policy) for name in ("a", "b")]
    procs.extend(proc for proc, _ in started)
    try:

        def gave_up() -> list[int]:
            return [i for i, (proc, _) in enumerate(started) if proc.poll() is not None]

        (loser,) = wait_for(gave_up, 20, "one of the two daemons to give up")
        winner_proc, winner_notify = started[1 - loser]
        loser_proc, _ = started[loser]
        log = (tmp_path / ("a", "b")[loser] / "daemon.log").read_text()
        assert loser_proc.returncode == 1, log
        # The pid is named once the winner has written it (a moment after locking).
        assert "another usbip-hotplug daemon is running" in log, log
        assert f"holds the lock on {state / 'device' / 'daemon.lock'}" in log, log
        winner_notify.wait("READY", winner_proc)
        assert daemon_pid(tree, state) == winner_proc.pid
        winner_proc.send_signal(signal.SIGTERM)
        assert winner_proc.wait(15) == 0
    finally:
        for _, notify in started:
            notify.close()


# --------------------------------------------------------------------------- finding 5


@pytest.mark.parametrize("how", ["record-path-is-a-directory", "state-dir-is-a-file"])
def test_connect_does_not_export_what_it_cannot_record(
    tree: FakeTree, state: Path, how: str
) -> None:
    """Issue 12, finding 5: `connect` exported even when its /run record could not
    be written, so `disconnect -b` and the daemon lost the device. The record is
    written first now: if it cannot be, nothing is bound and the error says why."""
    tree.add_device(DISK, devnum=3)
    if how == "record-path-is-a-directory":
        (state / "device" / "exports" / "1-1.json").mkdir(parents=True)
    else:
        block(state / "device")
    with running_usbipa(tree, state) as (usbipa, port):
        result = run_cli(tree, state, "connect", "-r", f"127.0.0.1:{port}", "-b", "1-1")
        assert result.returncode == 1, result.stdout
        assert "cannot write state file" in result.stderr, result.stderr
        assert "1-1 is not exported" in result.stderr
        assert "make the state directory writable" in result.stderr
        assert "Traceback" not in result.stderr
        assert given_back(tree, "1-1") and match_table(tree) == []
    assert "attached" not in (usbipa.stderr.read() if usbipa.stderr else "")


def test_connect_rolls_back_an_export_it_cannot_record(
    tree: FakeTree, state: Path, faults: Faults, procs: list[Any]
) -> None:
    """Issue 12, finding 5: the record written before the bind says "exporting";
    if updating it once the export is done fails, the export is withdrawn (the
    far side told, the device given back) and `connect` says so."""
    tree.add_device(DISK, devnum=3)
    exports = state / "device" / "exports"
    with running_usbipa(tree, state) as (_, port):
        faults.arm("export.after-hand-over")
        proc = connect(tree, state, port, **faults.env())
        procs.append(proc)
        faults.wait("export.after-hand-over", proc)
        assert (record(state, "1-1") or {}).get("state") == "exporting"
        exports.rename(exports.with_name("exports.moved"))
        block(exports)
        faults.release("export.after-hand-over")
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, err
        assert "cannot write state file" in err and "the export of 1-1 is rolled back" in err
        assert "Traceback" not in err
        wait_for(lambda: given_back(tree, "1-1"), 10, "1-1 withdrawn and given back")


def test_daemon_does_not_export_what_it_cannot_record(
    tree: FakeTree, state: Path, daemons: Any
) -> None:
    """Issue 12, finding 5: the daemon exported a device whose record it could not
    write; restarted, it called the device "foreign" for good. Now it binds nothing
    it cannot record, says why in `status`, and exports once the record can be
    written (retried with the target's backoff)."""
    exports = state / "device" / "exports"
    block(exports)
    with running_usbipa(tree, state) as (_, port):
        daemon = daemons(disk_policy(port)).start()
        daemon.plug(DISK, devnum=3)

        def refused() -> bool:
            row = daemon.device("1-1")
            return row is not None and "cannot record the export" in (row["last_error"] or "")

        wait_for(refused, 10, "the export refused for want of a record")
        assert given_back(tree, "1-1") and match_table(tree) == []
        assert "event=exporting" not in daemon.text()  # not even started
        exports.unlink()
        wait_for(lambda: daemon.state_of("1-1") == "exported", 10, "1-1 exported")
        assert exported(tree, "1-1") is not None
        wait_for(lambda: (record(state, "1-1") or {}).get("state") == "exported", 5, "record")
        assert (record(state, "1-1") or {})["by"] == "daemon"


def test_daemon_retries_a_record_update_that_failed(
    tree: FakeTree, state: Path, daemons: Any, faults: Faults
) -> None:
    """Issue 12, finding 5: a record write that fails after the export (the
    "exported" update) is retried from the daemon's loop until it is written,
    instead of being logged once and lost."""
    exports = state / "device" / "exports"
    with running_usbipa(tree, state) as (_, port):
        daemon = daemons(disk_policy(port))
        faults.arm("export.after-hand-over")
        daemon.start(**faults.env())
        daemon.plug(DISK, devnum=3)
        assert daemon.proc is not None
        faults.wait("export.after-hand-over", daemon.proc)
        exports.rename(exports.with_name("exports.moved"))
        block(exports)
        faults.release("export.after-hand-over")
        wait_for(lambda: "retrying (until it is written" in daemon.text(), 10, "the write failed")
        assert daemon.state_of("1-1") == "exported"
        exports.unlink()  # the daemon makes the directory again as it retries
        wait_for(
            lambda: (record(state, "1-1") or {}).get("state") == "exported",
            10,
            "the record updated to exported",
        )
        assert "the record of 1-1 is written" in daemon.text()


# --------------------------------------------------------------------------- finding 8

STEPS = [
    "bind.after-match-add",
    "bind.after-driver-unbind",
    "bind.after-stub-bind",
    "export.after-connect",
    "export.after-reply",
    "export.after-hand-over",
]


@pytest.mark.parametrize(
    ("step", "sig"),
    [(step, signal.SIGTERM) for step in STEPS] + [("export.after-reply", signal.SIGHUP)],
    ids=[f"{step}-SIGTERM" for step in STEPS] + ["export.after-reply-SIGHUP"],
)
def test_connect_stopped_by_a_signal_rolls_back(
    tree: FakeTree, state: Path, faults: Faults, procs: list[Any], step: str, sig: int
) -> None:
    """Issue 12, finding 8: `timeout 3 usbip-hotplug connect ...` (SIGTERM), or a
    closed terminal (SIGHUP), ended `connect` without its rollback: the device
    stayed bound to usbip-host with no record, "foreign" to the daemon for good.
    Both now unwind like Ctrl-C, at every step of the bind and the export."""
    tree.add_device(DISK, devnum=3)
    with running_usbipa(tree, state) as (_, port):
        faults.arm(step)
        proc = connect(tree, state, port, **faults.env())
        procs.append(proc)
        faults.wait(step, proc)
        assert (record(state, "1-1") or {}).get("by") == "connect"  # recorded before binding
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        faults.release(step)
        assert proc.returncode == 128 + sig, err
        assert f"stopped by {signal.Signals(sig).name}" in err and "Traceback" not in err
        if step == "bind.after-match-add":
            # Not yet taken from its driver. Its usbip-host entry stays: the kernel's
            # `del` leaves an entry no device was bound through (docs/PROTOCOL.md),
            # and `status` counts it as leaked, as for a plain bind that fails there.
            assert driver(tree, "1-1") == "usb" and stub_status(tree, "1-1") is None
            assert tree.stub().leftovers() == ["1-1"]
        else:
            wait_for(lambda: given_back(tree, "1-1"), 10, "1-1 given back, its port freed")
        assert record(state, "1-1") is None


@pytest.mark.parametrize("wanted", [True, False], ids=["exported", "given-back"])
def test_daemon_takes_over_what_a_killed_connect_stranded(
    tree: FakeTree,
    state: Path,
    daemons: Any,
    faults: Faults,
    procs: list[Any],
    wanted: bool,
) -> None:
    """Issue 12, finding 8: a `connect` killed with SIGKILL (no rollback can run)
    after binding leaves its "exporting" record behind. The daemon sees the
    writer is gone and the device bound but not exported, and takes it over:
    exported if its policy says so, else given back. Never "foreign" for good."""
    tree.add_device(DISK, devnum=3)
    with running_usbipa(tree, state) as (_, port):
        faults.arm("bind.after-stub-bind")
        proc = connect(tree, state, port, **faults.env())
        procs.append(proc)
        faults.wait("bind.after-stub-bind", proc)
        proc.kill()
        proc.wait(10)
        faults.release("bind.after-stub-bind")
        assert driver(tree, "1-1") == "usbip-host" and stub_status(tree, "1-1") == "1"
        daemon = daemons(disk_policy(port, "1d6b" if wanted else "9999")).start()
        if wanted:
            wait_for(lambda: daemon.state_of("1-1") == "exported", 10, "1-1 exported")
            assert exported(tree, "1-1") is not None
            wait_for(lambda: (record(state, "1-1") or {}).get("by") == "daemon", 5, "its record")
        else:
            wait_for(lambda: given_back(tree, "1-1"), 10, "1-1 given back")
            wait_for(lambda: record(state, "1-1") is None, 5, "the record dropped")
        assert "taking it over" in daemon.text()
        assert daemon.state_of("1-1") != "foreign"


# --------------------------------------------------------------------------- finding 10


def test_a_device_bound_by_another_tool_mid_export_is_not_taken(
    tree: FakeTree, state: Path, daemons: Any, faults: Faults
) -> None:
    """Issue 12, finding 10: a daemon export that failed because another tool bound
    the device in between took the device as its own: rewrote the record as the
    daemon's, exported it, released it on stop. It owns only what it bound."""
    tree.add_device(DISK, devnum=3)
    with running_usbipa(tree, state) as (_, port):
        daemon = daemons(disk_policy(port))
        faults.arm("export.start")
        daemon.start(**faults.env())
        assert daemon.proc is not None
        faults.wait("export.start", daemon.proc)
        tree.stub().bind("1-1")  # `usbip bind -b 1-1`, in between
        faults.release("export.start")
        wait_for(lambda: daemon.state_of("1-1") == "foreign", 10, "1-1 left to the other tool")
        assert record(state, "1-1") is None
        assert driver(tree, "1-1") == "usbip-host" and stub_status(tree, "1-1") == "1"
        daemon.signal(signal.SIGTERM)  # on_stop unexport must not release it either
        assert daemon.wait() == 0
        assert driver(tree, "1-1") == "usbip-host" and "released 1-1" not in daemon.text()
        assert not used_ports(tree)


def test_connect_refused_while_the_daemon_exports_the_device(
    tree: FakeTree, state: Path, daemons: Any, faults: Faults
) -> None:
    """Issue 12, finding 10: `connect` could bind a device between the daemon's
    decision and its bind; the daemon then took connect's device and record. Each
    now claims the record before binding, and only one can: here the daemon."""
    tree.add_device(DISK, devnum=3)
    with running_usbipa(tree, state) as (_, port):
        daemon = daemons(disk_policy(port))
        faults.arm("export.start")
        daemon.start(**faults.env())
        assert daemon.proc is not None
        faults.wait("export.start", daemon.proc)
        result = run_cli(tree, state, "connect", "-r", f"127.0.0.1:{port}", "-b", "1-1")
        assert result.returncode == 1, result.stdout
        pid = daemon.proc.pid
        assert f"1-1 is managed by the usbip-hotplug daemon (pid {pid})" in result.stderr
        assert driver(tree, "1-1") == "usb"
        faults.release("export.start")
        wait_for(lambda: daemon.state_of("1-1") == "exported", 10, "1-1 exported by the daemon")
        assert (record(state, "1-1") or {})["by"] == "daemon"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        assert given_back(tree, "1-1") and record(state, "1-1") is None


def test_connect_checks_the_busid_before_it_names_a_record(tree: FakeTree, state: Path) -> None:
    """Issue 12, finding 5 (its fix): the record is written before the device is
    touched, so a bad busid must be refused before it becomes a file name."""
    result = run_cli(tree, state, "connect", "-r", "127.0.0.1:9", "-b", "../../x")
    assert result.returncode == 2  # a usage error (finding 15: argparse checks -b)
    assert "'../../x' is not a USB busid" in result.stderr and "Traceback" not in result.stderr
    assert not (state / "device" / "exports").exists() and not (state / "x.json").exists()
