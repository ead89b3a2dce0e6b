"""`usbip-hotplug run | check | status`: the daemon's commands, registered with hotplug.cli."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from hotplug import usbids
from hotplug.cli import exports_dir, register
from hotplug.control import ControlError, request, socket_path
from hotplug.daemon import Daemon, Options, address_of
from hotplug.events import EventSource, JsonLinesSource
from hotplug.faultpoints import reach
from hotplug.kernel import make_stub
from hotplug.kernel.stub import STUB_DRIVER
from hotplug.metrics import MetricsError, listen_arg
from hotplug.policy import DEFAULT_CONFIG_DIR, Policy, PolicyError, load_policy
from hotplug.printable import printable
from hotplug.reconcile import desire
from hotplug.state import InstanceLock, StateError, default_dir
from hotplug.udev import UdevSource, enumerate_devices
from hotplug.usb import Device


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _policy_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help=f"policy file (alone), or a directory with policy.yaml and policy.d/ "
        f"(default {DEFAULT_CONFIG_DIR})",
    )


def _policy_error(exc: PolicyError) -> int:
    print(printable(f"usbip-hotplug: the policy has errors:\n{exc}", keep="\n"), file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- run


@register("run", "run the hotplug daemon: export devices as the policy says, keep them exported")
def _configure_run(p: argparse.ArgumentParser) -> None:
    _policy_arg(p)
    p.add_argument(
        "--on-stop",
        choices=["unexport", "keep"],
        help="what stopping does with exported devices (default: the policy's "
        "settings.on_stop, which defaults to unexport)",
    )
    p.add_argument(
        "--poll-interval",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="how often to read usbip_status to notice a lost link (default 2)",
    )
    p.add_argument(
        "--watch-interval",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="how often to look for changed policy files (default 2)",
    )
    p.add_argument(
        "--metrics-listen",
        type=listen_arg,
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics, e.g. 127.0.0.1:9100 or "
        "[::1]:9100 (default: the policy's settings.metrics.listen; off without either). "
        "No authentication: keep it on loopback or behind a firewall",
    )
    # Tests feed device events as JSON lines through a FIFO instead of udev,
    # and shorten the wait for a device without a driver.
    p.add_argument("--events", metavar="FIFO", help=argparse.SUPPRESS)
    p.add_argument("--settle-time", type=_seconds, default=2.0, help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    # Before anything else, and held until we exit: two daemons started together
    # would both find no control socket answering, and both run (issue 12, finding 11).
    lock = InstanceLock(default_dir("device"))
    try:
        lock.acquire()
    except StateError as exc:
        print(f"usbip-hotplug: {exc}", file=sys.stderr)
        return 1
    try:
        reach("run.after-lock")
        return _run(args)
    finally:
        lock.release()


def _run(args: argparse.Namespace) -> int:
    path = Path(args.config) if args.config else None
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        return _policy_error(exc)
    stub = make_stub()
    if not stub.loaded:
        print(
            "usbip-hotplug: warning: usbip-host is not loaded yet ('modprobe usbip-host'); "
            "exports fail until it is",
            file=sys.stderr,
        )
    events = Path(args.events) if args.events else None

    def source() -> EventSource:
        if events is not None:
            return JsonLinesSource(events, stub.paths)
        return UdevSource()

    options = Options(
        policy_path=path,
        state_dir=default_dir("device"),
        on_stop=args.on_stop,
        poll_interval=args.poll_interval,
        watch_interval=args.watch_interval,
        settle_time=args.settle_time,
        metrics_listen=args.metrics_listen,
    )
    daemon = Daemon(options, policy, stub, source, exports_dir())
    try:
        return asyncio.run(daemon.run())
    except (ControlError, MetricsError) as exc:
        print(f"usbip-hotplug: {exc}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- check


@register("check", "validate the policy; show what it would do with the devices plugged in now")
def _configure_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", metavar="PATH", help="same as -c PATH")
    _policy_arg(p)
    p.add_argument(
        "-q", "--quiet", action="store_true", help="only validate (for ExecReload): no device list"
    )
    p.set_defaults(handler=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    given = args.path or args.config
    try:
        policy = load_policy(Path(given) if given else None)
    except PolicyError as exc:
        return _policy_error(exc)
    print(printable(_policy_summary(policy), keep="\n"))
    if args.quiet:
        return 0
    stub = make_stub()
    devices = enumerate_devices(stub.paths)
    ours = {busid for busid, rec in exports_dir().items() if rec.get("by") == "daemon"}
    if not devices:
        print("no USB devices plugged in")
    for device in devices:
        foreign = device.driver == STUB_DRIVER and device.busid not in ours
        print(_check_line(policy, device, foreign))  # escaped line by line
    return 0


def _policy_summary(policy: Policy) -> str:
    files = ", ".join(policy.sources) or "no policy files (nothing is exported)"
    settings = policy.settings
    return (
        f"policy OK: {files}\n"
        f"  {len(policy.targets)} targets, {len(policy.rules)} rules; "
        f"on_stop {settings.on_stop}, coldplug {'on' if settings.coldplug else 'off'}"
        + ("" if settings.coldplug else " (devices present when the daemon starts are left alone)")
    )


def _check_line(policy: Policy, device: Device, foreign: bool) -> str:
    names = usbids.names(device.vendor, device.product, device.manufacturer, device.product_name)
    head = f"{device.busid:<8} {device.vid_pid}  {names}"
    wanted = desire(policy, device)
    if wanted.exports:
        first, *rest = wanted.chain
        verdict = f"export to {first.name} ({address_of(first)})"
        if rest:
            verdict += ", fallback " + ", ".join(f"{t.name} ({address_of(t)})" for t in rest)
    elif wanted.action == "ignore":
        verdict = "leave alone (ignore)"
    else:
        verdict = "leave alone"
    lines = [head, f"         would {verdict}: {wanted.reason}"]
    if foreign and wanted.exports:
        lines.append(
            "         but it is bound to usbip-host by another tool: the daemon leaves it alone"
        )
    return "\n".join(printable(line) for line in lines)


# --------------------------------------------------------------------------- status


@register("status", "show what the running daemon does with each device")
def _configure_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)


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
