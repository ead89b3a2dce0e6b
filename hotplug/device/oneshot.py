"""The one-shot commands: `connect`, `disconnect`, `list`, `cert-fingerprint`.

Each runs one transaction by hand and exits; `connect` and `disconnect` keep
the same records under /run as the daemon (device/records.py), so that each
sees what the other did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

from hotplug import usbids
from hotplug.device.export import (
    ExportError,
    export,
    export_gadget,
    unexport,
    unexport_gadget,
)
from hotplug.device.records import (
    BY_CONNECT,
    BY_DAEMON,
    ExportRecord,
    ExportRecords,
    exports_dir,
)
from hotplug.device.transport import Remote, parse_remote
from hotplug.errors import HotplugError
from hotplug.kernel import KernelError, make_stub
from hotplug.kernel.stub import STUB_DRIVER, StubStatus, UsbipHost
from hotplug.kernel.sysfs import list_devices, read_device, validate_busid
from hotplug.kernel.vudc import Vudc
from hotplug.printable import printable
from hotplug.state import StateError
from hotplug.wire.address import AddressError
from hotplug.wire.sockets import Timeouts

PEER = "another usbip peer"  # `list`: exported, but not by us


class UsageError(HotplugError):
    """A command line that cannot be carried out as given."""


def _remote(args: argparse.Namespace, text: str, saved: ExportRecord | None = None) -> Remote:
    """-r with --cert/--key/--ca/--proxy; `saved` (disconnect's record) fills in the rest."""
    saved = saved if saved is not None and saved.target == text else None
    tls = saved.tls if saved is not None else None
    try:
        remote = parse_remote(
            text,
            cert=args.cert or (tls.cert if tls else None),
            key=args.key or (tls.key if tls else None),
            ca=args.ca or (tls.ca if tls else None),
            proxy=args.proxy or (saved.proxy if saved is not None else None),
            timeouts=Timeouts(connect=args.timeout, handshake=args.timeout),
        )
    except AddressError as exc:
        raise UsageError(str(exc)) from exc
    return remote


def _gadget_name(args: argparse.Namespace, vudc: Vudc) -> str:
    if args.busid:
        return str(args.busid)
    bound = [name for name in vudc.names() if vudc.gadget_bound(name)]
    if len(bound) != 1:
        have = ", ".join(bound) or "none with a gadget bound"
        raise UsageError(f"--device: name the vUDC with -b (have: {have})")
    return bound[0]


def _require_busid(args: argparse.Namespace) -> None:
    if not args.device and not args.busid:
        raise UsageError(f"{args.command}: -b BUSID is required")


def cmd_connect(args: argparse.Namespace) -> int:
    _require_busid(args)
    endpoint = _remote(args, args.remote)
    if args.device:
        vudc = Vudc()
        name = _gadget_name(args, vudc)
        record = export_gadget(vudc, name, endpoint)
        print(f"exported {name} ({record.id_vendor:04x}:{record.id_product:04x}) to {endpoint}")
        return 0
    validate_busid(args.busid)  # before it names a record file
    stub = make_stub()
    records = exports_dir()
    intent = ExportRecord(
        by=BY_CONNECT,
        pid=os.getpid(),
        state="exporting",
        target=str(endpoint),
        since=time.time(),
        # A secure remote: what disconnect needs to reach it again.
        tls=endpoint.tls if endpoint.secure else None,
        proxy=endpoint.proxy if endpoint.secure else None,
    )
    # Which device this is (busnum << 16 | devnum): `disconnect` gives back only
    # this one, never a device plugged in at the same busid since. (No device:
    # export() says so, after what else it checks first.)
    with contextlib.suppress(KernelError):
        intent = replace(intent, devid=read_device(stub.paths, args.busid).devid)
    # The record first, then the bind (issue 12, findings 5 and 8): a device bound
    # with no record is "another tool's" to the daemon for good.
    previous = _claim_record(records, args.busid, intent)
    try:
        device = export(stub, args.busid, endpoint, adopt_bound=args.force)
    except BaseException:
        _restore_record(records, args.busid, previous)
        raise
    try:
        done = replace(
            intent,
            state="exported",
            since=time.time(),
            vid_pid=device.vid_pid,
            devid=device.devid,
        )
        records.put(args.busid, done)
    except BaseException as exc:
        _roll_back(stub, args, endpoint, device.devid)
        _restore_record(records, args.busid, previous)
        if isinstance(exc, StateError):
            raise StateError(f"{exc}; the export of {args.busid} is rolled back") from None
        raise
    print(f"exported {args.busid} ({device.vid_pid}) to {endpoint}")
    return 0


def _claim_record(records: ExportRecords, busid: str, intent: ExportRecord) -> ExportRecord | None:
    """Write `connect`'s record of `busid` before touching the device; return the
    record it replaced (to put back if the export does not happen).

    Refused while the daemon that manages the device, or another `connect`
    exporting it, is alive. A record whose writer is gone is replaced: if it
    still describes a live export, export()'s own checks refuse the device.
    """
    try:
        claimed, previous = records.claim(busid, intent)
    except StateError as exc:
        raise StateError(f"{exc}; {busid} is not exported ({_UNRECORDED})") from None
    if claimed:
        return None
    if previous is not None and previous.writer_alive:
        pid = previous.pid
        if previous.by == BY_DAEMON:
            raise KernelError(
                f"{busid} is managed by the usbip-hotplug daemon (pid {pid}): change its "
                "policy, or stop it, to export the device by hand"
            )
        if previous.state == "exporting":
            raise KernelError(f"another usbip-hotplug connect (pid {pid}) is exporting {busid}")
    try:
        records.put(busid, intent)
    except StateError as exc:
        raise StateError(f"{exc}; {busid} is not exported ({_UNRECORDED})") from None
    return previous


_UNRECORDED = (
    "an export without its record is lost to disconnect and to the daemon after a restart; "
    "make the state directory writable (USBIP_HOTPLUG_STATE_DIR, default "
    "/run/usbip-hotplug)"
)


def _restore_record(records: ExportRecords, busid: str, previous: ExportRecord | None) -> None:
    try:
        if previous is None:
            records.remove(busid)
        else:
            records.put(busid, previous)
    except StateError as exc:
        print(f"usbip-hotplug: warning: {exc}", file=sys.stderr)


def _roll_back(stub: UsbipHost, args: argparse.Namespace, endpoint: Remote, devid: int) -> None:
    """Withdraw an export that succeeded but could not be recorded."""
    with contextlib.suppress(ExportError, KernelError):
        unexport(stub, args.busid, endpoint, devid=devid)


def cmd_disconnect(args: argparse.Namespace) -> int:
    _require_busid(args)
    records = exports_dir()
    record = records.get(args.busid)
    remote = args.remote or (record.target if record is not None else None)
    if not remote:
        raise UsageError(f"no record of where {args.busid} was exported: give -r HOST[:PORT]")
    endpoint = _remote(args, remote, record)
    if args.device:
        status = unexport_gadget(Vudc(), args.busid, endpoint)
        print(f"unexported {args.busid} from {endpoint}")
        return 0
    try:
        devid = record.devid if record is not None else None
        status = unexport(make_stub(), args.busid, endpoint, devid=devid)
    finally:
        try:
            records.remove(args.busid)
        except StateError as exc:  # the device is withdrawn all the same
            print(f"usbip-hotplug: warning: {exc}", file=sys.stderr)
    note = " (it was not attached there)" if status == 3 else ""
    print(f"unexported {args.busid} from {endpoint}{note}")
    return 0


def device_rows() -> list[dict[str, Any]]:
    stub = make_stub()
    records = exports_dir()
    rows = []
    for device in list_devices(stub.paths):
        if device.is_hub:
            continue
        status = stub.status(device.busid) if device.driver == STUB_DRIVER else None
        record = records.get(device.busid)
        exported_to = None
        if status == StubStatus.USED:
            # A record without a target says nothing of where (as if there were none).
            exported_to = record.raw.get("target", PEER) if record is not None else PEER
        rows.append(
            {
                "busid": device.busid,
                "vid_pid": device.vid_pid,
                "vendor": usbids.system_database().vendor(device.vendor) or device.manufacturer,
                "product": usbids.system_database().product(device.vendor, device.product)
                or device.product_name,
                "serial": device.serial,
                "driver": device.driver,
                "usbip_status": status.name.lower() if status is not None else None,
                "exported_to": exported_to,
            }
        )
    return rows


def gadget_rows() -> list[dict[str, Any]]:
    vudc = Vudc()
    rows = []
    for name in vudc.names():
        row: dict[str, Any] = {"busid": name, "gadget": vudc.gadget_bound(name)}
        if row["gadget"]:
            record = vudc.record(name)
            row["vid_pid"] = f"{record.id_vendor:04x}:{record.id_product:04x}"
        status = vudc.status(name)
        row["usbip_status"] = {1: "available", 2: "used", 3: "error"}.get(status or 0)
        rows.append(row)
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    if args.device:
        grows = gadget_rows()
        if args.json:
            print(json.dumps(grows, indent=1))
        elif not grows:
            print("no usbip-vudc UDCs (modprobe usbip-vudc)")
        for row in [] if args.json else grows:
            what = f"gadget {row['vid_pid']}" if row["gadget"] else "no gadget bound"
            status = row["usbip_status"] or "not exportable"
            print(printable(f" - {row['busid']}: {what}, {status}"))
        return 0
    rows = device_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no exportable USB devices")
        return 0
    for row in rows:
        names = f"{row['vendor'] or 'unknown vendor'} : {row['product'] or 'unknown product'}"
        where = f", exported to {row['exported_to']}" if row["exported_to"] else ""
        for line in (
            f" - busid {row['busid']} ({row['vid_pid']})",
            f"   {names}",
            f"   driver: {row['driver'] or '(none)'}{where}",
        ):
            print(printable(line))  # USB strings are the device's word: no escapes reach the tty
        print()
    return 0


def cmd_cert_fingerprint(args: argparse.Namespace) -> int:
    from hotplug.wire.tls import CertError, check_pair, fingerprint

    try:
        print(fingerprint(args.cert))
        if args.key:
            info = check_pair(args.cert, args.key, "client")
            print(f"subject: {info.subject}")
            if info.san:
                print(f"subjectAltName: {', '.join(info.san)}")
            print(f"valid: {info.not_before} to {info.not_after}")
            print("key matches; usable as a client certificate")
    except CertError as exc:
        raise UsageError(str(exc)) from exc
    return 0
