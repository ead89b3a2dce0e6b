"""What the running daemon reports to `status`: one row per device, and
usbip-host's busid table (the shape of both is device/status.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping

from hotplug import usbids
from hotplug.device.reconcile import Following, Slot, Trail, Wanted
from hotplug.device.status import DeviceRow, TableReport
from hotplug.kernel.stub import TABLE_SLOTS, UsbipHost
from hotplug.kernel.sysfs import KernelError, busid_sort_key
from hotplug.usb import Device

# `status` warns when this few of usbip-host's busid slots are left.
TABLE_LOW = 4


def device_rows(
    devices: Mapping[str, Device],
    slots: Mapping[str, Slot],
    settling: Collection[str],
    wanted_of: Callable[[Device], Wanted],
    trails: Mapping[str, Trail] | None = None,
    following: Mapping[str, Following] | None = None,
) -> list[DeviceRow]:
    """One row per device plugged in or still in the daemon's books, by busid;
    a busid where a device is awaited (a rule's `follow:`) has one too."""
    trails = trails or {}
    following = following or {}
    mono, wall = time.monotonic(), time.time()

    def to_wall(t: float | None) -> float | None:
        return None if t is None else wall - (mono - t)

    rows = []
    db = usbids.system_database()
    for busid in sorted(set(devices) | set(slots) | set(trails), key=busid_sort_key):
        device = devices.get(busid)
        slot = slots.get(busid, Slot(since=mono))
        wanted = wanted_of(device) if device is not None else None
        target = slot.target
        if target is None and slot.phase == "idle" and wanted is not None and wanted.exports:
            target = wanted.chain[0]
        trail = trails.get(busid) if device is None else None
        follows = following.get(busid) if device is not None else None
        state = "settling" if busid in settling else display_state(slot, wanted)
        reason = wanted.reason if wanted is not None else "unplugged"
        follow: str | None = follows.reason if follows is not None else None
        if trail is not None and slot.phase == "idle":
            state = "awaiting"
            reason = follow = (
                f"{trail.left} left; until {_clock(to_wall(trail.until))} whatever appears"
                f" here goes to {trail.target} ({_rule(trail.rule)}follow: {trail.follow:g})"
            )
        rows.append(
            DeviceRow(
                busid=busid,
                vid_pid=device.vid_pid if device is not None else None,
                vendor=(db.vendor(device.vendor) or device.manufacturer)
                if device is not None
                else None,
                product=(db.product(device.vendor, device.product) or device.product_name)
                if device is not None
                else None,
                serial=device.serial if device is not None else None,
                rule=wanted.rule if wanted is not None else (trail.rule if trail else None),
                reason=reason,
                state=state,
                target=target.name if target is not None else (trail.target if trail else None),
                address=target.address if target is not None else None,
                since=to_wall(slot.since),
                last_error=slot.last_error,
                next_retry=to_wall(slot.next_at) if slot.phase == "backoff" else None,
                follow=follow,
                follow_until=to_wall(trail.until) if trail is not None else None,
            )
        )
    return rows


def _rule(name: str | None) -> str:
    return f"rule '{name}', " if name else ""


def _clock(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%H:%M:%S", time.localtime(stamp))


def table_report(stub: UsbipHost) -> TableReport:
    """usbip-host's busid table: a full one refuses every new export until the
    module is reloaded, so say how much of it is left, and what was lost."""
    try:
        table = stub.table()
        leaked = stub.leftovers()
    except (KernelError, OSError) as exc:
        return TableReport(error=str(exc))
    free = max(0, TABLE_SLOTS - len(table))
    warning = None
    if free <= TABLE_LOW:
        warning = (
            f"only {free} of usbip-host's {TABLE_SLOTS} busid slots left"
            + (f" ({len(leaked)} leaked by devices unplugged mid-export)" if leaked else "")
            + "; new exports fail once none is left: reload the module when nothing"
            " is exported (modprobe -r usbip-host; modprobe usbip-host)"
        )
    return TableReport(
        slots=TABLE_SLOTS,
        used=len(table),
        leaked=len(leaked),
        leaked_busids=leaked,
        free=free,
        warning=warning,
    )


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
