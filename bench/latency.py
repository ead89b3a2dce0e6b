"""Plug-to-exported latency, step by step (issue 7, item 1).

    python -m bench.latency --cycles 1000

Three phases of --cycles plug/unplug cycles each, with real usbipa over
loopback TCP; each side has its own fake kernel process (two machines).

1. The export transaction: each cycle plugs a fake device, then times, from
   the moment its event would enter the daemon:
     event->Device   reading the device from sysfs (what udev hands the daemon)
     policy          Policy.decide + the target's address
     checks+read     export()'s own sysfs reads (before and after binding)
     bind            UsbipHost.bind: unbind from its driver, match_busid, bind
     connect         TCP connect to usbipa + socket options
     handshake       OP_REQ_EXPORT out, 8-byte reply in; usbipa attaches the
                     vhci port before it replies: "attached" is this step's end
     hand-over       the socket fd written to usbip_sockfd
     confirm         usbip_status read back
   then unplugs the device and times the unexport the daemon would send.
   The real `hotplug.device.export.export` runs unchanged: its steps are timed by
   wrapping the functions it calls (time.perf_counter around each).
2. usbipa's side of the handshake (reap, find port, attach, record), timed
   in this process by calling the same Appd methods on a fake vhci.
3. The real `usbip-hotplug run` (under bench.probe, which stamps each step
   with CLOCK_MONOTONIC): from the add event written to its event FIFO to the
   port attached on the application side (seen by inotify on the fake vhci's
   status file), and to export() done. --no-daemon skips it.

Baselines, measured in the same run and interleaved with the cycles:
  bare TCP        connect + 8-byte request + 8-byte reply against an asyncio
                  server shaped like usbipa (bench.echo_server)
  fake sysfs write  one write to a fake-kernel control file (the unit of cost
                  of bind, hand-over and attach in this rig; a real sysfs
                  write is a syscall, not a round trip to another process)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar
from unittest import mock

import hotplug.device.export as export_mod
import hotplug.device.transport as transport_mod
from bench.harness import (
    DirWatch,
    EchoServer,
    add_dir_option,
    machine,
    scratch_dir,
    summary,
    time_ms,
    wait_for,
)
from hotplug import log
from hotplug.app.config import AllowRule, AppdConfig, parse_network
from hotplug.app.server import Appd
from hotplug.device.export import device_record, export, unexport
from hotplug.device.policy.merge import parse_policy
from hotplug.device.policy.model import Policy
from hotplug.device.transport import Remote
from hotplug.kernel.sysfs import read_device
from hotplug.usb import Device, Speed
from hotplug.wire.address import Endpoint
from hotplug.wire.protocol import DeviceRecord, ExportRequest
from hotplug.wire.sockets import Timeouts
from tests.rig import FakeKernel, HotplugDaemon, Usbipa

P = ParamSpec("P")
R = TypeVar("R")

TARGET_MS = {"p50": 5.0, "p99": 25.0}
BUSIDS = ("1-1", "1-2", "1-3", "1-4")
CLIENT_STEPS = (
    "event->Device",
    "policy",
    "checks+read",
    "bind",
    "connect",
    "handshake",
    "hand-over",
    "confirm",
)
SERVER_STEPS = ("reap", "find port", "attach", "record", "reply")

POLICY = """\
version: 1
targets:
  lab: {{address: "127.0.0.1:{port}"}}
rules:
  - name: bench-keyboards
    match: {{interface_class: hid}}
    action: ignore
  - name: bench-devices
    match: {{vendor: "1d6b", product: "01??"}}
    export: lab
"""


class Steps:
    """Accumulates time per named step for the current cycle.

    Only the outermost timed call counts: bind's own sysfs reads are bind's
    time, not "checks+read" as well.
    """

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        self.depth = 0

    def reset(self) -> None:
        self.current = {}
        self.marks = {}

    def wrap(self, name: str, fn: Callable[P, R], mark: str | None = None) -> Callable[P, R]:
        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.depth -= 1
                self.current[name] = self.current.get(name, 0.0) + (end - start) * 1000.0
                if mark is not None:
                    self.marks[mark] = end

        return timed


def policy_for(port: int) -> Policy:
    return parse_policy([("bench-policy.yaml", POLICY.format(port=port))])


# --------------------------------------------------------------------------- phase 1


def client_cycles(
    cycles: int, warmup: int, dev: FakeKernel, app: FakeKernel, usbipa: Usbipa, echo: EchoServer
) -> dict[str, list[float]]:
    stub = dev.stub()
    policy = policy_for(usbipa.port)
    steps = Steps()
    timeouts = Timeouts()
    out: dict[str, list[float]] = {
        name: []
        for name in (
            *CLIENT_STEPS,
            "to attached",
            "to exported",
            "other",
            "unexport",
            "bare TCP",
            "fake sysfs write",
            "fake writes/export",
        )
    }
    match_busid = dev.tree.paths.stub_driver / "match_busid"
    writes = [0]
    real_write = stub.write

    def counted_write(path: Path, text: str) -> None:
        writes[0] += 1
        real_write(path, text)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(stub, "write", counted_write))
        stack.enter_context(
            mock.patch.object(
                stub, "require_loaded", steps.wrap("checks+read", stub.require_loaded)
            )
        )
        stack.enter_context(mock.patch.object(stub, "bind", steps.wrap("bind", stub.bind)))
        stack.enter_context(
            mock.patch.object(stub, "hand_over", steps.wrap("hand-over", stub.hand_over))
        )
        stack.enter_context(mock.patch.object(stub, "status", steps.wrap("confirm", stub.status)))
        stack.enter_context(
            mock.patch.object(export_mod, "read_device", steps.wrap("checks+read", read_device))
        )
        stack.enter_context(
            mock.patch.object(
                transport_mod, "connect", steps.wrap("connect", transport_mod.connect)
            )
        )
        stack.enter_context(
            mock.patch.object(
                transport_mod,
                "_exchange",
                steps.wrap("handshake", transport_mod._exchange, mark="attached"),
            )
        )
        for n in range(warmup + cycles):
            busid = BUSIDS[n % len(BUSIDS)]
            dev.plug(busid)
            steps.reset()
            t0 = time.perf_counter()
            # --- the event enters the daemon
            device = steps.wrap("event->Device", read_device)(dev.tree.paths, busid)
            t1 = time.perf_counter()
            decision = policy.decide(device)
            assert decision.action == "export" and decision.target is not None
            target = policy.targets[decision.target]
            endpoint = Endpoint(target.host, target.port)
            steps.current["policy"] = time_ms(t1)
            writes[0] = 0
            export(stub, busid, Remote.plain(endpoint, timeouts))
            export_writes = writes[0]
            total = time_ms(t0)
            attached = (steps.marks["attached"] - t0) * 1000.0
            taken = dict(steps.current)  # before unexport() runs the same wrapped steps
            # --- unplug; the daemon would send the unexport
            dev.unplug(busid)
            t2 = time.perf_counter()
            unexport(stub, busid, Remote.plain(endpoint, timeouts))
            unexport_ms = time_ms(t2)
            wait_for(lambda: not app.used_ports(), what="the vhci port to be freed")
            # --- baselines, interleaved so both see the same machine
            t3 = time.perf_counter()
            echo.exchange()
            bare = time_ms(t3)
            t4 = time.perf_counter()
            real_write(match_busid, f"{'add' if n % 2 == 0 else 'del'} 9-99")
            write = time_ms(t4)
            if n < warmup:
                continue
            for name in CLIENT_STEPS:
                out[name].append(taken.get(name, 0.0))
            out["to attached"].append(attached)
            out["to exported"].append(total)
            out["other"].append(total - sum(taken.values()))
            out["unexport"].append(unexport_ms)
            out["bare TCP"].append(bare)
            out["fake sysfs write"].append(write)
            out["fake writes/export"].append(float(export_writes))
    return out


# --------------------------------------------------------------------------- phase 2


def server_cycles(
    cycles: int, warmup: int, app: FakeKernel, workdir: Path
) -> dict[str, list[float]]:
    """usbipa's export path, in this process, on the same kind of fake vhci."""
    config = AppdConfig(
        listen=("127.0.0.1",),
        allow=(AllowRule((parse_network("127.0.0.0/8", "bench"),)),),
        state_dir=str(workdir / "inproc-state"),
    )
    appd = Appd(config, app.vhci())
    # usbipa logs each attach and detach; keep that cost in, as in the daemon.
    handler = logging.FileHandler(workdir / "inproc-usbipa.log")
    handler.setFormatter(log.StderrFormatter(with_time=False))
    logger = logging.getLogger("usbipa")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    steps = Steps()
    sessions, vhci = appd.sessions, appd.vhci
    appd.sessions.reap = steps.wrap("reap", sessions.reap)  # type: ignore[method-assign]
    vhci.find_free_port = steps.wrap("find port", vhci.find_free_port)  # type: ignore[method-assign]
    vhci.attach = steps.wrap("attach", vhci.attach)  # type: ignore[method-assign]
    sessions.add = steps.wrap("record", sessions.add)  # type: ignore[method-assign]
    out: dict[str, list[float]] = {name: [] for name in (*SERVER_STEPS, "usbipa total", "other")}
    record = _sample_record()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        for n in range(warmup + cycles):
            client = socket.create_connection(listener.getsockname())
            conn, _ = listener.accept()
            request = ExportRequest(record)
            steps.reset()
            t0 = time.perf_counter()
            status, port = appd._export(conn, request, "127.0.0.1", client.getsockname()[1])
            t1 = time.perf_counter()
            conn.sendall(b"\x01\x11\x00\x06\x00\x00\x00\x00")
            steps.current["reply"] = time_ms(t1)
            total = time_ms(t0)
            assert status == 0 and port is not None, status
            conn.close()
            appd._detach(port, "bench")
            client.close()
            if n < warmup:
                continue
            for name in SERVER_STEPS:
                out[name].append(steps.current.get(name, 0.0))
            out["usbipa total"].append(total)
            out["other"].append(total - sum(steps.current.values()))
    logger.removeHandler(handler)
    handler.close()
    return out


def _sample_record() -> DeviceRecord:
    return device_record(
        Device(
            busid="1-1",
            path="/sys/devices/fake/usb1/1-1",
            busnum=1,
            devnum=2,
            speed=Speed.HIGH,
            vendor=0x1D6B,
            product=0x0104,
        )
    )


# --------------------------------------------------------------------------- phase 3

DAEMON_POLICY = """\
version: 1
targets:
  lab: {{address: "127.0.0.1:{port}", connect_timeout: 5, handshake_timeout: 5}}
rules:
  - name: bench-devices
    match: {{vendor: "1d6b"}}
    export: lab
"""

# (row, from mark, to mark); "event" is the moment the bench wrote the add event.
DAEMON_STEPS = (
    ("event->read", "event", "event-add"),
    ("policy+reconcile", "event-add", "decided"),
    ("thread start", "decided", "export-start"),
    ("checks+read", "export-start", "bind-start"),
    ("bind", "bind-start", "bind-end"),
    ("read after bind", "bind-end", "connect-start"),
    ("connect", "connect-start", "connect-end"),
    ("handshake", "handshake-start", "handshake-end"),
    ("hand-over", "hand-over-start", "hand-over-end"),
    ("confirm+log", "hand-over-end", "export-end"),
)


def one_daemon_cycle(
    busid: str, dev: FakeKernel, app: FakeKernel, daemon: HotplugDaemon, watch: DirWatch
) -> tuple[int, int]:
    """Plug, wait until attached and exported, unplug, wait until all is clean.

    Returns (event written, port seen attached) as CLOCK_MONOTONIC ns.
    """
    devid = (1 << 16) | dev.plug(busid)
    t0 = time.monotonic_ns()
    daemon.events(("add", busid))
    seen = watch.wait(lambda: devid in app.used_devids(), 10, f"{busid} attached")
    wait_for(lambda: dev.stub_status(busid) == "2", 10, f"{busid} exported")
    dev.unplug(busid)
    daemon.events(("remove", busid))
    watch.wait(lambda: not app.used_devids(), 10, "the port to be freed")
    wait_for(
        lambda: busid not in daemon.records() and busid not in dev.live_match_table(),
        10,
        f"the daemon to be done with {busid}",
    )
    return t0, seen


def daemon_cycles(
    cycles: int, warmup: int, dev: FakeKernel, app: FakeKernel, usbipa: Usbipa, work: Path
) -> dict[str, list[float]]:
    """The real `usbip-hotplug run` (with timing probes), fed by its test event source."""
    marks_path = work / "probe-marks.json"
    daemon = HotplugDaemon(
        dev,
        work / "daemon",
        DAEMON_POLICY.format(port=usbipa.port),
        module="bench.probe",
        extra_env={"BENCH_PROBE_OUT": str(marks_path)},
    )
    starts: list[tuple[str, int, int]] = []  # busid, event written, seen attached
    with daemon, DirWatch(app.tree.paths.platform / "vhci_hcd.0") as watch:
        for n in range(warmup + cycles):
            busid = BUSIDS[n % len(BUSIDS)]
            t0, seen = one_daemon_cycle(busid, dev, app, daemon, watch)
            if n >= warmup:
                starts.append((busid, t0, seen))
        alive = daemon.alive()
    assert alive, daemon.log()
    marks: list[tuple[str, str, int]] = [tuple(m) for m in json.loads(marks_path.read_text())]
    out: dict[str, list[float]] = {
        name: [] for name in (*(row for row, _, _ in DAEMON_STEPS), "to attached", "to exported")
    }
    ends = [t0 for _, t0, _ in starts[1:]] + [2**63]
    for (busid, t0, seen), end in zip(starts, ends, strict=True):
        at: dict[str, int] = {"event": t0}
        for step, who, stamp in marks:
            if who == busid and t0 <= stamp < end:
                at.setdefault(step, stamp)
        for row, first, last in DAEMON_STEPS:
            out[row].append((at[last] - at[first]) / 1e6)
        out["to attached"].append((seen - t0) / 1e6)
        out["to exported"].append((at["export-end"] - t0) / 1e6)
    return out


# --------------------------------------------------------------------------- output


def print_table(title: str, rows: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"  {'step':<18} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
    for name, values in rows.items():
        s = summary(values)
        print(f"  {name:<18} {s['p50']:8.3f} {s['p99']:8.3f} {s['max']:8.3f} {s['mean']:8.3f}")


def verdict(title: str, values: list[float], bare: float) -> None:
    s = summary(values)
    marks = ", ".join(
        f"{key} {s[key]:.3f} ms ({'ok' if s[key] < TARGET_MS[key] else 'MISS'}: target "
        f"< {TARGET_MS[key]:g})"
        for key in ("p50", "p99")
    )
    print(f"  {title}: {marks}, max {s['max']:.3f} ms; x{s['p50'] / bare:.1f} bare TCP at p50")


def slowest(rows: dict[str, list[float]], names: tuple[str, ...]) -> str:
    ranked = sorted(names, key=lambda name: summary(rows[name])["p50"], reverse=True)
    return ", ".join(f"{name} {summary(rows[name])['p50']:.3f} ms" for name in ranked[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cycles", type=int, default=1000, help="plug/unplug cycles per phase (default 1000)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="cycles not counted (default 20)")
    parser.add_argument(
        "--no-daemon", action="store_true", help="skip the `usbip-hotplug run` phase"
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    add_dir_option(parser)
    args = parser.parse_args(argv)
    started = time.monotonic()
    at_start = machine()
    daemon: dict[str, list[float]] = {}
    with scratch_dir("bench-latency-", args.dir) as tmp:
        work = Path(tmp)
        with (
            FakeKernel(work / "device", vhci=False) as dev,
            FakeKernel(work / "app", stub=False) as app,
            Usbipa(app, work / "usbipa") as usbipa,
            EchoServer() as echo,
        ):
            client = client_cycles(args.cycles, args.warmup, dev, app, usbipa, echo)
            server = server_cycles(args.cycles, args.warmup, app, work)
            if not args.no_daemon:
                daemon = daemon_cycles(args.cycles, args.warmup, dev, app, usbipa, work)
            usbipa_alive = usbipa.alive()
    print(
        f"bench.latency: {args.cycles} plug/unplug cycles per phase (+{args.warmup} warm-up), "
        f"{time.monotonic() - started:.1f} s"
    )
    print(f"machine: {at_start} (at start)")
    print_table("1. export transaction, export() called directly (real usbipa, loopback)", client)
    print_table("2. usbipa's side of the handshake (same code, in-process)", server)
    if daemon:
        print_table("3. `usbip-hotplug run`: event written -> port attached (probed)", daemon)
    bare = summary(client["bare TCP"])["p50"]
    print("\nverdicts (targets p50 < 5 ms, p99 < 25 ms):")
    if daemon:
        verdict("daemon, event -> port attached on the app side", daemon["to attached"], bare)
        verdict("daemon, event -> exported (data phase handed over)", daemon["to exported"], bare)
    verdict("transaction, event -> port attached", client["to attached"], bare)
    verdict("transaction, event -> exported", client["to exported"], bare)
    print(f"slowest steps at p50 (transaction): {slowest(client, CLIENT_STEPS)}")
    if daemon:
        names = tuple(row for row, _, _ in DAEMON_STEPS)
        print(f"slowest steps at p50 (daemon): {slowest(daemon, names)}")
    print(f"slowest steps at p50 (usbipa): {slowest(server, SERVER_STEPS)}")
    # The rig's own cost: each fake sysfs write is a round trip to the fake
    # kernel process; a real one is one syscall. usbipa's attach is one more.
    n_writes = summary(client["fake writes/export"])["p50"] + 1
    fake = summary(client["fake sysfs write"])["p50"]
    print(
        f"fake-kernel round trips per export: {n_writes:.0f} writes x {fake:.3f} ms = "
        f"{n_writes * fake:.3f} ms of the total (a real kernel's writes cost their own "
        "time: measured in the VM, item 2)"
    )
    if args.json:
        args.json.write_text(json.dumps({"client": client, "server": server, "daemon": daemon}))
    return 0 if usbipa_alive else 1


if __name__ == "__main__":
    sys.exit(main())
