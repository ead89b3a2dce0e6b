"""`usbip-hotplug status`: what the running daemon does with each device.

Both ends are here: the daemon builds its reply (`StatusReply`: typed rows,
`device_rows`, `table_report`), sends it as JSON over its control socket
(device/control.py), and the command renders it as a table, or prints the
JSON as it came (`status --json`, whose keys and order are these).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypedDict

from hotplug import usbids
from hotplug.device.control import ControlError, request, socket_path
from hotplug.device.reconcile import Slot, Wanted
from hotplug.kernel.stub import TABLE_SLOTS, UsbipHost
from hotplug.kernel.sysfs import KernelError, busid_sort_key
from hotplug.printable import printable
from hotplug.state import default_dir
from hotplug.usb import Device

# `status` warns when this few of usbip-host's busid slots are left.
TABLE_LOW = 4


class DeviceRow(TypedDict):
    busid: str
    vid_pid: str | None
    vendor: str | None
    product: str | None
    serial: str | None
    rule: str | None
    reason: str
    state: str  # display_state(), or "settling"
    target: str | None  # the policy's name of the target
    address: str | None  # Target.address
    since: float | None  # time.time() the state began
    last_error: str | None
    next_retry: float | None  # time.time() of the next round, while backing off


class TableReport(TypedDict, total=False):
    """usbip-host's busid table; only `error` when it cannot be read."""

    slots: int
    used: int
    leaked: int
    leaked_busids: list[str]
    free: int
    warning: str | None
    error: str


class DaemonInfo(TypedDict):
    pid: int
    status: str  # systemd's STATUS= line
    policy: list[str]  # the files the policy was read from
    policy_error: str | None  # the last reload's errors (the previous policy is in force)
    on_stop: str


class StatusReply(TypedDict):
    daemon: DaemonInfo
    usbip_host: TableReport
    devices: list[DeviceRow]


def device_rows(
    devices: Mapping[str, Device],
    slots: Mapping[str, Slot],
    settling: Collection[str],
    wanted_of: Callable[[Device], Wanted],
) -> list[DeviceRow]:
    """One row per device plugged in or still in the daemon's books, by busid."""
    mono, wall = time.monotonic(), time.time()

    def to_wall(t: float | None) -> float | None:
        return None if t is None else wall - (mono - t)

    rows = []
    db = usbids.system_database()
    for busid in sorted(set(devices) | set(slots), key=busid_sort_key):
        device = devices.get(busid)
        slot = slots.get(busid, Slot(since=mono))
        wanted = wanted_of(device) if device is not None else None
        target = slot.target
        if target is None and slot.phase == "idle" and wanted is not None and wanted.exports:
            target = wanted.chain[0]
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
                rule=wanted.rule if wanted is not None else None,
                reason=wanted.reason if wanted is not None else "unplugged",
                state="settling" if busid in settling else display_state(slot, wanted),
                target=target.name if target is not None else None,
                address=target.address if target is not None else None,
                since=to_wall(slot.since),
                last_error=slot.last_error,
                next_retry=to_wall(slot.next_at) if slot.phase == "backoff" else None,
            )
        )
    return rows


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


def cmd_status(args: argparse.Namespace) -> int:
    try:
        reply = request(socket_path(default_dir("device")), {"command": "status"})
    except ControlError as exc:
        print(f"usbip-hotplug: {exc}", file=sys.stderr)
        return 1
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=1))
        return 0
    print(render_status(reply))
    return 0


def _clock(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    fmt = "%H:%M:%S" if time.time() - stamp < 86400 else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(stamp))


def _columns(busid: str, vid_pid: str, state: str, target: str, since: str, rule: str) -> str:
    return f"{busid:<8} {vid_pid:<9}  {state:<11} {target:<28} {since:<8}  {rule:<16}"


def render_status(reply: dict[str, Any]) -> str:
    daemon = reply.get("daemon", {})
    lines = [f"daemon: {daemon.get('status', '?')} (pid {daemon.get('pid', '?')})"]
    sources = daemon.get("policy") or []
    lines.append(f"policy: {', '.join(sources) if sources else 'none (exports nothing)'}")
    if daemon.get("policy_error"):
        lines.append("policy error (the previous policy stays in force):")
        lines.extend(f"  {line}" for line in str(daemon["policy_error"]).splitlines())
    table = reply.get("usbip_host") or {}
    if "used" in table:
        leaked = f", {table['leaked']} leaked ({' '.join(table['leaked_busids'])})"
        lines.append(
            f"usbip-host: {table['used']} of {table['slots']} busid slots used"
            + (leaked if table.get("leaked") else "")
        )
    elif table.get("error"):
        lines.append(f"usbip-host: {table['error']}")
    if table.get("warning"):
        lines.append(f"warning: {table['warning']}")
    rows = reply.get("devices") or []
    if not rows:
        lines.append("no USB devices")
        return "\n".join(printable(line) for line in lines)
    header = ("BUSID", "VID:PID", "STATE", "TARGET", "SINCE", "RULE")
    lines.append(_columns(*header) + " DEVICE")
    now = time.time()
    for row in rows:
        target = f"{row['target']} {row['address']}" if row.get("target") else "-"
        names = f"{row.get('vendor') or '?'} : {row.get('product') or '?'}"
        cells = (row["busid"], row.get("vid_pid") or "-", row["state"], target)
        lines.append(
            _columns(*cells, _clock(row.get("since")), row.get("rule") or "-") + " " + names
        )
        details = []
        if row.get("state") in ("not matched", "ignored"):
            details.append(str(row.get("reason")))
        if row.get("last_error"):
            details.append(f"last error: {row['last_error']}")
        if row.get("next_retry") is not None:
            details.append(f"next retry in {max(0.0, row['next_retry'] - now):.1f} s")
        if details:
            lines.append(" " * 9 + "; ".join(details))
    # Each line is ours; what is in it (USB strings, error texts) is escaped, a
    # newline in a product name included.
    return "\n".join(printable(line) for line in lines)
