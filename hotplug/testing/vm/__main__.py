"""`python -m hotplug.testing.vm --prepare | --check | --run CMD`: the test VM by hand."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from hotplug.testing.vm.guest import GuestVM
from hotplug.testing.vm.kernels import (
    MissingDependency,
    VMError,
    cache_dir,
    check_host,
    ensure_kernel,
    kvm_setting,
)

# ---------------------------------------------------------------------------
# command line


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hotplug.testing.vm",
        description="Prepare and run the usbip-hotplug test VM (QEMU + Debian kernel).",
    )
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--prepare", action="store_true", help="fetch the kernel into the cache, check host tools"
    )
    mode.add_argument("--check", action="store_true", help="only check the host tools")
    mode.add_argument("--run", nargs=argparse.REMAINDER, help="boot, run a shell command, stop")
    ap.add_argument(
        "--update", action="store_true", help="with --prepare: ask apt for a newer kernel"
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="with --run: command timeout")
    args = ap.parse_args(argv)

    try:
        if args.prepare:
            t0 = time.monotonic()
            k = ensure_kernel(update=args.update)
            print(f"kernel {k.release}: {k.image} ({time.monotonic() - t0:.1f}s)")
            check_host()
            print(f"host tools: ok; KVM setting: {kvm_setting()}; cache: {cache_dir()}")
            return 0
        if args.check:
            check_host()
            print("host tools: ok")
            return 0
        command = " ".join(args.run or []).strip() or "uname -a"
        with GuestVM() as vm:
            result = vm.run(command, timeout=args.timeout)
        return result.returncode if not result.timed_out else 124
    except MissingDependency as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except VMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main())
