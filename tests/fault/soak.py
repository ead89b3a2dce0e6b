"""The soak scenario: many plug/unplug cycles across many devices and three
targets, one of them flapping (issue 7, soak). tests/fault/test_soak.py runs
it with 500 cycles; `python -m bench.soak` runs it longer and prints the
figures (bench/soak.py says what it does in full).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.rig import FakeKernel, HotplugDaemon, ProcStats, Usbipa, free_tcp_port, raise_fd_limit

TARGETS = ("a", "b", "c")  # c flaps
PRODUCT = {"a": 0x00A0, "b": 0x00B0, "c": 0x00C0}
POLICY = """\
version: 1
targets:
{targets}
rules:
  - {{name: to-a, match: {{product: "00a0"}}, export: a}}
  - {{name: to-b, match: {{product: "00b0"}}, export: b}}
  - {{name: to-c, match: {{product: "00c0"}}, export: c}}
"""
TARGET_LINE = (
    '  {name}: {{address: "127.0.0.1:{port}", connect_timeout: 1, handshake_timeout: 2, '
    "retry: {{initial: 0.1, max: 1, jitter: 0.1}}}}"
)


@dataclass
class SoakResult:
    cycles: int = 0
    toggles: int = 0
    flaps: list[str] = field(default_factory=list)
    walk_seconds: float = 0.0
    converge_seconds: float = 0.0
    drain_seconds: float = 0.0
    plugged_at_end: int = 0
    resources: dict[str, tuple[ProcStats, ProcStats, ProcStats]] = field(default_factory=dict)
    work_done: dict[str, int] = field(default_factory=dict)  # what the events turned into
    problems: list[str] = field(default_factory=list)


PORTS = 16


def busid(port: int) -> str:
    return f"1-{port + 1}"


def target_of(n: int) -> str:
    return TARGETS[n % len(TARGETS)]


class Rig:
    def __init__(self, work: Path, devices: int) -> None:
        self.work = work
        self.devices = devices
        per_target = -(-devices // len(TARGETS))
        controllers = -(-per_target // 15)
        self.dev = FakeKernel(work / "device", vhci=False)
        self.apps = {
            t: FakeKernel(work / f"app-{t}", stub=False, vhci_controllers=controllers)
            for t in TARGETS
        }
        for kernel in (self.dev, *self.apps.values()):
            kernel.start()
        self.usbipa = {
            t: Usbipa(self.apps[t], work / f"usbipa-{t}", port=free_tcp_port() if t == "c" else 0)
            for t in TARGETS
        }
        for u in self.usbipa.values():
            u.start()
        targets = "\n".join(TARGET_LINE.format(name=t, port=self.usbipa[t].port) for t in TARGETS)
        self.daemon = HotplugDaemon(
            self.dev,
            work / "daemon",
            POLICY.format(targets=targets),
            args=("--poll-interval", "0.2"),
        )
        self.daemon.start()
        self.plugged: set[int] = set()
        self.port_of: dict[int, int] = {}  # plugged device -> its port

    def close(self) -> None:
        self.daemon.stop()
        for u in self.usbipa.values():
            u.stop()
        for kernel in (*self.apps.values(), self.dev):
            kernel.terminate()
        for kernel in (*self.apps.values(), self.dev):
            kernel.stop()

    def free_ports(self) -> list[int]:
        return sorted(set(range(PORTS)) - set(self.port_of.values()))

    def toggle(self, n: int, port: int | None = None) -> None:
        """Unplug device `n`, or plug it into `port` (default: the first free one)."""
        if n in self.plugged:
            self.plugged.discard(n)
            self.daemon.unplug(busid(self.port_of.pop(n)))
        else:
            port = self.free_ports()[0] if port is None else port
            self.plugged.add(n)
            self.port_of[n] = port
            self.daemon.plug(busid(port), product=PRODUCT[target_of(n)])

    # -------------------------------------------------------------- target C

    def take_down(self, how: str) -> None:
        c = self.usbipa["c"]
        c.kill()
        if how == "reboot":
            self.apps["c"].reboot()  # links dropped, vhci empty
            for record in (c.state_dir / "ports").glob("*.json"):
                record.unlink()  # /run is emptied by a reboot

    def bring_up(self) -> None:
        self.usbipa["c"].start()

    # -------------------------------------------------------------- checks

    def convergence_problems(self) -> list[str]:
        problems = []
        for t in TARGETS:
            want = {
                self.dev.devid(busid(self.port_of[n])) for n in self.plugged if target_of(n) == t
            }
            try:
                have = self.apps[t].used_devids()
            except Exception as exc:  # a status file caught half-written
                return [f"target {t}: {exc}"]
            if have != want:
                problems.append(
                    f"target {t}: {len(want - have)} wanted ports missing, "
                    f"{len(have - want)} unwanted ports attached"
                )
            records = len(self.usbipa[t].session_records())
            if records != len(want):
                problems.append(f"target {t}: usbipa keeps {records} records for {len(want)}")
        wanted = {busid(port) for port in self.port_of.values()}
        not_used = sorted(b for b in wanted if self.dev.stub_status(b) != "2")
        if not_used:
            problems.append(f"{len(not_used)} plugged devices not exported: {not_used[:5]}")
        if set(self.dev.live_match_table()) != wanted:
            problems.append(f"usbip-host's match_busid {len(self.dev.live_match_table())} entries")
        if set(self.daemon.records()) != wanted:
            problems.append(f"the daemon keeps {len(self.daemon.records())} export records")
        return problems


def wait_until_clean(check: Callable[[], list[str]], timeout: float) -> tuple[float, list[str]]:
    """Poll `check` until it finds nothing; (seconds it took, what is still wrong)."""
    start = time.monotonic()
    while True:
        problems = check()
        if not problems or time.monotonic() - start > timeout:
            return time.monotonic() - start, problems
        time.sleep(0.05)  # polling interval, not a synchronisation


def run_soak(
    work: Path,
    cycles: int,
    devices: int = 50,
    flaps: int = 10,
    seed: int = 1,
    timeout: float = 60.0,
    max_rss_growth_mb: float = 10.0,
) -> SoakResult:
    result = SoakResult()
    rng = random.Random(seed)
    raise_fd_limit(1024 + 8 * devices)
    rig = Rig(work, devices)
    try:
        steady: dict[str, HotplugDaemon | Usbipa] = {
            "usbip-hotplug run": rig.daemon,
            "usbipa a": rig.usbipa["a"],
            "usbipa b": rig.usbipa["b"],
        }
        start = {name: p.stats() for name, p in steady.items()}
        # C goes down and comes back `flaps` times, evenly over the walk.
        period = max(2, (2 * cycles) // max(1, flaps))
        down = False
        walk_start = time.monotonic()
        while result.cycles < cycles:
            n = rng.randrange(devices)
            if n not in rig.plugged and not rig.free_ports():
                n = rng.choice(sorted(rig.plugged))  # every port taken: pull one out
            if n in rig.plugged:
                result.cycles += 1
                rig.toggle(n)
            else:
                rig.toggle(n, rng.choice(rig.free_ports()))
            result.toggles += 1
            if result.toggles % period == 0 and not down and len(result.flaps) < flaps:
                how = "crash" if len(result.flaps) % 2 == 0 else "reboot"
                rig.take_down(how)
                result.flaps.append(how)
                down = True
            elif result.toggles % period == period // 2 and down:
                rig.bring_up()
                down = False
        if down:
            rig.bring_up()
        result.walk_seconds = time.monotonic() - walk_start
        result.plugged_at_end = len(rig.plugged)
        result.converge_seconds, problems = wait_until_clean(rig.convergence_problems, timeout)
        result.problems += [f"not converged: {p}" for p in problems]
        mid = {name: p.stats() for name, p in steady.items()}
        # Everything out: back to where it started.
        for n in sorted(rig.plugged):
            rig.toggle(n)

        def leftovers() -> list[str]:
            found = rig.convergence_problems()
            for name, p in steady.items():
                now = p.stats()
                if now.fds != start[name].fds or now.threads != start[name].threads:
                    found.append(
                        f"{name}: {now.fds} fds / {now.threads} threads, "
                        f"started with {start[name].fds} / {start[name].threads}"
                    )
            return found

        result.drain_seconds, problems = wait_until_clean(leftovers, timeout)
        result.problems += [f"after unplugging all: {p}" for p in problems]
        end = {name: p.stats() for name, p in steady.items()}
        for name in steady:
            result.resources[name] = (start[name], mid[name], end[name])
            growth = (end[name].rss_kb - start[name].rss_kb) / 1024
            if growth > max_rss_growth_mb:
                result.problems.append(f"{name}: RSS grew {growth:.1f} MB over the soak")
        daemon_log = rig.daemon.log()
        usbipa_logs = "".join(u.log() for u in rig.usbipa.values())
        result.work_done = {
            "exports started": daemon_log.count("hotplug.daemon: exporting "),
            "exports done": daemon_log.count("hotplug.export: exported "),
            "exports failed or stopped": daemon_log.count("hotplug.daemon: export of "),
            "unexports sent": daemon_log.count("hotplug.export: unexported ")
            + daemon_log.count("unexport: "),
            "ports attached by usbipa": usbipa_logs.count("usbipa: attached "),
        }
        everyone: dict[str, HotplugDaemon | Usbipa] = {"daemon": rig.daemon}
        everyone.update({f"usbipa {t}": u for t, u in rig.usbipa.items()})
        for name, proc in everyone.items():
            text = proc.log()
            for bad in ("Traceback", "internal error", "Task exception"):
                if bad in text:
                    result.problems.append(f"{name}'s log has {bad!r}")
            if not proc.alive():
                result.problems.append(f"{name} died")
    finally:
        rig.close()
    return result
