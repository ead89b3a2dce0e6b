"""`usbip-hotplug status`: what the running daemon does with each device, asked over
its control socket and shown as a table (or the daemon's JSON as it is)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from hotplug.device.control import ControlError, request, socket_path
from hotplug.printable import printable
from hotplug.state import default_dir


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
