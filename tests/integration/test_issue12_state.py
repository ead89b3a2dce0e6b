"""Issue 12, findings 5, 8, 10 and 11: the device side's records and its one daemon.

Real processes (`usbip-hotplug connect`, `usbip-hotplug run`, usbipa) against the
fake kernel over loopback; the steps in between are hit through the product's
fault points (hotplug/faultpoints.py), never by timing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotplug.kernel.fake import FakeTree
from tests.helpers import NotifySocket, env_for, run_cli, wait_for
from tests.integration.test_daemon import free_port, policy_text, target

RUN = [sys.executable, "-m", "hotplug.cli", "run"]


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
) -> tuple[subprocess.Popen[str], NotifySocket]:
    """`usbip-hotplug run` with its own notify socket and log (workdir/daemon.log)."""
    workdir.mkdir(exist_ok=True)
    (workdir / "policy.yaml").write_text(policy)
    notify = NotifySocket(workdir)
    cmd = [*RUN, "-c", str(workdir / "policy.yaml"), "--events", str(workdir / "events")]
    with open(workdir / "daemon.log", "a") as log:
        proc = subprocess.Popen(
            cmd,
            env=env_for(tree, state, NOTIFY_SOCKET=str(notify.path), **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return proc, notify


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
        notify.wait("READY", proc=first)
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
        winner_notify.wait("READY", proc=winner_proc)
        assert daemon_pid(tree, state) == winner_proc.pid
        winner_proc.send_signal(signal.SIGTERM)
        assert winner_proc.wait(15) == 0
    finally:
        for _, notify in started:
            notify.close()
