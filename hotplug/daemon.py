"""The hotplug daemon's run loop: events, timers, signals, the control socket.

It wires the edges (udev or a test event source, the stub driver, the records
under /run, systemd) to the pure core (`policy`, `reconcile`). One loop step:
look at the kernel, ask the policy, let `reconcile` decide, start what it
says. Blocking work (export, unexport, release) runs in one thread per
operation, at most one per device, each bounded by its target's timeouts, so
a slow or dead target only ever delays its own device. Threads and not the
default executor: a few black-hole targets must not use up a small pool and
make everyone else queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from hotplug import log, usbids
from hotplug.address import Endpoint
from hotplug.control import ControlError, bind_control_socket, serve, socket_path
from hotplug.device import Device
from hotplug.events import DeviceEvent, EventSource
from hotplug.export import Attempt, ExportError, Timeouts, export, unexport
from hotplug.kernel.stub import STUB_DRIVER, TABLE_SLOTS, StubStatus, UsbipHost
from hotplug.kernel.sysfs import KernelError, busid_sort_key, driver_name
from hotplug.notify import Notifier
from hotplug.policy import (
    DEFAULT_CONFIG_DIR,
    Policy,
    PolicyError,
    Target,
    TlsOptions,
    load_policy,
    parse_address,
)
from hotplug.reconcile import (
    Abort,
    Action,
    Export,
    Observed,
    Release,
    Slot,
    Unexport,
    Wanted,
    desire,
    export_failed,
    export_succeeded,
    reconcile,
    release_finished,
    retry_now,
    status_line,
    unexport_finished,
)
from hotplug.state import RecordDir, RecordTaken, StateError, record_devid, writer_alive
from hotplug.transport import remote_for_target
from hotplug.watch import PolicyWatcher

logger = log.get("hotplug.daemon")

T = TypeVar("T")
OnStop = Literal["unexport", "keep"]

# Sysfs writes (to the real kernel, or to the fake one over a socket) get this
# much on top of a target's own connect and handshake timeouts.
KERNEL_SLACK = 10.0
STOP_GRACE = 20.0  # within systemd's TimeoutStopSec (30 s in our unit)
# Per busid: this many plug, unplug and decision lines every window, then a count.
EVENT_LOG_BURST = 10
EVENT_LOG_WINDOW = 10.0
RELOAD_SLOW = 10.0  # a policy parse this long is logged (it goes on: the loop does not wait)
RECORD_BY = "daemon"
# `status` warns when this few of usbip-host's busid slots are left.
TABLE_LOW = 4


@dataclass(frozen=True)
class Options:
    policy_path: Path | None = None
    state_dir: Path = Path("/run/usbip-hotplug")
    on_stop: OnStop | None = None  # None: the policy's settings.on_stop
    poll_interval: float = 2.0  # how often usbip_status is read (link loss)
    watch_interval: float = 2.0  # how often the policy files are stat()ed
    # How long a device without a driver may take to get one before we decide
    # anyway (see _device_present).
    settle_time: float = 2.0
    metrics_listen: Endpoint | None = None  # --metrics-listen: over settings.metrics.listen


class Canceller:
    """Lets the loop cut short a handshake that runs in a thread.

    The export thread registers its socket as soon as it is connected;
    `fire()` shuts the socket down, which wakes the thread's blocked recv,
    and the export rolls back as on any failure.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.fired = False

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self.fired:
                raise ExportError("cancelled before the handshake")
            self._sock = sock

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                with contextlib.suppress(OSError):  # EBADF: export closed it already
                    self._sock.shutdown(socket.SHUT_RDWR)

    def forget(self) -> None:
        """The export is over; from now on the socket (if any) is the kernel's."""
        with self._lock:
            self._sock = None


def address_of(target: Target) -> str:
    """host:port for plain TCP (as usbip shows it), the URL for tls:// and wss://."""
    return target.display if target.scheme == "tcp" else target.url


def timeouts_of(target: Target) -> Timeouts:
    return Timeouts(connect=target.connect_timeout, handshake=target.handshake_timeout)


class Daemon:
    def __init__(
        self,
        options: Options,
        policy: Policy,
        stub: UsbipHost,
        source: Callable[[], EventSource],
        records: RecordDir,
        notifier: Notifier | None = None,
    ) -> None:
        self.options = options
        self.policy = policy
        self.policy_error: str | None = None
        self.stub = stub
        self.make_source = source
        self.records = records
        self.notifier = notifier or Notifier()
        self.watcher = PolicyWatcher(options.policy_path)
        self.devices: dict[str, Device] = {}
        self.held_back: set[str] = set()  # present at start while settings.coldplug is false
        self.settling: dict[str, float] = {}  # busid -> when we stop waiting for its driver
        # Busids whose device went while we held it bound: usbip-host keeps their
        # table entry, and a kernel whose usbip-host claims new devices by that
        # entry (not Debian's 6.1, see docs/PROTOCOL.md) binds the next device
        # there at once. Such a claim is ours to export or give back, not foreign.
        self.leftovers: set[str] = set()
        self.slots: dict[str, Slot] = {}
        self.observed: dict[str, Observed] = {}
        self.ops: dict[str, asyncio.Task[None]] = {}
        self.cancellers: dict[str, Canceller] = {}
        # Record writes and removals that failed (/run full, a file in the way):
        # retried from every loop step until they succeed. busid -> (target, state).
        self.unsaved: dict[str, tuple[Target, str]] = {}
        self.unremoved: set[str] = set()
        self.wake_at: float | None = None
        self.watchdog_interval = Notifier.watchdog_interval()
        self.last_ping = 0.0
        # A device that plugs and unplugs itself over and over (a bad cable, a
        # hostile gadget) would write lines per udev event (issue 12, finding 15).
        self.event_log = log.Throttle(
            logger,
            EVENT_LOG_BURST,
            EVENT_LOG_WINDOW,
            "{kind}: {count} more plug/unplug lines in {window:g} s not logged "
            "(it keeps coming and going: cable, hub or the device itself?)",
            kind_field="busid",
        )
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again: str | None = None  # why, if asked again during a reload
        from hotplug.daemon_metrics import DeviceMetrics  # the library: for the daemon alone

        self.metrics = DeviceMetrics(stub, display_state)

    # ------------------------------------------------------------------ life cycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.metrics.serve(self.metrics_listen())  # first: a MetricsError leaves nothing to undo
        control_path = socket_path(self.options.state_dir)
        server = await serve(bind_control_socket(control_path), self.handle_request)
        source = self.make_source()  # the monitor listens before we enumerate
        # Parse usb.ids (~0.5 s of Python) now, not in the first plug's export path
        # where the decision's log line would (bench/vm_compare.py measured it).
        usbids.system_database()
        try:
            loop.add_reader(source.fileno(), self._on_events, source)
            self._coldplug(source.coldplug())
            self._adopt()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
            self._step()
            self.notifier.ready(self.status_text())
            log.event(
                logger,
                logging.INFO,
                f"started: {len(self.devices)} devices present; policy from "
                f"{', '.join(self.policy.sources) or 'nowhere (exports nothing)'}",
                event="started",
            )
            watch = asyncio.create_task(self._watch_loop())
            try:
                await self._main_loop()
            finally:
                watch.cancel()
                if self._reloading is not None:
                    self._reloading.cancel()  # its thread may block on a file: not waited for
                loop.remove_reader(source.fileno())
            await self._shutdown()
        finally:
            self.metrics.stop()
            source.close()
            server.close()
            control_path.unlink(missing_ok=True)
        return 0

    def stop(self) -> None:
        assert self._stop is not None
        self._stop.set()
        self.kick()

    def kick(self) -> None:
        """Run a loop step soon (coalesced: many kicks, one step)."""
        if self._wake is not None:
            self._wake.set()

    async def _main_loop(self) -> None:
        assert self._wake is not None and self._stop is not None
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout()):
                    await self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                break
            self._step()

    def _timeout(self) -> float:
        waits = [
            self.options.poll_interval,
            *(t - time.monotonic() for t in self.settling.values()),
        ]
        if self.wake_at is not None:
            waits.append(self.wake_at - time.monotonic())
        if self.watchdog_interval is not None:
            waits.append(self.watchdog_interval)
        return max(0.0, min(waits))

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.watch_interval)
            if self.watcher.changed():
                self.reload("the policy files changed")

    async def _shutdown(self) -> None:
        mode: OnStop = self.options.on_stop or self.policy.settings.on_stop
        self.notifier.stopping()
        log.event(
            logger,
            logging.INFO,
            f"stopping ({'unexporting' if mode == 'unexport' else 'keeping'} exported devices)",
            event="stopping",
        )
        if mode == "unexport":
            for canceller in self.cancellers.values():
                canceller.fire()
        await self._drain(STOP_GRACE)
        if mode == "unexport":
            for busid, slot in sorted(self.slots.items()):
                if busid in self.ops:
                    continue
                if slot.exported_to is not None:
                    self._start(Unexport(busid, slot.exported_to, release=True))
                elif slot.owned:
                    self._start(Release(busid))
            await self._drain(STOP_GRACE)
        # A last try for writes the loop kept retrying: with on_stop keep, the next
        # start adopts only what its records name.
        self._retry_records()
        for busid in sorted(self.unsaved):
            log.event(
                logger,
                logging.ERROR,
                f"stopping with the record of {busid} unwritten: the next start will not"
                " adopt it",
                busid=busid,
                event="state-error",
            )

    async def _drain(self, timeout: float) -> None:
        pending = list(self.ops.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                logger.warning("stopping without waiting for %s", task.get_name())

    # ------------------------------------------------------------------ one step

    def _step(self) -> None:
        now = time.monotonic()
        self.event_log.flush(now)
        for busid, deadline in list(self.settling.items()):
            if now >= deadline:
                del self.settling[busid]
                if busid in self.devices:
                    self._log_decision(self.devices[busid], "no driver took it; deciding anyway: ")
        self._retry_records()
        self._observe()
        self._take_stranded()
        wanted = {busid: self._wanted(device) for busid, device in self.devices.items()}
        plan = reconcile(wanted, self.observed, self.slots, now)
        self.slots = plan.slots
        self.wake_at = plan.wake_at
        for note in plan.notes:
            level = logging.WARNING if note.level == "warning" else logging.INFO
            self.metrics.note(note)
            log.event(
                logger,
                level,
                note.message,
                busid=note.busid,
                target=note.target,
                event=note.event,
                rule=note.rule,
            )
        for action in plan.actions:
            self._start(action)
        self.metrics.devices(wanted, self.slots, self.settling)
        self.notifier.status(self.status_text())
        self._watchdog(now)

    def _watchdog(self, now: float) -> None:
        # Pinged from the loop step, so a wedged loop stops the pings and systemd restarts us.
        if self.watchdog_interval is not None and now - self.last_ping >= self.watchdog_interval:
            self.notifier.watchdog()
            self.last_ping = now

    def _observe(self) -> None:
        """Read what usbip-host says about every device we know: a few small sysfs reads."""
        observed = {}
        for busid in set(self.devices) | set(self.slots):
            if not self.stub.paths.device_dir(busid).exists():
                if self.slots.get(busid, Slot()).owned:
                    self.leftovers.add(busid)
                if self.devices.pop(busid, None) is not None:  # the kernel wins over a late event
                    self._log_unplugged(busid)
                self.held_back.discard(busid)
                self.settling.pop(busid, None)
                observed[busid] = Observed()
                continue
            bound = self._bound(busid)
            used = bound and self.stub.status(busid) == StubStatus.USED
            observed[busid] = Observed(bound=bound, used=used)
        self.observed = observed

    def _take_stranded(self) -> None:
        """Devices a `connect` bound and then died on (SIGKILL, a crash) are ours.

        Its record says it was still exporting, its process is gone, and the
        device is bound to usbip-host but not exported: no one else will ever
        give it back. The policy decides, as for a device just plugged in:
        export it, or give it back to its driver (issue 12, finding 8).
        """
        for busid, seen in self.observed.items():
            slot = self.slots.get(busid, Slot())
            if not seen.bound or seen.used or slot.owned or busid in self.ops:
                continue
            record = self.records.get(busid)
            if (
                record is None
                or record.get("by") == RECORD_BY
                or record.get("state") != "exporting"
                or writer_alive(record)
            ):
                continue
            target = self._target_from_record(record)
            if target is None:
                continue
            self.slots[busid] = replace(slot, owned=True, phase="idle", last_error=None)
            self._record(busid, target, "retrying")
            log.event(
                logger,
                logging.WARNING,
                f"{busid}: {record.get('by', 'another tool')} (pid {record.get('pid')}) bound it"
                " and ended before exporting it; taking it over (the policy decides: export"
                " or give back)",
                busid=busid,
                event="stranded-claim",
            )

    def _claimed_by_leftover(self, busid: str) -> bool:
        """Bound to usbip-host, not exported, and nobody's record: not a `usbip bind`
        by hand (that leaves the device present all along), a claim at plug-in."""
        return (
            self.stub.status(busid) == StubStatus.AVAILABLE
            and self.records.get(busid) is None
            and busid in self.stub.table()
        )

    def _bound(self, busid: str) -> bool:
        return driver_name(self.stub.paths.device_dir(busid)) == STUB_DRIVER

    def _wanted(self, device: Device) -> Wanted:
        if device.busid in self.settling:
            return Wanted("none", None, "waiting for the kernel to configure it")
        owned = self.slots.get(device.busid, Slot()).owned
        held = device.busid in self.held_back and not self.policy.settings.coldplug and not owned
        return desire(self.policy, device, held_back=held)

    # ------------------------------------------------------------------ devices

    def _on_events(self, source: EventSource) -> None:
        try:
            events = source.read_events()
        except Exception as exc:  # a bad event must not stop the daemon
            log.event(logger, logging.ERROR, f"reading device events failed: {exc!r}")
            return
        for event in events:
            self._apply_event(event, source)
        if events:
            self.kick()

    def _apply_event(self, event: DeviceEvent, source: EventSource) -> None:
        if event.action == "rescan":
            self._coldplug(source.coldplug(), at_start=False)
        elif event.action == "remove":
            self.held_back.discard(event.busid)
            self.settling.pop(event.busid, None)
            if self.devices.pop(event.busid, None) is not None:
                self._log_unplugged(event.busid)
        elif event.device is not None:
            self._device_present(event.device)

    def _coldplug(self, devices: list[Device], at_start: bool = True) -> None:
        present = {d.busid for d in devices}
        for busid in set(self.devices) - present:
            del self.devices[busid]
            self.held_back.discard(busid)
            self.settling.pop(busid, None)
            self._log_unplugged(busid)
        for device in devices:
            self._device_present(device, coldplug=at_start)

    def _device_present(self, device: Device, coldplug: bool = False) -> None:
        old = self.devices.get(device.busid)
        if old is not None and device.driver == STUB_DRIVER:
            # Our own binding is no news: the policy keeps seeing the device as it
            # was plugged in, or a `driver:` rule would flap once we bind it.
            device = replace(device, driver=old.driver)
        self.devices[device.busid] = device
        if old is None and not coldplug:
            self.metrics.plugged(device.busid)
        if old is None and device.busid in self.leftovers:
            self.leftovers.discard(device.busid)
            if device.driver == STUB_DRIVER and self._claimed_by_leftover(device.busid):
                slot = self.slots.get(device.busid, Slot())
                self.slots[device.busid] = replace(slot, owned=True)
                log.event(
                    logger,
                    logging.INFO,
                    f"{device.busid}: usbip-host took it through the entry its previous device"
                    " left; treating it as ours (the policy decides: export or give back)",
                    busid=device.busid,
                    event="leftover-claim",
                )
        if coldplug and old is None:
            self.held_back.add(device.busid)
        prefix = "present at start: " if coldplug else "plugged in: "
        if device.driver is None and old is None:
            # udev can report the device before its usual driver chose a
            # configuration, so before its interfaces exist: deciding now could
            # export a keyboard that an `interface_class: hid` rule keeps here.
            # Wait for the "bind" event (or settle_time) before deciding.
            self.settling[device.busid] = time.monotonic() + self.options.settle_time
            self.event_log.log(
                logging.INFO,
                device.busid,
                f"{prefix}{device.busid}: waiting for the kernel to configure it",
                time.monotonic(),
                busid=device.busid,
                event="settling",
            )
        elif device.busid in self.settling and device.driver is not None:
            del self.settling[device.busid]
            self._log_decision(device, prefix)
        elif old is None:
            self._log_decision(device, prefix)

    def _log_decision(self, device: Device, prefix: str) -> None:
        wanted = self._wanted(device)
        names = usbids.names(
            device.vendor, device.product, device.manufacturer, device.product_name
        )
        what = f"{device.busid} ({device.vid_pid} {names})"
        if wanted.exports:
            message = f"{what}: export to {wanted.chain[0].name}: {wanted.reason}"
        else:
            message = f"{what}: not exporting: {wanted.reason}"
        self.event_log.log(
            logging.INFO,
            device.busid,
            prefix + message,
            time.monotonic(),
            busid=device.busid,
            event="decided",
            rule=wanted.rule,
            target=wanted.chain[0].name if wanted.exports else None,
        )

    def _log_unplugged(self, busid: str) -> None:
        self.metrics.unplugged(busid)
        self.event_log.log(
            logging.INFO,
            busid,
            f"{busid} unplugged",
            time.monotonic(),
            busid=busid,
            event="unplugged",
        )

    # ------------------------------------------------------------------ re-adoption

    def _adopt(self) -> None:
        """Take back what a previous run exported, as the kernel and our records say.

        Nothing is exported again: a device whose stub is still "used" stays
        exported as it is. Records of other tools (`connect`) are not ours.
        """
        now = time.monotonic()
        try:
            records = list(self.records.items())
        except StateError as exc:
            log.event(
                logger,
                logging.ERROR,
                f"{exc}; devices exported before this start are not adopted",
                event="state-unreadable",
            )
            return
        for busid, record in records:
            if record.get("by") != RECORD_BY:
                continue
            present = busid in self.devices
            if not present or not self._bound(busid):
                why = "it is gone" if not present else "it is no longer bound to usbip-host"
                if not present:
                    with contextlib.suppress(KernelError):
                        self.stub.release(busid)  # forget its match_busid entry
                self._forget_record(busid)
                log.event(
                    logger,
                    logging.INFO,
                    f"dropping the record of {busid}: {why}",
                    busid=busid,
                    event="record-dropped",
                )
                continue
            target = self._target_from_record(record)
            if target is None:
                self._forget_record(busid)
                continue
            used = self.stub.status(busid) == StubStatus.USED
            try:
                age = max(0.0, time.time() - float(record.get("since") or time.time()))
            except (TypeError, ValueError):
                age = 0.0
            since = now - age
            self.held_back.discard(busid)
            if used:
                self.slots[busid] = Slot(
                    phase="exported", owned=True, target=target, exported_to=target, since=since
                )
                message = f"adopted {busid}: still exported to {target.name} ({address_of(target)})"
            else:
                # Only an export that had succeeded may have left a port over there.
                was_exported = record.get("state") in ("exported", "moving")
                self.slots[busid] = Slot(
                    phase="idle",
                    owned=True,
                    target=target,
                    exported_to=target if was_exported else None,
                    since=now,
                    last_error="link lost while the daemon was not running"
                    if was_exported
                    else None,
                )
                message = f"adopted {busid}: bound by us but not exported; exporting again"
            log.event(
                logger,
                logging.INFO,
                message,
                busid=busid,
                target=target.name,
                event="adopted",
                rule=record.get("rule"),
            )

    def _target_from_record(self, record: dict[str, Any]) -> Target | None:
        where = str(record.get("target", ""))
        try:
            scheme, host, port, path = parse_address(where)
        except ValueError:
            return None
        name = str(record.get("target_name") or where)
        current = self.policy.targets.get(name)
        if current is not None and (current.scheme, current.host, current.port, current.path) == (
            scheme,
            host,
            port,
            path,
        ):
            return current
        # The policy changed while we were down: the far end is still where the
        # record says, and so are the certificate files to reach it.
        tls = record.get("tls")
        try:
            options = TlsOptions(**tls) if isinstance(tls, dict) else None
        except TypeError:
            return None  # not a record we wrote
        return Target(name=name, host=host, port=port, scheme=scheme, path=path, tls=options)

    def _forget_record(self, busid: str) -> None:
        self.unsaved.pop(busid, None)
        try:
            self.records.remove(busid)
        except (StateError, OSError) as exc:
            if busid not in self.unremoved:
                log.event(
                    logger,
                    logging.ERROR,
                    f"cannot remove the record of {busid}: {exc}; retrying",
                    busid=busid,
                    event="state-error",
                )
            self.unremoved.add(busid)
        else:
            self.unremoved.discard(busid)

    def _record_data(
        self, busid: str, target: Target, state: str, since: float | None = None
    ) -> dict[str, Any]:
        device = self.devices.get(busid)
        old = self.records.get(busid) or {}
        if old.get("by") != RECORD_BY:
            old = {}  # another tool's: nothing of it is ours to carry over
        tls = target.tls
        return {
            "by": RECORD_BY,
            "pid": os.getpid(),
            # As `connect` records it, so `disconnect -b` and `list` read it too.
            "target": str(remote_for_target(target)),
            "tls": {"cert": tls.cert, "key": tls.key, "ca": tls.ca} if tls else None,
            "target_name": target.name,
            "state": state,
            "since": since if since is not None else old.get("since", time.time()),
            "vid_pid": device.vid_pid if device is not None else old.get("vid_pid"),
            # Which device (busnum << 16 | devnum): giving it back must never touch
            # a device plugged in at the same busid after it was unplugged.
            "devid": device.devid if device is not None else old.get("devid"),
            "rule": self._rule_of(busid) or old.get("rule"),
        }

    def _record(self, busid: str, target: Target, state: str, since: float | None = None) -> bool:
        """Write our record of `busid`; on failure, log it and retry from the loop."""
        self.unremoved.discard(busid)
        try:
            self.records.put(busid, self._record_data(busid, target, state, since))
        except StateError as exc:
            if busid not in self.unsaved:
                log.event(
                    logger,
                    logging.ERROR,
                    f"{exc}; retrying (until it is written, a restarted daemon would not"
                    f" know {busid} is its own)",
                    busid=busid,
                    event="state-error",
                )
            self.unsaved[busid] = (target, state)
            return False
        if self.unsaved.pop(busid, None) is not None:
            log.event(
                logger,
                logging.INFO,
                f"the record of {busid} is written",
                busid=busid,
                event="state-recovered",
            )
        return True

    def _retry_records(self) -> None:
        for busid, (target, state) in list(self.unsaved.items()):
            self._record(busid, target, state)
        for busid in list(self.unremoved):
            self._forget_record(busid)

    def _claim_record(self, busid: str, target: Target, owned: bool) -> str | None:
        """Our "exporting" record of `busid`, written before the export binds it.

        Returns why not, if it cannot be had: a device whose export cannot be
        recorded is not exported (issue 12, finding 5), and a `connect` that
        recorded the device first has it (finding 10). A record whose writer is
        gone, or our own, is replaced.
        """
        data = self._record_data(busid, target, "exporting")
        try:
            if owned:
                self.records.put(busid, data)
            else:
                try:
                    self.records.claim(busid, data)
                except RecordTaken as taken:
                    other = taken.existing
                    if (
                        other is not None
                        and other.get("by") != RECORD_BY
                        and other.get("state") == "exporting"
                        and writer_alive(other)
                    ):
                        return (
                            f"{other.get('by', 'another tool')} (pid {other.get('pid')}) is "
                            "exporting it"
                        )
                    self.records.put(busid, data)
        except StateError as exc:
            return (
                f"cannot record the export ({exc}), so nothing is bound: a restarted daemon"
                " would not know the device is its own; make the state directory writable"
            )
        self.unsaved.pop(busid, None)
        self.unremoved.discard(busid)
        return None

    def _rule_of(self, busid: str) -> str | None:
        device = self.devices.get(busid)
        return self._wanted(device).rule if device is not None else None

    # ------------------------------------------------------------------ operations

    def _start(self, action: Action) -> None:
        if isinstance(action, Abort):
            canceller = self.cancellers.get(action.busid)
            if canceller is not None:
                canceller.fire()
            return
        if action.busid in self.ops:  # reconcile never does this; belt and braces
            logger.error("%s: an operation is already running", action.busid)
            return
        if isinstance(action, Export):
            coro = self._export(action)
        elif isinstance(action, Unexport):
            coro = self._unexport(action)
        else:
            coro = self._release(action)
        task = asyncio.create_task(coro, name=f"{type(action).__name__.lower()} {action.busid}")
        self.ops[action.busid] = task

    def _finish(self, busid: str) -> None:
        self.ops.pop(busid, None)
        self.kick()

    async def _blocking(
        self, name: str, fn: Callable[[], T], limit: float, canceller: Canceller | None = None
    ) -> T:
        """Run `fn` in a thread of its own; wait for it without blocking the loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def runner() -> None:
            result: T | None = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=runner, name=name, daemon=True).start()
        done, _ = await asyncio.wait({future}, timeout=limit)
        if not done:
            cut = "; cutting it short" if canceller is not None else ""
            logger.warning("%s: still running after %.0f s%s", name, limit, cut)
            if canceller is not None:
                canceller.fire()
        return await future  # the kernel layer and socket timeouts bound the rest

    async def _export(self, action: Export) -> None:
        busid, target = action.busid, action.target
        canceller = Canceller()
        self.cancellers[busid] = canceller
        attempt = Attempt()
        refused = self._claim_record(busid, target, owned=action.adopt)
        if refused is not None:
            self.cancellers.pop(busid, None)
            try:
                self._export_done(busid, target, refused, False, attempt, action.adopt, False)
            finally:
                self._finish(busid)
            return
        log.event(
            logger,
            logging.INFO,
            f"exporting {busid} to {target.name} ({address_of(target)})",
            busid=busid,
            target=target.name,
            event="exporting",
            rule=self._rule_of(busid),
        )
        error: str | None = None
        try:
            remote, timeouts = remote_for_target(target), timeouts_of(target)
            await self._blocking(
                f"export {busid}",
                lambda: export(
                    self.stub,
                    busid,
                    remote,
                    timeouts,
                    adopt_bound=action.adopt,
                    on_connect=canceller.watch,
                    attempt=attempt,
                ),
                target.connect_timeout + target.handshake_timeout + KERNEL_SLACK,
                canceller,
            )
        except (ExportError, KernelError, OSError) as exc:
            error = str(exc)
        except Exception as exc:
            logger.exception("export of %s failed unexpectedly", busid)
            error = f"internal error: {exc!r}"
        finally:
            canceller.forget()
            self.cancellers.pop(busid, None)
        try:
            self._export_done(busid, target, error, canceller.fired, attempt, action.adopt, True)
        finally:
            self._finish(busid)

    def _export_done(
        self,
        busid: str,
        target: Target,
        error: str | None,
        cut: bool,
        attempt: Attempt,
        owned_before: bool,
        recorded: bool,
    ) -> None:
        """`recorded`: our "exporting" record was written (and so is ours to remove)."""
        now = time.monotonic()
        slot = self.slots.get(busid, Slot())
        rule = self._rule_of(busid)
        if error is None:
            self.slots[busid] = export_succeeded(slot, target, now)
            self.metrics.exported(busid, target)
            self._record(busid, target, "exported", since=time.time())
            return
        device = self.devices.get(busid)
        wanted = self._wanted(device) if device is not None else None
        chain = wanted.chain if wanted is not None and wanted.exports else ()
        # Bound now is ours only if this transaction bound it (and could not give
        # it back) or it was ours already: a `usbip bind` or `connect` that got
        # there in between owns what it bound (issue 12, finding 10).
        ours = self._bound(busid) and (owned_before or attempt.bound)
        new = export_failed(slot, chain, error, ours, now, random.random())
        self.slots[busid] = new
        self.metrics.export_failed(target, chain, cut, new, now)
        if ours:
            self._record(busid, target, "retrying")
        elif recorded:
            self._forget_record(busid)
        if cut or not chain:
            message = f"export of {busid} to {target.name} stopped: {error}"
        elif new.phase == "backoff" and new.next_at is not None:
            message = (
                f"export of {busid} to {target.name} failed: {error}; "
                f"next round in {new.next_at - now:.1f} s"
            )
        else:
            message = (
                f"export of {busid} to {target.name} failed: {error}; "
                f"trying fallback {chain[new.position].name}"
            )
        log.event(
            logger,
            logging.WARNING,
            message,
            busid=busid,
            target=target.name,
            event="export-failed",
            rule=rule,
        )

    async def _unexport(self, action: Unexport) -> None:
        busid, target = action.busid, action.target
        error: str | None = None
        try:
            await self._blocking(
                f"unexport {busid}",
                lambda: self._withdraw(busid, target, action.release),
                target.connect_timeout + target.handshake_timeout + KERNEL_SLACK,
            )
        except (ExportError, KernelError, OSError) as exc:
            error = str(exc)  # unexport() released the device anyway; its kernel drops the link
        except Exception as exc:
            logger.exception("unexport of %s failed unexpectedly", busid)
            error = f"internal error: {exc!r}"
        self.metrics.unexport_done(target, error)
        if error is not None:
            log.event(
                logger,
                logging.WARNING,
                f"unexport of {busid}: {error}",
                busid=busid,
                target=target.name,
                event="unexport-failed",
            )
        try:
            bound = self._bound(busid)
            slot = self.slots.get(busid, Slot())
            self.slots[busid] = unexport_finished(slot, bound, error, time.monotonic())
            if not bound:
                self._forget_record(busid)
            else:
                self._record(busid, target, "moving")
        finally:
            self._finish(busid)

    def _withdraw(self, busid: str, target: Target, release: bool) -> None:
        """OP_UNEXPORT, then give the device back (or keep it bound to export elsewhere)."""
        devid = record_devid(self.records.get(busid))
        try:
            remote = remote_for_target(target)
            unexport(
                self.stub, busid, remote, timeouts_of(target), release=release, devid=devid
            )
        finally:
            if not self.stub.paths.device_dir(busid).exists():
                # Unplugged: usbip-host keeps the busid in match_busid. Ask it to
                # forget; Debian's 6.1 accepts that and keeps the entry anyway (a
                # re-plugged device still goes to its usual driver, seen in the VM).
                with contextlib.suppress(KernelError):
                    self.stub.release(busid, devid)
            elif not release:
                # Staying bound to move elsewhere: stop our end of the old link now
                # instead of waiting for the kernel to notice the far end closed.
                with contextlib.suppress(KernelError):
                    self.stub.stop(busid)

    async def _release(self, action: Release) -> None:
        busid = action.busid
        error: str | None = None
        device = self.devices.get(busid)
        devid = device.devid if device is not None else None
        try:
            await self._blocking(
                f"release {busid}", lambda: self.stub.release(busid, devid), KERNEL_SLACK
            )
        except (KernelError, OSError) as exc:
            error = str(exc)
        try:
            bound = self._bound(busid)
            slot = self.slots.get(busid, Slot())
            self.slots[busid] = release_finished(slot, bound, error, time.monotonic())
            if not bound:
                self._forget_record(busid)
            log.event(
                logger,
                logging.INFO if error is None else logging.WARNING,
                f"released {busid}" + (f": {error}" if error else ""),
                busid=busid,
                event="released",
            )
        finally:
            self._finish(busid)

    # ------------------------------------------------------------------ policy

    def reload(self, why: str) -> None:
        """Re-read the policy (SIGHUP, a file change).

        The files are read and parsed in a thread of their own: a slow parse
        (a big file, a slow disk) must not stop `status` or the watchdog pings.
        A reload asked for while one runs is done once more after it.
        """
        if self._stop is not None and self._stop.is_set():
            return  # stopping: a new policy would only start work we are about to undo
        if self._reloading is not None:
            self._reload_again = why
            return
        self.notifier.reloading()
        self._reloading = asyncio.get_running_loop().create_task(self._reload(why), name="reload")

    async def _reload(self, why: str) -> None:
        path = self.options.policy_path
        try:
            while True:
                self.watcher.mark()  # before reading: an edit made meanwhile is seen again
                policy: Policy | None = None
                error: PolicyError | None = None
                try:
                    policy = await self._blocking("reload", lambda: load_policy(path), RELOAD_SLOW)
                except PolicyError as exc:
                    error = exc
                except Exception as exc:  # a bug in reading must not leave systemd "reloading"
                    where = str(path or DEFAULT_CONFIG_DIR)
                    error = PolicyError(where, None, None, f"cannot load: {exc!r}")
                if self._stop is not None and self._stop.is_set():
                    return
                self._apply(policy, error, why)
                self._step()
                if self._reload_again is None:
                    break
                why, self._reload_again = self._reload_again, None
        finally:
            self._reloading = None
        self.notifier.ready(self.status_text())  # READY=1 after RELOADING=1: reload done

    def _apply(self, policy: Policy | None, error: PolicyError | None, why: str) -> None:
        if policy is None:
            self.policy_error = str(error)
            log.event(
                logger,
                logging.ERROR,
                f"policy not reloaded ({why}), the previous one stays in force: {error}",
                event="policy-error",
            )
            return
        self.policy = policy
        self.policy_error = None
        self.metrics.reconfigure(self.metrics_listen())
        self.slots = retry_now(self.slots, time.monotonic())
        log.event(
            logger,
            logging.INFO,
            f"policy reloaded ({why}): {len(policy.rules)} rules, {len(policy.targets)} targets",
            event="policy-reloaded",
        )

    def metrics_listen(self) -> Endpoint | None:
        return self.options.metrics_listen or self.policy.settings.metrics_listen

    # ------------------------------------------------------------------ status

    def status_text(self) -> str:
        text = status_line(self.slots)
        if self.policy_error is not None:
            text += "; policy error, previous policy in force"
        return text

    def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("command") != "status":
            raise ControlError(f"unknown command {request.get('command')!r} (expected status)")
        return self.status_report()

    def status_report(self) -> dict[str, Any]:
        mono, wall = time.monotonic(), time.time()

        def to_wall(t: float | None) -> float | None:
            return None if t is None else wall - (mono - t)

        rows = []
        db = usbids.system_database()
        for busid in sorted(set(self.devices) | set(self.slots), key=busid_sort_key):
            device = self.devices.get(busid)
            slot = self.slots.get(busid, Slot(since=mono))
            wanted = self._wanted(device) if device is not None else None
            target = slot.target
            if target is None and slot.phase == "idle" and wanted is not None and wanted.exports:
                target = wanted.chain[0]
            rows.append(
                {
                    "busid": busid,
                    "vid_pid": device.vid_pid if device is not None else None,
                    "vendor": (db.vendor(device.vendor) or device.manufacturer)
                    if device is not None
                    else None,
                    "product": (db.product(device.vendor, device.product) or device.product_name)
                    if device is not None
                    else None,
                    "serial": device.serial if device is not None else None,
                    "rule": wanted.rule if wanted is not None else None,
                    "reason": wanted.reason if wanted is not None else "unplugged",
                    "state": "settling" if busid in self.settling else display_state(slot, wanted),
                    "target": target.name if target is not None else None,
                    "address": address_of(target) if target is not None else None,
                    "since": to_wall(slot.since),
                    "last_error": slot.last_error,
                    "next_retry": to_wall(slot.next_at) if slot.phase == "backoff" else None,
                }
            )
        return {
            "daemon": {
                "pid": os.getpid(),
                "status": self.status_text(),
                "policy": list(self.policy.sources),
                "policy_error": self.policy_error,
                "on_stop": self.options.on_stop or self.policy.settings.on_stop,
            },
            "usbip_host": self.table_report(),
            "devices": rows,
        }

    def table_report(self) -> dict[str, Any]:
        return table_report(self.stub)


def table_report(stub: UsbipHost) -> dict[str, Any]:
    """usbip-host's busid table: a full one refuses every new export until the
    module is reloaded, so say how much of it is left, and what was lost."""
    try:
        table = stub.table()
        leaked = stub.leftovers()
    except (KernelError, OSError) as exc:
        return {"error": str(exc)}
    free = max(0, TABLE_SLOTS - len(table))
    warning = None
    if free <= TABLE_LOW:
        warning = (
            f"only {free} of usbip-host's {TABLE_SLOTS} busid slots left"
            + (f" ({len(leaked)} leaked by devices unplugged mid-export)" if leaked else "")
            + "; new exports fail once none is left: reload the module when nothing"
            " is exported (modprobe -r usbip-host; modprobe usbip-host)"
        )
    return {
        "slots": TABLE_SLOTS,
        "used": len(table),
        "leaked": len(leaked),
        "leaked_busids": leaked,
        "free": free,
        "warning": warning,
    }


def display_state(slot: Slot, wanted: Wanted | None) -> str:
    if slot.phase == "backoff":
        return "retrying"
    if slot.phase != "idle":
        return slot.phase
    if wanted is None:
        return "unplugged"
    if wanted.exports:
        return "pending"
    return "ignored" if wanted.action == "ignore" else "not matched"
