"""Real-kernel VM tests: one QEMU guest per pytest session.

On the host (USBIP_IN_VM unset), every test collected under tests/vm/guest/
is replaced by a proxy item with the same node id. The first proxy that runs
boots the VM (hotplug.testing.vm.guest.GuestVM) and runs *one* pytest session inside
it over all selected guest tests (`python -m pytest <node ids>`, env
USBIP_IN_VM=1), streaming the guest's output live with a `[guest]` prefix.
Each proxy then reports its own test's in-guest outcome: pass, fail (with the
guest's failure text and captured output), skip (with the guest's reason).
Guest fixtures and module code never run on the host.

Inside the guest (USBIP_IN_VM=1) this file only records each test report as
a JSON line in $USBIP_VM_RESULTS, which the host reads back through the VM's
agent.

Every test under tests/vm/ gets the `vm` marker: `pytest -m vm` runs just
these, plain `pytest` runs them too. Host-side tests that want to drive the
guest themselves use the session fixture `guest_vm` (the same booted VM).

Environment: see tests/vm/README.md (USBIP_VM=0 disables, USBIP_VM_REQUIRED=1
turns "cannot start" skips into failures, USBIP_VM_KVM, timeouts...).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from hotplug.testing.vm.kmsg import TEST_MARK, KmsgReader, is_fault_line, kernel_fault_lines

IN_VM = os.environ.get("USBIP_IN_VM") == "1"
HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE / "guest"
# The guest's /tmp is its own (an overlay): the host reads this via the agent.
GUEST_RESULTS = "/tmp/usbip-vm-results.jsonl"
# The Debian package, built on the host (scripts/build-deb) for the guest tests of
# DEB_TESTS, is handed to the guest here (its /tmp is its own).
DEB_TESTS = "tests/vm/guest/test_units_from_the_deb.py"
GUEST_DEB = "/tmp/usbip-hotplug-test.deb"
# Marks evaluated inside the guest, never on the host proxy.
_GUEST_ONLY_MARKS = {"skip", "skipif", "xfail", "usefixtures", "parametrize", "timeout"}


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


# pytest plugins not loaded in the guest: importing hypothesis alone takes
# ~19 s of emulated CPU there. In-guest tests can still use hypothesis' @given
# (only its pytest plugin is off), not the `benchmark` fixture.
# USBIP_VM_GUEST_PYTEST_ARGS adds arguments to the in-guest pytest command.
GUEST_PYTEST_DISABLE = ("hypothesispytest", "benchmark")
SUITE_TIMEOUT = _env_float("USBIP_VM_SUITE_TIMEOUT", 2400.0)  # the whole guest session
GUEST_TEST_TIMEOUT = _env_float("USBIP_VM_TEST_TIMEOUT", 300.0)  # each guest test
BOOT_TIMEOUT = _env_float("USBIP_VM_BOOT_TIMEOUT", 240.0)


# The guest session starts in the background as soon as the host's test loop
# does, so that the host-side tests (mostly waiting on sockets and child
# processes: about a fifth of two cores) run while the guest works; its output
# is held back until the first guest test reports. USBIP_VM_BACKGROUND=0: boot
# the guest only when the first guest test runs, as before.
BACKGROUND = os.environ.get("USBIP_VM_BACKGROUND", "1") != "0"

# Guests that run the guest tests at the same time, whole modules each (the
# emulated guest leaves about half of two cores idle: it waits on the USB
# stack's timers and on the daemons). USBIP_VM_GUESTS=1: one guest, as before.
GUESTS = max(1, int(_env_float("USBIP_VM_GUESTS", 2)))
# Usual guest seconds of the heavy modules (the split's weights; any module
# not named costs DEFAULT_TEST_SECONDS per test). Only the balance depends on them.
MODULE_SECONDS = {
    "test_fault_matrix.py": 200.0,
    "test_export_real.py": 190.0,
    "test_daemon_real.py": 145.0,
    "test_repeat_real.py": 130.0,
    "test_systemd_units.py": 100.0,
    "test_units_from_the_deb.py": 95.0,
    "test_device_classes_real.py": 40.0,
    "test_qemu_devices.py": 45.0,
    "test_relay_ktls.py": 30.0,
}
DEFAULT_TEST_SECONDS = 12.0

# A kernel fault costs one test and one boot, never the suite timeout.
FAULT_GRACE = _env_float("USBIP_VM_FAULT_GRACE", 30.0)
MAX_GUEST_BOOTS = 4


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


# ---------------------------------------------------------------------------
# both sides


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    # tryfirst: before -m/-k deselection, which must see the vm marker.
    if not IN_VM:  # the guest runs exactly the node ids the host chose
        _deselect_by_hand_only(config, items)
    for i, item in enumerate(items):
        path = Path(str(item.path)).resolve()
        if not _under(path, HERE):
            continue
        item.add_marker(pytest.mark.vm)
        if IN_VM or not _under(path, GUEST_DIR):
            continue
        items[i] = GuestTestProxy.from_original(session, item)


# Tests too slow for CI's budget, run by hand: `pytest -m fault_matrix_full`
# (the rest of the fault matrix).
BY_HAND_MARKS = ("fault_matrix_full",)


def _by_hand(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(mark) for mark in BY_HAND_MARKS)


def _deselect_by_hand_only(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop tests marked with a BY_HAND_MARKS mark unless -m names that mark."""
    expr = config.getoption("markexpr", "") or ""
    dropped = [
        item
        for item in items
        if _by_hand(item)
        and not any(m in expr and item.get_closest_marker(m) for m in BY_HAND_MARKS)
    ]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


# ---------------------------------------------------------------------------
# the kernel's log as the judge (both sides; what a fault is: hotplug.testing.vm.kmsg)


def _read_results(vm: Any, timeout: float) -> str:
    """The guest's results file, as many small output lines (base64, 3 KiB each)
    rather than one frame of the whole file: one frame of ~100 KiB (a session
    with failures and their kernel logs) arrived cut short once, and the read
    then timed out."""
    from hotplug.testing.vm.kernels import VMError

    res = vm.run(["base64", "-w", "3072", GUEST_RESULTS], timeout=timeout, echo=False)
    if not res.ok:
        raise VMError(f"cannot read {GUEST_RESULTS} in the guest: {res.stderr.strip()}")
    return base64.b64decode("".join(res.stdout.split())).decode("utf-8", "replace")


class KernelWatch:
    """Reads the guest's serial console on the host: which test runs (our markers)
    and whether the kernel faulted. Works when the guest itself no longer answers."""

    def __init__(self) -> None:
        self.running: str | None = None
        self.fault_since: float | None = None
        self.lines: list[str] = []

    def feed(self, line: str) -> None:
        if TEST_MARK in line:
            verb, _, nodeid = line.partition(TEST_MARK)[2].strip().partition(" ")
            if self.fault_since is None:
                self.running = nodeid if verb == "start" else None
            return
        if self.fault_since is None and is_fault_line(line):
            self.fault_since = time.monotonic()
        if self.fault_since is not None and len(self.lines) < 60:
            self.lines.append(line)


# ---------------------------------------------------------------------------
# guest side: record results

if IN_VM:

    def _mark(text: str) -> None:
        with contextlib.suppress(OSError), open("/dev/kmsg", "w") as f:
            f.write(f"<5>{TEST_MARK} {text}\n")

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        _mark(f"start {item.nodeid}")
        with contextlib.suppress(OSError):
            item.stash[_KMSG] = KmsgReader()
        yield
        reader = item.stash.get(_KMSG, None)
        if reader is not None:
            reader.close()
        _mark(f"end {item.nodeid}")

    _KMSG = pytest.StashKey["KmsgReader"]()

    def pytest_runtest_logreport(report: pytest.TestReport) -> None:
        out = os.environ.get("USBIP_VM_RESULTS")
        if not out:
            return
        reason = None
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2])
        text = ""
        if report.failed:
            # The short clues first: a CI summary that shows only the start of a
            # failure still shows what the kernel and the daemons said last.
            text = _clues(report) + report.longreprtext
            for title, content in report.sections:
                text += f"\n{'-' * 20} {title} {'-' * 20}\n{content}"
        record = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "duration": report.duration,
            "text": text,
            "reason": reason,
            "wasxfail": getattr(report, "wasxfail", None),
            "props": [[str(k), str(v)] for k, v in report.user_properties],
        }
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if call.when == "teardown":
            _judge(item, report)
        if report.failed:
            report.sections.append(("kernel log (last 80 lines)", _dmesg_tail(80)))

    def _judge(item: pytest.Item, report: pytest.TestReport) -> None:
        """The kernel is the judge: an oops, BUG:, WARNING:, a trace or a hung task
        logged while the test ran fails it, whatever its assertions said. The rest
        of the session would run on a damaged kernel: stop it, and the host boots
        a fresh guest for the tests that did not run."""
        reader = item.stash.get(_KMSG, None)
        if reader is None:
            return
        fault = kernel_fault_lines(reader.read())
        if not fault:
            return
        report.outcome = "failed"
        report.longrepr = (
            "the guest kernel logged a fault while this test ran (the kernel is the judge):\n"
            + "\n".join(fault)
        )
        report.user_properties.append(("kernel_fault", "1"))
        item.session.shouldstop = f"kernel fault in {item.nodeid}: a fresh guest is needed"

    def _dmesg_tail(lines: int) -> str:
        try:
            out = subprocess.run(
                ["dmesg", "--kernel", "--ctime"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return f"(dmesg failed: {exc})"
        return "\n".join(out.splitlines()[-lines:])

    def _clues(report: pytest.TestReport, lines: int = 12) -> str:
        """The last lines of each captured log section, labelled, for the top of a failure."""
        parts = []
        for title, content in report.sections:
            # show_logs prints one block per log file, each headed "----- name".
            blocks = [(title, [])]
            for ln in content.splitlines():
                if ln.startswith("----- "):
                    blocks.append((f"{title}: {ln[6:]}", []))
                elif ln.strip():
                    blocks[-1][1].append(ln)
            for name, body in blocks:
                if body:
                    tail = body[-lines:]
                    parts.append(f"--- {name}: last {len(tail)} lines\n" + "\n".join(tail))
        return "\n".join(parts) + ("\n--- failure\n" if parts else "")


# ---------------------------------------------------------------------------
# host side: proxies and the one VM


@dataclass
class GuestOutcome:
    outcome: str  # passed, failed, error, skipped, xfailed, xpassed
    text: str = ""
    duration: float = 0.0
    props: list[tuple[str, str]] = field(default_factory=list)


def aggregate(records: list[dict[str, Any]]) -> dict[str, GuestOutcome]:
    """Fold per-phase guest reports into one outcome per node id."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_id.setdefault(str(r["nodeid"]), []).append(r)
    out: dict[str, GuestOutcome] = {}
    for nodeid, reps in by_id.items():
        o = GuestOutcome("passed")
        o.duration = sum(float(r.get("duration") or 0) for r in reps)
        # Every phase's report carries the item's properties so far.
        o.props = [(str(k), str(v)) for k, v in reps[-1].get("props") or []]
        failed = [r for r in reps if r["outcome"] == "failed"]
        skipped = [r for r in reps if r["outcome"] == "skipped"]
        call = next((r for r in reps if r["when"] == "call"), None)
        if failed:
            first = failed[0]
            judged = ["kernel_fault", "1"] in (first.get("props") or [])
            # A kernel fault is the test's own failure, though judged at teardown.
            o.outcome = "failed" if first["when"] == "call" or judged else "error"
            o.text = "\n".join(
                (f"[in guest, {r['when']}]\n" if r["when"] != "call" else "") + str(r["text"])
                for r in failed
            )
        elif skipped:
            s = skipped[0]
            if s.get("wasxfail") is not None:
                o.outcome, o.text = "xfailed", str(s["wasxfail"])
            else:
                o.outcome, o.text = "skipped", str(s.get("reason") or "skipped in the guest")
        elif call is not None and call.get("wasxfail") is not None:
            o.outcome = "xpassed"
        elif call is None:
            o.outcome, o.text = "error", "the guest reported no call phase for this test"
        out[nodeid] = o
    return out


def split_modules(nodeids: list[str], guests: int) -> list[list[str]]:
    """The guest tests in `guests` groups of whole modules (a module's rig and
    fixtures live in one guest), balanced by their usual guest seconds (the
    longest first onto the least loaded guest), each group in suite order."""
    modules: dict[str, list[str]] = {}
    for nodeid in nodeids:
        modules.setdefault(nodeid.split("::")[0], []).append(nodeid)

    def cost(module: str) -> float:
        name = Path(module).name
        return MODULE_SECONDS.get(name, DEFAULT_TEST_SECONDS * len(modules[module]))

    groups: list[list[str]] = [[] for _ in range(max(1, guests))]
    loads = [0.0] * len(groups)
    for module in sorted(modules, key=cost, reverse=True):
        i = loads.index(min(loads))
        groups[i].append(module)
        loads[i] += cost(module)
    order = {m: n for n, m in enumerate(modules)}
    return [
        [n for m in sorted(group, key=order.__getitem__) for n in modules[m]]
        for group in groups
        if group
    ]


class Guest:
    """One QEMU guest of the session: booted on first use, its share of the
    guest tests run in one pytest session (a fresh guest after a kernel fault)."""

    def __init__(self, session: VmSession, number: int, name: str) -> None:
        self.session = session
        self.number = number
        self.name = name  # "" for the only guest, else "1", "2", ...
        self.vm: Any = None  # hotplug.testing.vm.guest.GuestVM
        self.console_log: Path | None = None
        self.boot_info = ""
        self.reboots = 0
        self.nodeids: list[str] = []
        self.seconds: float | None = None
        self.guest_rc: int | None = None

    def write(self, line: str) -> None:
        self.session.write(line)

    @property
    def tag(self) -> str:
        return f"[vm{self.name}]"

    def get_vm(self) -> Any:
        """The booted GuestVM; skips (or fails) the calling test if impossible."""
        if self.vm is not None:
            return self.vm
        session = self.session
        if session.skip_reason:
            pytest.skip(session.skip_reason)
        if session.boot_error:
            pytest.fail(session.boot_error, pytrace=False)
        if os.environ.get("USBIP_VM") == "0":
            session.skip_reason = "USBIP_VM=0: the real-kernel VM tests are disabled"
            pytest.skip(session.skip_reason)
        from hotplug.testing.vm.guest import GuestVM
        from hotplug.testing.vm.kernels import MissingDependency, VMError, cache_dir

        logs = cache_dir() / "logs"
        if self.number == 0:
            for pattern in ("console-*.log", "failures-*.log", "kernel-fault*.log"):
                old_logs = sorted(logs.glob(pattern), key=lambda p: p.stat().st_mtime)
                for stale in old_logs[:-9]:  # keep the last few sessions' logs
                    stale.unlink(missing_ok=True)
        suffix = f"-{self.name}" if self.name else ""
        self.console_log = logs / f"console-{os.getpid()}{suffix}.log"
        vm = GuestVM(
            output=self.write,
            prefix=f"{self.tag} ",
            cwd=session.config.rootpath,
            boot_timeout=BOOT_TIMEOUT,
            console_log=self.console_log,
        )
        self.write("")
        try:
            vm.start()
        except MissingDependency as e:
            reason = f"real-kernel VM unavailable: {e}"
            if os.environ.get("USBIP_VM_REQUIRED") == "1":
                session.boot_error = f"USBIP_VM_REQUIRED=1 and {reason}"
                pytest.fail(session.boot_error, pytrace=False)
            session.skip_reason = reason
            self.write(f"{self.tag} SKIPPING VM tests: {e}")
            pytest.skip(session.skip_reason)
        except VMError as e:
            vm.close()
            session.boot_error = f"the test VM did not boot: {e}\n(console log: {self.console_log})"
            pytest.fail(session.boot_error, pytrace=False)
        self.vm = vm
        how = "KVM" if vm.accel == "kvm" else "emulation (TCG)"
        self.boot_info = (
            f"kernel {vm.kernel.release if vm.kernel else '?'} under {how}:"
            f" booted in {vm.boot_seconds:.1f}s" + "".join(f"\n  note: {n}" for n in vm.notes)
        )
        return vm

    def run(self, nodeids: list[str], results: dict[str, GuestOutcome]) -> None:
        """Run `nodeids` here, filling `results`; after a kernel fault, the rest in a
        freshly booted guest (at most MAX_GUEST_BOOTS)."""
        self.nodeids = list(nodeids)
        t0 = time.monotonic()
        pending = list(nodeids)
        for boot in range(MAX_GUEST_BOOTS):
            watch = KernelWatch()
            faulted = self._run_in_guest(pending, results, watch)
            pending = [n for n in pending if n not in results]
            if not faulted:
                break
            # This guest's kernel is damaged or wedged: nothing else runs on it
            # (host-side tests of the harness included); the rest gets a new one.
            self.vm.close(timeout=10)
            self.vm = None
            self.reboots += 1
            if not pending:
                break
            self.write(
                f"{self.tag} kernel fault in the guest: a fresh guest for the {len(pending)}"
                " test(s) still to run"
            )
            if boot == MAX_GUEST_BOOTS - 1:
                for n in pending:
                    results[n] = GuestOutcome(
                        "error", f"not run: the guest kernel faulted {MAX_GUEST_BOOTS} times"
                    )
        self.seconds = time.monotonic() - t0
        if self.vm is not None:
            self._keep_failures(self.vm, results)

    def _run_in_guest(
        self, nodeids: list[str], results: dict[str, GuestOutcome], watch: KernelWatch
    ) -> bool:
        """One guest pytest session over `nodeids`; fills `results`. True if the
        guest kernel faulted (its remaining tests need a fresh guest)."""
        vm = self.get_vm()
        from hotplug.testing.vm.kernels import VMError

        session = self.session
        cmd = session.guest_command() + nodeids
        self.write(
            f"{self.tag} running {len(nodeids)} test(s) in the guest: {shlex.join(cmd[:3])} ..."
        )
        vm.console_watchers.append(watch.feed)
        t0 = time.monotonic()
        try:
            vm.run(["rm", "-f", GUEST_RESULTS], timeout=30, echo=False)
            proc = vm.start_command(
                cmd,
                timeout=SUITE_TIMEOUT,
                env={
                    "USBIP_VM_RESULTS": GUEST_RESULTS,
                    # the checkout is read-only in the guest (if hypothesis is used)
                    "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis",
                    # knobs of guest tests, e.g. the fault matrix's storm seed
                    **{
                        k: v
                        for k, v in os.environ.items()
                        if k.startswith(("USBIP_FAULT_", "USBIP_REPEAT_"))
                    },
                    **session.deb_env(vm),
                },
                prefix=f"[guest{self.name}] ",
            )
            # A wedged kernel may never let the session end (a task stuck in the
            # kernel ignores pytest-timeout's signal): once the console shows a
            # fault, the session gets FAULT_GRACE seconds to finish by itself.
            while not proc.done:
                proc._done.wait(1.0)
                if watch.fault_since is not None and (
                    time.monotonic() - watch.fault_since > FAULT_GRACE
                ):
                    break
            wedged = not proc.done
            res = proc.wait(timeout=15) if not wedged else None
            raw = _read_results(vm, timeout=120 if not wedged else 15)
        except VMError as e:
            if watch.fault_since is None:
                session.run_error = f"the guest test session broke down: {e}\n{vm.console_tail(20)}"
                pytest.fail(session.run_error, pytrace=False)
            res, raw, wedged = None, "", True
        finally:
            with contextlib.suppress(ValueError):
                vm.console_watchers.remove(watch.feed)
        records = [json.loads(ln) for ln in raw.splitlines() if ln.strip()]
        outcomes = aggregate(records)
        results.update(outcomes)
        faulted = watch.fault_since is not None or any(
            ("kernel_fault", "1") in o.props for o in outcomes.values()
        )
        if faulted:
            # The console shows notices and worse; the stack of a hung task and
            # the lines around an oops are below that: read the whole log if the
            # guest still answers.
            trace = kernel_fault_lines(self._kernel_log_after_fault(vm)) or watch.lines
            culprit = watch.running or next((n for n in nodeids if n not in results), None)
            if culprit is None:
                self.write(f"{self.tag} the guest kernel faulted outside any test:")
                self.write("\n".join(trace))
            if culprit is not None and (culprit not in results or wedged):
                results[culprit] = GuestOutcome(
                    "failed",
                    "the guest kernel faulted while this test ran (seen on the serial console"
                    + ("; the guest then hung" if wedged else "")
                    + "); the tests after it ran in a fresh guest:\n"
                    + "\n".join(trace),
                )
        if res is not None and res.timed_out:
            session.run_error = (
                f"the guest test session hit USBIP_VM_SUITE_TIMEOUT={SUITE_TIMEOUT:.0f}s"
            )
        rc = res.returncode if res is not None else "none: guest abandoned"
        self.write(
            f"{self.tag} guest session done in {time.monotonic() - t0:.1f}s (pytest exit {rc})"
        )
        self.guest_rc = res.returncode if res is not None else None
        return faulted

    def _kernel_log_after_fault(self, vm: Any) -> list[str]:
        """The guest's whole kernel log, kept next to the console log; [] if the
        guest no longer answers."""
        try:
            res = vm.run(["dmesg", "--kernel"], timeout=20, echo=False)
        except Exception as exc:  # a wedged guest: the console's lines must do
            self.write(f"{self.tag} no kernel log from the guest after the fault: {exc}")
            return []
        if self.console_log is not None:
            name = self.console_log.name.replace("console-", f"kernel-fault{self.reboots + 1}-")
            path = self.console_log.with_name(name)
            with contextlib.suppress(OSError):
                path.write_text(res.stdout)
                self.write(f"{self.tag} the guest's kernel log after the fault: {path}")
        return str(res.stdout).splitlines()

    def _keep_failures(self, vm: Any, results: dict[str, GuestOutcome]) -> None:
        """Failed guest tests in full, and the guest's kernel log, next to the console
        log: what a truncated CI summary leaves out is still on the machine."""
        failed = {
            n: o
            for n, o in results.items()
            if n in self.nodeids and o.outcome in ("failed", "error")
        }
        if not failed or self.console_log is None:
            return
        path = self.console_log.with_name(self.console_log.name.replace("console-", "failures-"))
        with contextlib.suppress(Exception), open(path, "w", encoding="utf-8") as f:
            for nodeid, o in failed.items():
                f.write(f"===== {o.outcome}: {nodeid}\n{o.text}\n\n")
            dmesg = vm.run(["dmesg", "--ctime"], timeout=60, echo=False)
            f.write(f"===== guest kernel log\n{dmesg.stdout}\n")
            self.write(f"{self.tag} failed guest tests in full, and the guest's kernel log: {path}")

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
            self.vm = None


class VmSession:
    """The session's guests (GUESTS of them, each running a share of the guest
    tests at the same time), booted on first use, stopped at session end."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.skip_reason: str | None = None
        self.boot_error: str | None = None
        self.results: dict[str, GuestOutcome] | None = None
        self.run_error: str | None = None
        self.suite_seconds: float | None = None
        self.ran = 0
        self.guests = [Guest(self, 0, "")]
        self.deb: Path | None = None  # built for DEB_TESTS
        self.deb_error: str | None = None
        self.deb_info = ""
        # The background guest session (BACKGROUND): its thread, what it raised
        # (a skip or failure meant for every guest test), and its output held
        # back (None: written at once) while host-side tests use the terminal.
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._held: list[str] | None = None
        self._lock = threading.Lock()
        # A private copy of the terminal: pytest's fd capture cannot swallow
        # what the VM threads print, whenever they print it.
        self._term: IO[str] | None = None
        capman = config.pluginmanager.getplugin("capturemanager")
        suspended = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
        with suspended, contextlib.suppress(OSError, ValueError):
            # fd 1 is the real stdout only while capture is suspended.
            self._term = os.fdopen(os.dup(1), "w", buffering=1)

    def write(self, line: str) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append(line)
                return
            self._write_now(line)

    def _write_now(self, line: str) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        if self._term is not None:
            self._term.write(line + "\n")
        else:  # pragma: no cover
            sys.__stderr__.write(line + "\n")  # type: ignore[union-attr]

    def get_vm(self) -> Any:
        """The first guest's booted GuestVM (host-side tests drive it)."""
        return self.guests[0].get_vm()

    def start_background(self, items: list[pytest.Item]) -> None:
        """Boot the guests and run their sessions now, in a thread (BACKGROUND)."""
        self._held = []

        def run() -> None:
            try:
                self.guest_results(items)
            except BaseException as exc:  # pytest's skip/fail outcomes included
                self._thread_error = exc

        self._thread = threading.Thread(target=run, name="guest-session", daemon=True)
        self._thread.start()

    def join_background(self) -> None:
        """The guests' output so far, live from now on; then wait for their sessions.
        Re-raises what a session raised (a skip or a failure), for every guest test."""
        self._release_output()
        thread = self._thread
        if thread is None:
            return
        while thread.is_alive():
            thread.join(1.0)  # in steps: pytest-timeout's signal still gets through
        if self._thread_error is not None:
            raise self._thread_error

    def _release_output(self) -> None:
        with self._lock:
            held, self._held = self._held, None
            for line in held or []:
                self._write_now(line)

    def guest_results(self, items: list[pytest.Item]) -> dict[str, GuestOutcome]:
        """Run every selected guest test (once), split by module over GUESTS guests
        that run at the same time, one pytest session each."""
        if self.results is not None:
            return self.results
        if self.run_error:
            pytest.fail(self.run_error, pytrace=False)
        # The session's final items: after -m / -k / --deselect.
        nodeids = [i.nodeid for i in items if isinstance(i, GuestTestProxy)]
        self.ran = len(nodeids)
        if any(n.startswith(DEB_TESTS) for n in nodeids):
            self._build_deb()
        groups = split_modules(nodeids, GUESTS)
        if len(groups) > 1:
            self.guests = [Guest(self, i, str(i + 1)) for i in range(len(groups))]
        results: dict[str, GuestOutcome] = {}
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def run(guest: Guest, group: list[str]) -> None:
            try:
                guest.run(group, results)
            except BaseException as exc:  # a skip or failure for every guest test
                errors.append(exc)

        threads = [
            threading.Thread(target=run, args=(guest, group), name=f"guest{guest.name}")
            for guest, group in zip(self.guests, groups, strict=False)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(1.0)
        self.suite_seconds = time.monotonic() - t0
        if errors:
            raise errors[0]
        self.results = {n: results[n] for n in nodeids if n in results}
        return self.results

    def _build_deb(self) -> None:
        """The package from this checkout (cached by source hash), before the guest runs;
        a failure is reported by the package's tests, the others still run."""
        from tests.debpackage import DebBuildError, build_deb

        t0 = time.monotonic()
        try:
            built = build_deb()
        except DebBuildError as e:
            self.deb_error = str(e)
            return
        self.deb = built.path
        self.deb_info = f"package {self.deb.name}: {built.said} ({time.monotonic() - t0:.1f}s)"
        self.write(f"[vm] {self.deb_info}")

    def deb_env(self, vm: Any) -> dict[str, str]:
        if self.deb_error:
            return {"USBIP_VM_DEB_ERROR": self.deb_error}
        if self.deb is None:
            return {}
        vm.write_file(GUEST_DEB, self.deb.read_bytes())
        return {"USBIP_VM_DEB": GUEST_DEB}

    def guest_command(self) -> list[str]:
        opt = self.config.option
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            *(a for name in GUEST_PYTEST_DISABLE for a in ("-p", f"no:{name}")),
            "-v",
            "--color=no",
            f"--rootdir={self.config.rootpath}",
            f"--timeout={GUEST_TEST_TIMEOUT:.0f}",
        ]
        if self.config.inipath is not None:
            cmd += ["-c", str(self.config.inipath)]
        if getattr(opt, "capture", "fd") == "no":
            cmd.append("-s")
        if getattr(opt, "tbstyle", "auto") not in ("auto", None):
            cmd.append(f"--tb={opt.tbstyle}")
        return cmd + shlex.split(os.environ.get("USBIP_VM_GUEST_PYTEST_ARGS", ""))

    def close(self) -> None:
        for guest in self.guests:
            guest.close()
        if self._thread is not None:
            self._thread.join(30)  # ends once its VMs are gone
            self._release_output()
        if self._term is not None:
            with contextlib.suppress(OSError):
                self._term.close()
            self._term = None


def _vm_session(config: pytest.Config) -> VmSession:
    key = "_usbip_vm_session"
    state: VmSession | None = getattr(config, key, None)
    if state is None:
        state = VmSession(config)
        setattr(config, key, state)
    return state


class GuestTestProxy(pytest.Item):
    """Host stand-in for one in-guest test; reports the guest's outcome."""

    @classmethod
    def from_original(cls, session: pytest.Session, item: pytest.Item) -> GuestTestProxy:
        # Parent is the session, not the guest module: no guest fixtures,
        # module marks (skipif on USBIP_IN_VM...) or setup run on the host.
        proxy: GuestTestProxy = cls.from_parent(
            session, name=item.name, nodeid=item.nodeid, path=item.path
        )
        for mark in item.iter_markers():
            if mark.name not in _GUEST_ONLY_MARKS:
                proxy.own_markers.append(mark)
                proxy.keywords[mark.name] = mark
        # One proxy runs the whole guest session: give it that much time.
        budget = BOOT_TIMEOUT + SUITE_TIMEOUT + 120
        proxy.add_marker(pytest.mark.timeout(budget), append=False)
        # -k matches on module/class names too.
        for node in item.listchain():
            if not isinstance(node, pytest.Session):
                proxy.extra_keyword_matches.add(node.name)
        proxy.extra_keyword_matches.update(item.listextrakeywords())
        proxy._location = item.location
        return proxy

    _location: tuple[str, int | None, str]

    def reportinfo(self) -> tuple[Any, int | None, str]:
        _path, lineno, name = self._location
        return self.path, lineno, name

    _outcome: GuestOutcome | None = None

    def setup(self) -> None:
        # The first proxy to get here runs the whole guest session (or waits for
        # the one started in the background).
        state = _vm_session(self.config)
        state.join_background()
        results = state.guest_results(self.session.items)
        outcome = results.get(self.nodeid)
        if outcome is None:
            rcs = ", ".join(str(g.guest_rc) for g in state.guests if self.nodeid in g.nodeids)
            why = state.run_error or (f"guest pytest exited {rcs} without a report for this test")
            pytest.fail(f"{why}; see the [guest] output above", pytrace=False)
        self.user_properties.extend(outcome.props)
        self.user_properties.append(("guest_seconds", f"{outcome.duration:.2f}"))
        self._outcome = outcome
        if outcome.outcome == "error":  # failed in guest setup/teardown: ERROR here too
            pytest.fail(f"in-guest test errored:\n{outcome.text}", pytrace=False)

    def runtest(self) -> None:
        outcome = self._outcome
        assert outcome is not None
        if outcome.outcome in ("passed", "xpassed"):
            return
        if outcome.outcome == "skipped":
            reason = outcome.text.removeprefix("Skipped: ")
            try:  # report the skip at the guest test's location, as pytest does for marks
                exc = pytest.skip.Exception(f"[in guest] {reason}", _use_item_location=True)
            except TypeError:  # pragma: no cover - older/newer pytest
                exc = pytest.skip.Exception(f"[in guest] {reason}")
            raise exc
        if outcome.outcome == "xfailed":
            pytest.xfail(f"[in guest] {outcome.text}")
        pytest.fail(f"in-guest test failed:\n{outcome.text}", pytrace=False)


@pytest.fixture(scope="session")
def guest_vm(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The session's booted GuestVM, for host-side tests that drive it directly."""
    if IN_VM:
        pytest.skip("already inside the test VM")
    state = _vm_session(request.config)
    state.join_background()  # one guest at a time: after the guest session
    yield state.get_vm()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Any:
    if (
        not IN_VM
        and BACKGROUND
        and not session.config.option.collectonly
        and any(isinstance(item, GuestTestProxy) for item in session.items)
    ):
        _vm_session(session.config).start_background(session.items)
    yield


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state: VmSession | None = getattr(session.config, "_usbip_vm_session", None)
    if state is not None:
        state.close()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state: VmSession | None = getattr(config, "_usbip_vm_session", None)
    booted = state is not None and any(g.vm is not None or g.boot_info for g in state.guests)
    if state is None or (state.results is None and not booted and not state.boot_error):
        return
    tr = terminalreporter
    tr.section("usbip-hotplug test VM")
    if state.skip_reason:
        tr.write_line(f"skipped: {state.skip_reason}")
        return
    for guest in state.guests:
        if guest.boot_info:
            label = f"guest {guest.name}: " if guest.name else ""
            tr.write_line(label + guest.boot_info)
    if state.boot_error:
        tr.write_line(state.boot_error)
    if state.deb_info:
        tr.write_line(state.deb_info)
    if state.suite_seconds is not None:
        tr.write_line(f"guest pytest session: {state.suite_seconds:.1f}s for {state.ran} test(s)")
    if len(state.guests) > 1:
        for guest in state.guests:
            took = f"{guest.seconds:.1f}s" if guest.seconds is not None else "-"
            tr.write_line(f"  guest {guest.name}: {len(guest.nodeids)} test(s) in {took}")
    reboots = sum(g.reboots for g in state.guests)
    if reboots:
        tr.write_line(f"fresh guests booted after a kernel fault: {reboots}")
    for nodeid, o in (state.results or {}).items():
        props = ", ".join(f"{k}={v}" for k, v in o.props)
        tr.write_line(
            f"  {o.outcome:8} {o.duration:7.1f}s  {nodeid}" + (f"  [{props}]" if props else "")
        )
    for guest in state.guests:
        if guest.console_log is not None:
            tr.write_line(f"guest console log: {guest.console_log}")
