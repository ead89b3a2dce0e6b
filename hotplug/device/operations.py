"""The daemon's operations: export, unexport, release, probe, each in a thread of its own.

An export, unexport or release writes to sysfs and talks to a target: it
blocks. Each runs in its own thread (`in_thread`), at most one per device,
bounded by its target's timeouts (plus KERNEL_SLACK for the sysfs writes), so
that a slow or dead target only ever delays its own device. Threads and not
the default executor: a few black-hole targets must not use up a small pool
and make everyone else queue. `Canceller` lets the loop cut a handshake short.
`Operations` starts what reconcile decided and books each result (slot,
record, metrics, log) in the daemon that runs it (`Host`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from hotplug import log
from hotplug.device.claim import Claim, describe
from hotplug.device.export import Attempt, export, unexport
from hotplug.device.policy.model import Target
from hotplug.device.reconcile import (
    Abort,
    Action,
    Export,
    Probe,
    Release,
    Slot,
    Unexport,
    Wanted,
    export_failed,
    export_succeeded,
    probe_finished,
    release_finished,
    unexport_finished,
)
from hotplug.device.records import DaemonRecords
from hotplug.device.transport import ExportError, remote_for_target
from hotplug.kernel.stub import UsbipHost
from hotplug.kernel.sysfs import KernelError
from hotplug.usb import Device

if TYPE_CHECKING:  # the library is loaded by the daemon alone (device/metrics.py)
    from hotplug.device.metrics import DeviceMetrics

# The daemon's own lines: these are part of its story.
logger = log.get("hotplug.daemon")

T = TypeVar("T")

# Sysfs writes (to the real kernel, or to the fake one over a socket) get this
# much on top of a target's own connect and handshake timeouts.
KERNEL_SLACK = 10.0


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


async def in_thread(
    name: str, fn: Callable[[], T], limit: float, canceller: Canceller | None = None
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


class Host(Protocol):
    """What an operation needs of the daemon that runs it."""

    stub: UsbipHost
    claim: Claim
    slots: dict[str, Slot]
    devices: dict[str, Device]
    records: DaemonRecords
    metrics: DeviceMetrics

    def wanted(self, device: Device) -> Wanted: ...

    def bound(self, busid: str) -> bool: ...

    def record(
        self,
        busid: str,
        target: Target,
        state: str,
        since: float | None = None,
        rule: str | None = None,
    ) -> bool: ...

    def kick(self) -> None: ...


class Operations:
    """The daemon's operations in flight: at most one per busid, each a task whose
    blocking part runs in a thread of its own (`in_thread`). An operation's
    result updates the daemon's slot, record, metrics and log, then asks for a
    loop step (`kick`)."""

    def __init__(self, daemon: Host) -> None:
        self.daemon = daemon
        self.running: dict[str, asyncio.Task[None]] = {}
        self.cancellers: dict[str, Canceller] = {}

    def busy(self, busid: str) -> bool:
        return busid in self.running

    def cut_exports_short(self) -> None:
        for canceller in self.cancellers.values():
            canceller.fire()

    async def drain(self, timeout: float) -> None:
        pending = list(self.running.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                logger.warning("stopping without waiting for %s", task.get_name())

    def start(self, action: Action) -> None:
        if isinstance(action, Abort):
            canceller = self.cancellers.get(action.busid)
            if canceller is not None:
                canceller.fire()
            return
        if action.busid in self.running:  # reconcile never does this; belt and braces
            logger.error("%s: an operation is already running", action.busid)
            return
        if isinstance(action, Export):
            coro = self._export(action)
        elif isinstance(action, Unexport):
            coro = self._unexport(action)
        elif isinstance(action, Probe):
            coro = self._probe(action)
        else:
            coro = self._release(action)
        task = asyncio.create_task(coro, name=f"{type(action).__name__.lower()} {action.busid}")
        self.running[action.busid] = task

    def _finish(self, busid: str) -> None:
        self.running.pop(busid, None)
        self.daemon.kick()

    async def _export(self, action: Export) -> None:
        busid, target = action.busid, action.target
        canceller = Canceller()
        self.cancellers[busid] = canceller
        attempt = Attempt()
        device = self.daemon.devices.get(busid)
        intent = self.daemon.records.make(
            busid,
            target,
            "exporting",
            vid_pid=device.vid_pid if device is not None else None,
            devid=device.devid if device is not None else None,
            rule=action.rule,
        )
        refused = self.daemon.records.claim(busid, intent, owned=action.adopt)
        if refused is not None:
            self.cancellers.pop(busid, None)
            try:
                self._export_done(action, refused, False, attempt, False)
            finally:
                self._finish(busid)
            return
        log.event(
            logger,
            logging.INFO,
            f"exporting {busid} to {target.name} ({target.address})",
            busid=busid,
            target=target.name,
            event="exporting",
            rule=action.rule,
        )
        error: str | None = None
        try:
            remote = remote_for_target(target)
            await in_thread(
                f"export {busid}",
                lambda: export(
                    self.daemon.stub,
                    busid,
                    remote,
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
            self._export_done(action, error, canceller.fired, attempt, True)
        finally:
            self._finish(busid)

    def _export_done(
        self, action: Export, error: str | None, cut: bool, attempt: Attempt, recorded: bool
    ) -> None:
        """`recorded`: our "exporting" record was written (and so is ours to remove)."""
        busid, target, rule, owned_before = action.busid, action.target, action.rule, action.adopt
        now = time.monotonic()
        slot = self.daemon.slots.get(busid, Slot())
        if error is None:
            self.daemon.slots[busid] = export_succeeded(slot, target, now)
            self.daemon.metrics.exported(busid, target)
            self.daemon.record(busid, target, "exported", since=time.time(), rule=rule)
            return
        device = self.daemon.devices.get(busid)
        wanted = self.daemon.wanted(device) if device is not None else None
        chain = wanted.chain if wanted is not None and wanted.exports else ()
        # Bound now is ours only if this transaction bound it (and could not give
        # it back) or it was ours already: a `usbip bind` or `connect` that got
        # there in between owns what it bound (issue 12, finding 10).
        ours = self.daemon.bound(busid) and (owned_before or attempt.bound)
        new = export_failed(slot, chain, error, ours, now, random.random())
        self.daemon.slots[busid] = new
        self.daemon.metrics.export_failed(target, chain, cut, new, now)
        if ours:
            self.daemon.record(busid, target, "retrying", rule=rule)
        elif recorded:
            self.daemon.records.forget(busid)
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
            await in_thread(
                f"unexport {busid}",
                lambda: self._withdraw(busid, target, action.release),
                target.connect_timeout + target.handshake_timeout + KERNEL_SLACK,
            )
        except (ExportError, KernelError, OSError) as exc:
            error = str(exc)  # unexport() released the device anyway; its kernel drops the link
        except Exception as exc:
            logger.exception("unexport of %s failed unexpectedly", busid)
            error = f"internal error: {exc!r}"
        self.daemon.metrics.unexport_done(target, error)
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
            bound = self.daemon.bound(busid)
            slot = self.daemon.slots.get(busid, Slot())
            self.daemon.slots[busid] = unexport_finished(slot, bound, error, time.monotonic())
            if not bound:
                self.daemon.records.forget(busid)
            else:
                self.daemon.record(busid, target, "moving")
        finally:
            self._finish(busid)

    def _withdraw(self, busid: str, target: Target, release: bool) -> None:
        """OP_UNEXPORT, then give the device back (or keep it bound to export elsewhere)."""
        # Which device we exported: a different one plugged in at `busid` since is
        # left alone (UsbipHost.release).
        record = self.daemon.records.get(busid)
        devid = record.devid if record is not None else None
        try:
            remote = remote_for_target(target)
            unexport(self.daemon.stub, busid, remote, release=release, devid=devid)
        finally:
            if not self.daemon.stub.paths.device_dir(busid).exists():
                # Unplugged: usbip-host keeps the busid in match_busid. Ask it to
                # forget; Debian's 6.1 accepts that and keeps the entry anyway (a
                # re-plugged device still goes to its usual driver, seen in the VM).
                with contextlib.suppress(KernelError):
                    self.daemon.stub.release(busid, devid)
            elif not release:
                # Staying bound to move elsewhere: stop our end of the old link now
                # instead of waiting for the kernel to notice the far end closed.
                with contextlib.suppress(KernelError):
                    self.daemon.stub.stop(busid)
            else:
                self._interfaces_home(busid)

    def _interfaces_home(self, busid: str) -> None:
        """Given back while new devices are held back: the generic driver chose a
        configuration again, and its interfaces wait for their drivers."""
        if self.daemon.claim.active:
            with contextlib.suppress(KernelError):
                self.daemon.claim.bus.hand_over(busid)

    async def _release(self, action: Release) -> None:
        busid = action.busid
        error: str | None = None
        device = self.daemon.devices.get(busid)
        devid = device.devid if device is not None else None

        def release() -> None:
            self.daemon.stub.release(busid, devid)
            self._interfaces_home(busid)

        try:
            await in_thread(f"release {busid}", release, KERNEL_SLACK)
        except (KernelError, OSError) as exc:
            error = str(exc)
        try:
            bound = self.daemon.bound(busid)
            slot = self.daemon.slots.get(busid, Slot())
            self.daemon.slots[busid] = release_finished(slot, bound, error, time.monotonic())
            if not bound:
                self.daemon.records.forget(busid)
            log.event(
                logger,
                logging.INFO if error is None else logging.WARNING,
                f"released {busid}" + (f": {error}" if error else ""),
                busid=busid,
                event="released",
            )
        finally:
            self._finish(busid)

    async def _probe(self, action: Probe) -> None:
        """A device held back from its drivers that the policy does not export."""
        busid = action.busid
        error: str | None = None
        probed: list[str] = []
        try:
            probed = await in_thread(
                f"probe {busid}", lambda: self.daemon.claim.bus.hand_over(busid), KERNEL_SLACK
            )
        except (KernelError, OSError) as exc:
            error = str(exc)
        try:
            slot = self.daemon.slots.get(busid, Slot())
            self.daemon.slots[busid] = probe_finished(slot, error, time.monotonic())
            message = f"{busid}: " + (
                f"handing it to its drivers failed: {error}" if error else describe(probed)
            )
            log.event(
                logger,
                logging.INFO if error is None else logging.WARNING,
                message,
                busid=busid,
                event="probed",
            )
        finally:
            self._finish(busid)

    def hand_over(self, name: str, interface: bool) -> None:
        """A root hub or an interface that appeared while devices are held back
        (not a device the policy decides about): to its drivers, in a thread."""
        if name in self.running:
            return
        bus = self.daemon.claim.bus

        def work() -> list[str]:
            if interface:
                return [name] if bus.hand_over_interface(name) else []
            return bus.hand_over(name)

        self._side_task(name, work)

    def sweep_interfaces(self) -> None:
        """A driver registered: interfaces that waited for it (probed before its
        module was loaded) get it now, as autoprobe would have given it."""
        self._side_task("sweep", lambda: self.daemon.claim.bus.sweep(devices=False))

    def _side_task(self, key: str, work: Callable[[], list[str]]) -> None:
        if key in self.running:
            return

        async def run() -> None:
            try:
                probed = await in_thread(f"probe {key}", work, KERNEL_SLACK)
                if probed:
                    log.event(logger, logging.INFO, describe(probed), busid=None, event="probed")
            except (KernelError, OSError) as exc:
                log.event(
                    logger, logging.WARNING, f"probing {key} failed: {exc}", event="probe-failed"
                )
            finally:
                self.running.pop(key, None)

        self.running[key] = asyncio.create_task(run(), name=f"probe {key}")
