"""The hotplug daemon's run loop: events, timers, signals, the control socket.

It wires the edges (udev or a test event source, the stub driver, the records
under /run, systemd) to the pure core (`policy`, `reconcile`). One loop step:
look at the kernel, ask the policy, let `reconcile` decide, and hand what it
says to `Operations` (operations.py: one thread per operation, at most one
per device, so a slow or dead target only ever delays its own device). What
the records say is kept by records.py, what `status` shows is built by
report.py, and what a restart takes back is decided by reconcile.adopt: this
module is the loop, the devices it knows, and the policy in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from hotplug import log, usbids
from hotplug.device.claim import Claim, describe
from hotplug.device.control import ControlError, bind_control_socket, serve, socket_path
from hotplug.device.events import DeviceEvent, EventSource
from hotplug.device.operations import Operations, in_thread
from hotplug.device.policy import DEFAULT_CONFIG_DIR
from hotplug.device.policy.files import load_policy
from hotplug.device.policy.model import Policy, PolicyError, Target
from hotplug.device.policy.watch import PolicyWatcher
from hotplug.device.reconcile import (
    Following,
    Observed,
    Release,
    Slot,
    Trail,
    Unexport,
    Wanted,
    adopt,
    desire,
    follow_on_arrival,
    reconcile,
    retry_now,
    status_line,
    target_from_record,
    trail_after,
)
from hotplug.device.records import BY_DAEMON, DaemonRecords, ExportRecords
from hotplug.device.report import device_rows, display_state, table_report
from hotplug.device.status import DaemonInfo, StatusReply
from hotplug.kernel.autoprobe import ROOT_HUB_RE, UsbBus
from hotplug.kernel.stub import STUB_DRIVER, StubStatus, UsbipHost
from hotplug.kernel.sysfs import KernelError, driver_name
from hotplug.notify import Notifier
from hotplug.state import StateError
from hotplug.usb import Device
from hotplug.wire.address import Endpoint

logger = log.get("hotplug.daemon")

T = TypeVar("T")
OnStop = Literal["unexport", "keep"]

STOP_GRACE = 20.0  # within systemd's TimeoutStopSec (30 s in our unit)
# Per busid: this many plug, unplug and decision lines every window, then a count.
EVENT_LOG_BURST = 10
EVENT_LOG_WINDOW = 10.0
RELOAD_SLOW = 10.0  # a policy parse this long is logged (it goes on: the loop does not wait)


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


class Daemon:
    def __init__(
        self,
        options: Options,
        policy: Policy,
        stub: UsbipHost,
        source: Callable[[], EventSource],
        records: ExportRecords,
        notifier: Notifier | None = None,
        bus: UsbBus | None = None,
    ) -> None:
        self.options = options
        self.policy = policy
        self.policy_error: str | None = None
        self.stub = stub
        # settings.claim: before-probe: new devices wait for our decision.
        self.claim = Claim(bus or UsbBus(stub.paths), options.state_dir)
        self.make_source = source
        self.records = DaemonRecords(records)
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
        # A rule's `follow:`: trails left by exported devices that went, by busid,
        # and the devices that came back on one in time (reconcile.Trail, Following).
        self.trails: dict[str, Trail] = {}
        self.following: dict[str, Following] = {}
        self.ops = Operations(self)
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
        self._source: EventSource | None = None
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again: str | None = None  # why, if asked again during a reload
        from hotplug.device.metrics import DeviceMetrics  # the library: for the daemon alone

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
        self._source = source
        # Parse usb.ids (~0.5 s of Python) now, not in the first plug's export path
        # where the decision's log line would (bench/vm_compare.py measured it).
        usbids.system_database()
        try:
            self._recover_claim()
            if self.policy.settings.claim == "before-probe":
                self._claiming(True)  # before the enumeration: no device slips through
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
            if self.claim.active:  # however we leave: no device may be left waiting
                self._claiming(False)
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
        now = time.monotonic()
        waits = [
            self.options.poll_interval,
            *(t - now for t in self.settling.values()),
            *(trail.until - now for trail in self.trails.values()),
        ]
        if self.wake_at is not None:
            waits.append(self.wake_at - now)
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
            self.ops.cut_exports_short()
        await self.ops.drain(STOP_GRACE)
        if mode == "unexport":
            for busid, slot in sorted(self.slots.items()):
                if self.ops.busy(busid):
                    continue
                if slot.exported_to is not None:
                    self.ops.start(Unexport(busid, slot.exported_to, release=True))
                elif slot.owned:
                    self.ops.start(Release(busid))
            await self.ops.drain(STOP_GRACE)
        if self.claim.active:
            self._claiming(False)
        # A last try for writes the loop kept retrying: with on_stop keep, the next
        # start adopts only what its records name.
        self.records.retry()
        for busid in sorted(self.records.unsaved):
            log.event(
                logger,
                logging.ERROR,
                f"stopping with the record of {busid} unwritten: the next start will not adopt it",
                busid=busid,
                event="state-error",
            )

    # ------------------------------------------------------------------ one step

    def _step(self) -> None:
        now = time.monotonic()
        self.event_log.flush(now)
        for busid, deadline in list(self.settling.items()):
            if now >= deadline:
                del self.settling[busid]
                if busid in self.devices:
                    self._log_decision(self.devices[busid], "no driver took it; deciding anyway: ")
        for busid, trail in list(self.trails.items()):
            if now >= trail.until:
                del self.trails[busid]
                log.event(
                    logger,
                    logging.INFO,
                    f"{busid}: nothing came back within {trail.follow:g} s of {trail.left} "
                    "leaving; no longer following it",
                    busid=busid,
                    target=trail.target,
                    rule=trail.rule,
                    event="follow-ended",
                )
        self.records.retry()
        self._observe()
        self._take_stranded()
        wanted = {busid: self.wanted(device) for busid, device in self.devices.items()}
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
            self.ops.start(action)
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
                self._gone(busid)  # the kernel wins over a late event
                observed[busid] = Observed()
                continue
            driver = driver_name(self.stub.paths.device_dir(busid))
            bound = driver == STUB_DRIVER
            used = bound and self.stub.status(busid) == StubStatus.USED
            waiting = driver is None and self.claim.active
            observed[busid] = Observed(bound=bound, used=used, waiting=waiting)
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
            if not seen.bound or seen.used or slot.owned or self.ops.busy(busid):
                continue
            record = self.records.get(busid)
            if (
                record is None
                or record.by == BY_DAEMON
                or record.state != "exporting"
                or record.writer_alive
            ):
                continue
            target = target_from_record(record, self.policy.targets)
            if target is None:
                continue
            self.slots[busid] = replace(slot, owned=True, phase="idle", last_error=None)
            self.record(busid, target, "retrying")
            log.event(
                logger,
                logging.WARNING,
                f"{busid}: {record.raw.get('by', 'another tool')} (pid {record.raw.get('pid')})"
                " bound it and ended before exporting it; taking it over (the policy decides:"
                " export or give back)",
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

    def bound(self, busid: str) -> bool:
        return driver_name(self.stub.paths.device_dir(busid)) == STUB_DRIVER

    def wanted(self, device: Device) -> Wanted:
        if device.busid in self.settling:
            return Wanted("none", None, "waiting for the kernel to configure it")
        owned = self.slots.get(device.busid, Slot()).owned
        held = device.busid in self.held_back and not self.policy.settings.coldplug and not owned
        return desire(self.policy, device, held, self.following.get(device.busid))

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
        elif event.action in ("waiting", "driver"):
            self._claim_event(event)
        elif event.action == "remove":
            self._gone(event.busid)
        elif event.device is not None:
            self._device_present(event.device)

    def _coldplug(self, devices: list[Device], at_start: bool = True) -> None:
        present = {d.busid for d in devices}
        for busid in set(self.devices) - present:
            self._gone(busid)
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
        if old is None and not coldplug:
            self._arrived(device)
        prefix = "present at start: " if coldplug else "plugged in: "
        if device.driver is None and old is None and self.claim.active:
            # Held back from its drivers: it waits for us, not for a driver.
            self._log_decision(device, prefix)
        elif device.driver is None and old is None:
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

    def _gone(self, busid: str) -> None:
        """The device at `busid` left (unplugged, or re-enumerating as another)."""
        self.held_back.discard(busid)
        self.settling.pop(busid, None)
        self.following.pop(busid, None)
        device = self.devices.pop(busid, None)
        if device is None:
            return
        self._log_unplugged(busid)
        trail = trail_after(self.slots.get(busid), device.vid_pid, time.monotonic())
        if trail is not None:
            self.trails[busid] = trail
            log.event(
                logger,
                logging.INFO,
                f"{busid}: {device.vid_pid} left while exported to {trail.target}; for"
                f" {trail.follow:g} s whatever appears at {busid} goes there too (follow)",
                busid=busid,
                target=trail.target,
                rule=trail.rule,
                event="follow-armed",
            )

    def _arrived(self, device: Device) -> None:
        """A device appeared at a busid: on a trail in time, it follows it."""
        trail = self.trails.pop(device.busid, None)
        if trail is None:
            return
        now = time.monotonic()
        following = follow_on_arrival(trail, device.vid_pid, now)
        if following is None:
            log.event(
                logger,
                logging.INFO,
                f"{device.busid}: {device.vid_pid} came {trail.since_leaving(now):.1f} s"
                f" after {trail.left} left, later than follow's {trail.follow:g} s; the policy"
                " decides as for any device",
                busid=device.busid,
                rule=trail.rule,
                event="follow-ended",
            )
            return
        self.following[device.busid] = following
        log.event(
            logger,
            logging.INFO,
            f"{device.busid}: came back as {device.vid_pid} {following.after:.1f} s after"
            f" {trail.left} left; following it to {trail.target}",
            busid=device.busid,
            target=trail.target,
            rule=trail.rule,
            event="followed",
        )

    # ------------------------------------------------------------------ claim: before-probe

    def _recover_claim(self) -> None:
        """What a previous run that held devices back and did not end cleanly left."""
        try:
            probed = self.claim.recover(self.policy.settings.claim == "before-probe")
        except KernelError as exc:
            log.event(
                logger,
                logging.ERROR,
                f"cannot hand waiting devices to their drivers: {exc}",
                event="autoprobe-error",
            )
            return
        if probed is not None:
            log.event(
                logger,
                logging.WARNING,
                "new USB devices were held back from their drivers with no daemon to decide"
                " (a previous run did not end cleanly): drivers_autoprobe restored, "
                + describe(probed),
                event="autoprobe-restored",
            )

    def _claiming(self, on: bool) -> None:
        """settings.claim: before-probe on or off (at start, on reload, at stop)."""
        if self._source is not None:
            self._source.claims(on)
        try:
            if on:
                self.claim.begin()
                message = (
                    "holding new USB devices back from their drivers (drivers_autoprobe 0):"
                    " exported devices go to usbip-host unconfigured, the others to their"
                    " drivers at once"
                )
            else:
                message = "drivers_autoprobe back to 1: " + describe(self.claim.end())
        except (KernelError, StateError) as exc:
            log.event(
                logger,
                logging.ERROR,
                f"settings.claim: cannot {'hold devices back' if on else 'restore autoprobe'}:"
                f" {exc}" + ("; devices are taken after their drivers probed them" if on else ""),
                event="autoprobe-error",
            )
            if on and self._source is not None:
                self._source.claims(False)
            return
        log.event(logger, logging.INFO, message, event="claim-on" if on else "claim-off")

    def _claim_event(self, event: DeviceEvent) -> None:
        """A root hub, an interface or a driver while devices are held back."""
        if not self.claim.active:
            return
        if event.action == "driver":
            self.ops.sweep_interfaces()
        elif ROOT_HUB_RE.match(event.busid):
            self.ops.hand_over(event.busid, interface=False)
        else:
            self.ops.hand_over(event.busid, interface=True)

    def _log_decision(self, device: Device, prefix: str) -> None:
        wanted = self.wanted(device)
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
        """Take back what a previous run exported (reconcile.adopt decides)."""
        try:
            ours = [(b, r) for b, r in self.records.items() if r.by == BY_DAEMON]
        except StateError as exc:
            log.event(
                logger,
                logging.ERROR,
                f"{exc}; devices exported before this start are not adopted",
                event="state-unreadable",
            )
            return
        bound = {busid: self.bound(busid) for busid, _ in ours if busid in self.devices}
        used = {
            b: self.stub.status(b) == StubStatus.USED for b, is_bound in bound.items() if is_bound
        }
        now, wall = time.monotonic(), time.time()
        for a in adopt(ours, set(self.devices), bound, used, self.policy.targets, now, wall):
            if a.slot is None:
                if a.release:
                    with contextlib.suppress(KernelError):
                        self.stub.release(a.busid)  # forget its match_busid entry
                self.records.forget(a.busid)
                if a.message is not None:
                    log.event(
                        logger, logging.INFO, a.message, busid=a.busid, event="record-dropped"
                    )
                continue
            assert a.target is not None and a.message is not None
            self.held_back.discard(a.busid)
            self.slots[a.busid] = a.slot
            log.event(
                logger,
                logging.INFO,
                a.message,
                busid=a.busid,
                target=a.target.name,
                event="adopted",
                rule=a.rule,
            )

    def _forget_record(self, busid: str) -> None:
        self.records.forget(busid)

    def record(
        self,
        busid: str,
        target: Target,
        state: str,
        since: float | None = None,
        rule: str | None = None,
    ) -> bool:
        """Write our record of `busid` (retried from the loop if it fails)."""
        device = self.devices.get(busid)
        record = self.records.make(
            busid,
            target,
            state,
            since=since,
            vid_pid=device.vid_pid if device is not None else None,
            devid=device.devid if device is not None else None,
            rule=rule or self._rule_of(busid),
        )
        return self.records.write(busid, record)

    def _rule_of(self, busid: str) -> str | None:
        device = self.devices.get(busid)
        return self.wanted(device).rule if device is not None else None

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
                    policy = await in_thread("reload", lambda: load_policy(path), RELOAD_SLOW)
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
        claiming = policy.settings.claim == "before-probe"
        if claiming != self.claim.active:
            self._claiming(claiming)
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
        return dict(self.status_report())

    def status_report(self) -> StatusReply:
        return StatusReply(
            daemon=DaemonInfo(
                pid=os.getpid(),
                status=self.status_text(),
                policy=list(self.policy.sources),
                policy_error=self.policy_error,
                on_stop=self.options.on_stop or self.policy.settings.on_stop,
                claim="before-probe" if self.claim.active else "after-probe",
            ),
            usbip_host=table_report(self.stub),
            devices=device_rows(
                self.devices,
                self.slots,
                self.settling,
                self.wanted,
                self.trails,
                self.following,
            ),
        )
