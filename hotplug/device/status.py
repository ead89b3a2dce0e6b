"""`usbip-hotplug status`: what the running daemon does with each device.

The reply's shape is here (`StatusReply` and its rows, typed): the daemon
builds one (device/report.py) and sends it as JSON over its control socket
(device/control.py); the command renders it as a table, or prints the JSON
as it came (`status --json`, whose keys and order are these). This module
loads little: it is what a user waits for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TypedDict

from hotplug.device.control import ControlError, request, socket_path
from hotplug.printable import printable
from hotplug.state import default_dir


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
    # A rule's `follow:`: why this device goes where the device before it went,
    # or (state "awaiting", no device) what will follow and until when.
    follow: str | None
    follow_until: float | None  # time.time() the awaiting ends


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
    # before-probe: new devices wait for the daemon (drivers_autoprobe 0); after-probe:
    # the kernel's default (settings.claim, or after-probe if holding them back failed).
    claim: str


class StatusReply(TypedDict):
    daemon: DaemonInfo
    usbip_host: TableReport
    devices: list[DeviceRow]


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
    if daemon.get("claim") == "before-probe":
        lines.append(
            "claim: before-probe (new devices wait for the daemon; drivers_autoprobe is 0)"
        )
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
        if row.get("follow"):
            details.append(str(row["follow"]))
        if row.get("last_error"):
            details.append(f"last error: {row['last_error']}")
        if row.get("next_retry") is not None:
            details.append(f"next retry in {max(0.0, row['next_retry'] - now):.1f} s")
        if details:
            lines.append(" " * 9 + "; ".join(details))
    # Each line is ours; what is in it (USB strings, error texts) is escaped, a
    # newline in a product name included.
    return "\n".join(printable(line) for line in lines)
