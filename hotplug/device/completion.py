"""`usbip-hotplug _complete WHAT`: the words the shell completion scripts offer.

The scripts in completion/ ask the program itself, so that what they offer is
what the program would accept: the busids of the devices plugged in now, and
the addresses of the targets in the installed policy. Nothing is printed for
what cannot be read (no sysfs, no policy, a policy with errors): a completion
must never print an error into the user's command line.
"""

from __future__ import annotations

import argparse

from hotplug.device.policy.files import load_policy
from hotplug.device.policy.model import PolicyError
from hotplug.kernel import make_stub
from hotplug.kernel.sysfs import list_devices


def busids() -> list[str]:
    try:
        devices = list_devices(make_stub().paths)
    except OSError:
        return []
    return [d.busid for d in devices if not d.is_hub]


def remotes(config: str | None) -> list[str]:
    try:
        policy = load_policy(config)
    except (PolicyError, OSError):
        return []
    return sorted({t.address for t in policy.targets.values()})


def cmd_complete(args: argparse.Namespace) -> int:
    words = busids() if args.what == "busids" else remotes(args.config)
    if words:
        print("\n".join(words))
    return 0
