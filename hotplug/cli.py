"""`usbip-hotplug`: the device side's command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hotplug import __version__, log, usbids
from hotplug.address import AddressError, Endpoint, parse_endpoint
from hotplug.export import (
    ExportError,
    Timeouts,
    export,
    export_gadget,
    unexport,
    unexport_gadget,
)
from hotplug.kernel import KernelError, make_stub
from hotplug.kernel.stub import STUB_DRIVER, StubStatus, UsbipHost
from hotplug.kernel.sysfs import BUSID_RE, list_devices, read_device, validate_busid
from hotplug.kernel.vudc import VUDC_RE, Vudc
from hotplug.printable import printable
from hotplug.state import (
    RecordDir,
    RecordTaken,
    StateError,
    default_dir,
    record_devid,
    writer_alive,
)
from hotplug.transport import Remote, parse_remote

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Handler] = {}


class UsageError(Exception):
    pass


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the one-shot command is, as Ctrl-C is: the
    rollback of a half-done export runs (`timeout 3 usbip-hotplug connect ...`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# One-shot commands that change the kernel: a signal must unwind them, not end them.
INTERRUPTIBLE = ("connect", "disconnect")


def interrupt_on_signals() -> None:
    def handler(signum: int, _frame: object) -> None:
        # Once: a second SIGTERM (systemd, an impatient script) must not cut the
        # rollback the first one started short. SIGKILL still ends us.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def exports_dir() -> RecordDir:
    """One record per device exported by `connect` or the daemon: to whom, since when."""
    return RecordDir(default_dir("device") / "exports")


def _endpoint(text: str) -> Endpoint:
    try:
        return parse_endpoint(text)
    except AddressError as exc:
        raise UsageError(str(exc)) from exc


def _remote(
    args: argparse.Namespace, text: str, saved: Mapping[str, Any] | None = None
) -> Endpoint | Remote:
    """-r with --cert/--key/--ca/--proxy; `saved` (disconnect's record) fills in the rest."""
    saved = saved if saved is not None and saved.get("target") == text else {}
    tls = saved.get("tls") or {}
    try:
        remote = parse_remote(
            text,
            cert=args.cert or tls.get("cert"),
            key=args.key or tls.get("key"),
            ca=args.ca or tls.get("ca"),
            proxy=args.proxy or saved.get("proxy"),
        )
    except AddressError as exc:
        raise UsageError(str(exc)) from exc
    return remote if remote.secure else _endpoint(text)


def _remote_record(endpoint: Endpoint | Remote) -> dict[str, Any]:
    """What disconnect needs to reach a secure remote again."""
    if not isinstance(endpoint, Remote):
        return {}
    tls = endpoint.tls
    return {
        "tls": {"cert": tls.cert, "key": tls.key, "ca": tls.ca} if tls else None,
        "proxy": endpoint.proxy,
    }


def _timeouts(args: argparse.Namespace) -> Timeouts:
    return Timeouts(connect=args.timeout, handshake=args.timeout)


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
        record = export_gadget(vudc, name, endpoint, _timeouts(args))
        print(f"exported {name} ({record.id_vendor:04x}:{record.id_product:04x}) to {endpoint}")
        return 0
    validate_busid(args.busid)  # before it names a record file
    stub = make_stub()
    records = exports_dir()
    intent = {
        "by": "connect",
        "pid": os.getpid(),
        "state": "exporting",
        "target": str(endpoint),
        "since": time.time(),
        **_remote_record(endpoint),
    }
    # Which device this is (busnum << 16 | devnum): `disconnect` gives back only
    # this one, never a device plugged in at the same busid since. (No device:
    # export() says so, after what else it checks first.)
    with contextlib.suppress(KernelError):
        intent["devid"] = read_device(stub.paths, args.busid).devid
    # The record first, then the bind (issue 12, findings 5 and 8): a device bound
    # with no record is "another tool's" to the daemon for good.
    previous = _claim_record(records, args.busid, intent)
    try:
        device = export(stub, args.busid, endpoint, _timeouts(args), adopt_bound=args.force)
    except BaseException:
        _restore_record(records, args.busid, previous)
        raise
    try:
        records.put(
            args.busid,
            {
                **intent,
                "state": "exported",
                "since": time.time(),
                "vid_pid": device.vid_pid,
                "devid": device.devid,
            },
        )
    except BaseException as exc:
        _roll_back(stub, args, endpoint, device.devid)
        _restore_record(records, args.busid, previous)
        if isinstance(exc, StateError):
            raise StateError(f"{exc}; the export of {args.busid} is rolled back") from None
        raise
    print(f"exported {args.busid} ({device.vid_pid}) to {endpoint}")
    return 0


def _claim_record(records: RecordDir, busid: str, intent: dict[str, Any]) -> dict[str, Any] | None:
    """Write `connect`'s record of `busid` before touching the device; return the
    record it replaced (to put back if the export does not happen).

    Refused while the daemon that manages the device, or another `connect`
    exporting it, is alive. A record whose writer is gone is replaced: if it
    still describes a live export, export()'s own checks refuse the device.
    """
    try:
        records.claim(busid, intent)
        return None
    except RecordTaken as taken:
        previous = taken.existing
    except StateError as exc:
        raise StateError(f"{exc}; {busid} is not exported ({_UNRECORDED})") from None
    if previous is not None and writer_alive(previous):
        pid = previous.get("pid")
        if previous.get("by") == "daemon":
            raise KernelError(
                f"{busid} is managed by the usbip-hotplug daemon (pid {pid}): change its "
                "policy, or stop it, to export the device by hand"
            )
        if previous.get("state") == "exporting":
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


def _restore_record(records: RecordDir, busid: str, previous: dict[str, Any] | None) -> None:
    try:
        if previous is None:
            records.remove(busid)
        else:
            records.put(busid, previous)
    except StateError as exc:
        print(f"usbip-hotplug: warning: {exc}", file=sys.stderr)


def _roll_back(
    stub: UsbipHost, args: argparse.Namespace, endpoint: Endpoint | Remote, devid: int
) -> None:
    """Withdraw an export that succeeded but could not be recorded."""
    with contextlib.suppress(ExportError, KernelError):
        unexport(stub, args.busid, endpoint, _timeouts(args), devid=devid)


def cmd_disconnect(args: argparse.Namespace) -> int:
    _require_busid(args)
    records = exports_dir()
    record = records.get(args.busid)
    remote = args.remote or (record or {}).get("target")
    if not remote:
        raise UsageError(f"no record of where {args.busid} was exported: give -r HOST[:PORT]")
    endpoint = _remote(args, remote, record)
    if args.device:
        status = unexport_gadget(Vudc(), args.busid, endpoint, _timeouts(args))
        print(f"unexported {args.busid} from {endpoint}")
        return 0
    try:
        status = unexport(
            make_stub(), args.busid, endpoint, _timeouts(args), devid=record_devid(record)
        )
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
            exported_to = (record or {}).get("target", "another usbip peer")
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
    from hotplug.tlsconfig import CertError, check_pair, fingerprint

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


def add_common_net(parser: argparse.ArgumentParser, remote_required: bool) -> None:
    parser.add_argument(
        "-r",
        "--remote",
        required=remote_required,
        metavar="REMOTE",
        help="application-side daemon (usbipa): HOST[:PORT] (plain TCP, port 3240), "
        "tls://HOST[:PORT] (TLS, port 3240) or wss://HOST[:PORT]/PATH (WebSocket over TLS, "
        "port 443); IPv6 as [addr]:port",
    )
    tls = parser.add_argument_group("tls:// and wss:// remotes")
    tls.add_argument("--cert", metavar="FILE", help="our client certificate (PEM)")
    tls.add_argument("--key", metavar="FILE", help="its private key (PEM, unencrypted)")
    tls.add_argument(
        "--ca", metavar="FILE", help="CA that issued usbipa's certificate (default: system CAs)"
    )
    tls.add_argument(
        "--proxy",
        metavar="http://HOST:PORT",
        help="tunnel through this HTTP CONNECT proxy (default: $https_proxy, minus $no_proxy)",
    )
    parser.add_argument(
        "-b",
        "--busid",
        type=busid_arg,
        help="the device's busid, e.g. 1-1.2 (with --device: usbip-vudc.N)",
    )
    parser.add_argument(
        "--device",
        action="store_true",
        help="vUDC mode: export the USB gadget bound to a usbip-vudc UDC",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="connect and handshake timeout (default 5)",
    )


def busid_arg(text: str) -> str:
    """-b's value: a busid or a vUDC name, checked before it names a file anywhere."""
    if BUSID_RE.match(text) or VUDC_RE.match(text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a USB busid (e.g. 1-1 or 3-2.4) or a vUDC (usbip-vudc.N)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usbip-hotplug",
        description="Export USB devices over USB/IP to an application-side daemon (usbipa), "
        "by hand or automatically as they are plugged in.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("connect", help="export one device to usbipa (bind + OP_EXPORT)")
    add_common_net(p, remote_required=True)
    p.add_argument(
        "--force",
        action="store_true",
        help="take over a device that another tool already bound to usbip-host",
    )
    p.set_defaults(handler=cmd_connect)

    p = sub.add_parser("disconnect", help="withdraw an exported device (OP_UNEXPORT + release)")
    add_common_net(p, remote_required=False)
    p.set_defaults(handler=cmd_disconnect)

    p = sub.add_parser("list", help="list exportable local devices")
    p.add_argument("-l", "--local", action="store_true", help="local devices (the default)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--device", action="store_true", help="list usbip-vudc UDCs (vUDC mode)")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser(
        "cert-fingerprint",
        help="print a certificate's SHA-256 fingerprint (with --key: names, dates, checks)",
    )
    p.add_argument("cert", metavar="CERT", help="certificate file (PEM)")
    p.add_argument("--key", metavar="FILE", help="its key: also check the pair and show names")
    p.set_defaults(handler=cmd_cert_fingerprint)

    for name, (help_text, configure) in _EXTRA_COMMANDS.items():
        # Without help= argparse does not list the command (SUPPRESS would show as text).
        hidden = help_text == argparse.SUPPRESS
        p = sub.add_parser(name) if hidden else sub.add_parser(name, help=help_text)
        configure(p)
    return parser


# Commands defined in other modules register here, keeping this file the only parser.
_EXTRA_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def register(
    name: str, help_text: str
) -> Callable[
    [Callable[[argparse.ArgumentParser], None]], Callable[[argparse.ArgumentParser], None]
]:
    def wrap(
        configure: Callable[[argparse.ArgumentParser], None],
    ) -> Callable[[argparse.ArgumentParser], None]:
        _EXTRA_COMMANDS[name] = (help_text, configure)
        return configure

    return wrap


def _load_extras() -> None:
    # Imported for their register() side effect; each defines one command.
    import importlib

    for module in ("hotplug.daemon_cli", "hotplug.completion", "hotplug.testvm.demo"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not (exc.name and module.startswith(exc.name)):
                raise


def main(argv: Sequence[str] | None = None) -> int:
    _load_extras()
    args = build_parser().parse_args(argv)
    log.setup("usbip-hotplug", verbose=args.verbose)
    handler: Handler = args.handler
    try:
        if args.command in INTERRUPTIBLE:
            interrupt_on_signals()
        return handler(args)
    except (UsageError, ExportError, KernelError, StateError) as exc:
        print(f"usbip-hotplug: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"usbip-hotplug: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Under `python -m hotplug.cli` this file is __main__, but the commands of
    # other modules register with the imported hotplug.cli: run that one.
    from hotplug import cli

    sys.exit(cli.main())
