"""`usbipa`: the application-side daemon's command line (run it, or ask its status)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from hotplug import log, usbids, yamlnodes
from hotplug.app.config import AppdConfig, ConfigError, parse_config, with_cli
from hotplug.app.server import Appd
from hotplug.app.sessions import Session, Sessions
from hotplug.errors import HotplugError
from hotplug.kernel import make_vhci
from hotplug.metrics import listen_arg
from hotplug.notify import Notifier
from hotplug.printable import printable
from hotplug.state import default_dir

DEFAULT_CONFIG = "/etc/usbip-hotplug/usbipa.yaml"


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usbipa",
        description="Application-side USB/IP daemon: accepts devices exported to it "
        "(OP_EXPORT) and attaches them to vhci_hcd. Default deny: give --allow or a config.",
        epilog="'usbipa status [--json]' shows the attached devices.",
    )
    parser.add_argument("-c", "--config", help=f"YAML config (default {DEFAULT_CONFIG} if present)")
    parser.add_argument("-t", "--tcp-port", type=int, help="TCP port to listen on (default 3240)")
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="address to listen on, repeatable (default 0.0.0.0 and ::)",
    )
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="allow exports from this address or network, repeatable",
    )
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="VID:PID",
        help="limit the --allow peers to these devices (globs allowed), repeatable",
    )
    parser.add_argument("--state-dir", help="where sessions are recorded (default /run/usbipa)")
    parser.add_argument(
        "--metrics-listen",
        type=listen_arg,
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics, e.g. 127.0.0.1:9101 or "
        "[::1]:9101 (default: metrics.listen in the config; off without either). "
        "No authentication: keep it on loopback or behind a firewall",
    )
    tls = parser.add_argument_group(
        "TLS (then -t/--tcp-port speaks TLS only) and WebSocket listeners"
    )
    tls.add_argument("--tls-cert", metavar="FILE", help="our certificate (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="its private key (PEM, unencrypted)")
    tls.add_argument(
        "--tls-client-ca", metavar="FILE", help="CA whose certificates clients must show"
    )
    tls.add_argument(
        "--allow-client",
        action="append",
        default=[],
        metavar="SUBJECT",
        help="allow exports from clients whose certificate subject matches, e.g. "
        "'CN=lab-1' (globs in values), from any address; repeatable",
    )
    tls.add_argument(
        "--wss-port", type=int, metavar="PORT", help="also accept wss:// on this port (443)"
    )
    tls.add_argument("--wss-path", metavar="PATH", help="URL path of the wss listener (default /)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usbipa status", description="Show attached devices.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--state-dir", help="where sessions are recorded (default /run/usbipa)")
    return parser


def load_config(args: argparse.Namespace) -> AppdConfig:
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    config = AppdConfig()
    if path:
        try:
            with open(path, "rb") as f:
                data = yamlnodes.read_limited(f)  # parse_config refuses a larger file
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        if len(data) > yamlnodes.MAX_FILE_BYTES:
            raise ConfigError(f"{path}: {yamlnodes.TOO_LARGE}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise ConfigError(f"{path}:{line}: not valid UTF-8") from exc
        config = parse_config(text, path)
    config = with_cli(
        config,
        args.listen,
        args.tcp_port,
        args.allow,
        args.device,
        allow_clients=args.allow_client,
        tls=(args.tls_cert, args.tls_key, args.tls_client_ca),
        wss_port=args.wss_port,
        wss_path=args.wss_path,
        metrics_listen=args.metrics_listen,
    )
    if args.state_dir:
        config = dataclasses.replace(config, state_dir=args.state_dir)
    return config


async def _run(appd: Appd) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, appd.stop)
    await appd.serve()


def run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    log.setup("usbipa", verbose=args.verbose)
    try:
        config = load_config(args)
        appd = Appd(config, make_vhci(), Notifier())
        appd.vhci.require_loaded()
        appd.open_listeners()
        appd.metrics.serve(config.metrics_listen)
        try:
            asyncio.run(_run(appd))
        finally:
            appd.metrics.stop()
    except HotplugError as exc:  # every expected failure; anything else is a bug
        print(f"usbipa: {exc}", file=sys.stderr)
        return 1
    return 0


def session_rows(state_dir: Path) -> list[dict[str, object]]:
    vhci = make_vhci()
    sessions = Sessions(vhci, state_dir)
    live = {p.port: p for p in vhci.ports()}
    rows = []
    for _, data in sessions.records.items():
        try:
            session = Session(**data)
        except TypeError:
            continue
        port = live.get(session.port)
        alive = port is not None and port.holds(session.devid)
        rows.append(
            {
                "port": session.port,
                "peer": session.peer,
                "client": session.client,  # TLS client certificate subject, if any
                "busid": session.busid,
                "vid_pid": f"{session.vendor:04x}:{session.product:04x}",
                "names": usbids.names(session.vendor, session.product, None, None),
                "local_busid": port.local_busid if port is not None else None,
                "since": session.since,
                "state": "attached" if alive else "gone",
            }
        )
    return rows


def status(argv: list[str]) -> int:
    args = status_parser().parse_args(argv)
    state_dir = Path(args.state_dir) if args.state_dir else default_dir("app")
    try:
        rows = session_rows(state_dir)
    except HotplugError as exc:
        print(f"usbipa: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no devices attached")
        return 0
    print(f"{'PORT':>4}  {'PEER':<24} {'BUSID':<10} {'VID:PID':<9}  {'SINCE':<19}  DEVICE")
    for row in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(str(row["since"]))))
        state = "" if row["state"] == "attached" else "  (gone)"
        line = (
            f"{row['port']:>4}  {row['peer']!s:<24} {row['busid']!s:<10} {row['vid_pid']!s:<9}  "
            f"{since:<19}  {row['names']}{state}"
        )
        print(printable(line))  # the names are the device side's word
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return status(argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
