"""`usbip-hotplug`: the device side's command line, its one parser.

Every subcommand's options are defined here; its handler is named as
"module:function" (a module of hotplug.device unless dotted) and imported
only when that subcommand runs, so `status` or a tab completion does not load
the daemon, and no command module needs this one (no registry, no cycle).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Callable, Sequence

from hotplug import __version__, log
from hotplug.device.policy import DEFAULT_CONFIG_DIR
from hotplug.errors import HotplugError
from hotplug.kernel.sysfs import BUSID_RE
from hotplug.kernel.vudc import VUDC_RE
from hotplug.metrics import listen_arg

Handler = Callable[[argparse.Namespace], int]


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
    p.set_defaults(handler="daemon_cli:cmd_run")


def _configure_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", metavar="PATH", help="same as -c PATH")
    _policy_arg(p)
    p.add_argument(
        "-q", "--quiet", action="store_true", help="only validate (for ExecReload): no device list"
    )
    p.set_defaults(handler="daemon_cli:cmd_check")


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
    p.set_defaults(handler="oneshot:cmd_connect")

    p = sub.add_parser("disconnect", help="withdraw an exported device (OP_UNEXPORT + release)")
    add_common_net(p, remote_required=False)
    p.set_defaults(handler="oneshot:cmd_disconnect")

    p = sub.add_parser("list", help="list exportable local devices")
    p.add_argument("-l", "--local", action="store_true", help="local devices (the default)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--device", action="store_true", help="list usbip-vudc UDCs (vUDC mode)")
    p.set_defaults(handler="oneshot:cmd_list")

    p = sub.add_parser(
        "cert-fingerprint",
        help="print a certificate's SHA-256 fingerprint (with --key: names, dates, checks)",
    )
    p.add_argument("cert", metavar="CERT", help="certificate file (PEM)")
    p.add_argument("--key", metavar="FILE", help="its key: also check the pair and show names")
    p.set_defaults(handler="oneshot:cmd_cert_fingerprint")

    p = sub.add_parser(
        "run", help="run the hotplug daemon: export devices as the policy says, keep them exported"
    )
    _configure_run(p)
    p = sub.add_parser(
        "check", help="validate the policy; show what it would do with the devices plugged in now"
    )
    _configure_check(p)
    p = sub.add_parser("status", help="show what the running daemon does with each device")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler="status:cmd_status")
    p = sub.add_parser(
        "restore-autoprobe",
        help="after a daemon that held new devices back ended uncleanly: autoprobe back on,"
        " waiting devices to their drivers",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="say nothing if nothing was held")
    p.set_defaults(handler="claim:cmd_restore_autoprobe")
    # Without help= argparse does not list the command (SUPPRESS would show as text).
    p = sub.add_parser("_complete")
    p.add_argument("what", choices=["busids", "remotes"])
    p.add_argument("-c", "--config", metavar="PATH", help=argparse.SUPPRESS)
    p.set_defaults(handler="completion:cmd_complete")
    p = sub.add_parser(
        "demo", help="see it work: a VM with a virtual USB disk, exported and withdrawn"
    )
    p.add_argument("--keep", action="store_true", help="leave a shell into the VM open at the end")
    p.add_argument("--timeout", type=float, default=240, help="limit for the scenario (seconds)")
    # The one command of the product that lives with the test doubles: the demo
    # boots the test VM (hotplug/testing/vm), so it is loaded only when asked for.
    p.set_defaults(handler="hotplug.testing.vm.demo:cmd_demo")
    return parser


def handler_of(name: str) -> Handler:
    """ "module:function" -> the function; a bare module is one of hotplug.device."""
    module, _, function = name.partition(":")
    if "." not in module:
        module = f"hotplug.device.{module}"
    handler: Handler = getattr(importlib.import_module(module), function)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.setup("usbip-hotplug", verbose=args.verbose)
    handler = handler_of(args.handler)
    try:
        if args.command in INTERRUPTIBLE:
            interrupt_on_signals()
        return handler(args)
    except HotplugError as exc:  # every expected failure; anything else is a bug
        print(f"usbip-hotplug: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"usbip-hotplug: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
