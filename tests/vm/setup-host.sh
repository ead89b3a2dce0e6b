#!/usr/bin/env bash
# Prepare a Debian 12 host (run as root) for the real-kernel VM tests.
# Idempotent: a second run installs nothing and downloads nothing.
#
#   tests/vm/setup-host.sh            # apt packages, virtme-ng if missing, kernel
#   PYTHON=/path/to/python tests/vm/setup-host.sh
#
# What it does:
#  1. apt-get install the Debian packages the VM needs (only if one is missing;
#     runs `apt-get update` first when the package lists are empty or older
#     than a day).
#  2. pip install the project's `vm` extra (virtme-ng) into $PYTHON if
#     `virtme-run` is not there yet.
#  3. Download Debian's kernel image package, unpack it and run depmod into
#     ${USBIP_HOTPLUG_CACHE:-${XDG_CACHE_HOME:-~/.cache}/usbip-hotplug}/kernel-<release>
#     (python -m hotplug.testing.vm --prepare), then check every host tool.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"

# qemu-system-x86  QEMU (the guest runs under it, KVM or emulation)
# busybox-static   virtme-ng's initramfs needs a static busybox; its ping is the
#                  guest's (the USB network test)
# file             virtme-ng reads the kernel version with it
# kmod             depmod (host) and modprobe (guest)
# udev             systemd-udevd in the guest (events, /dev/disk/by-id)
# usbip            usbip + usbipd for the classic interop tests
# mount            mount in the guest (9p, configfs)
# apt, dpkg        apt-get download + dpkg-deb -x of the kernel package
# systemd          PID 1 of a namespace in the guest, to run our units as shipped
# python3          Debian's interpreter, which those units run the programs with
# util-linux       unshare and nsenter for that namespace
# iproute2         ip netns / ip link (USB network test), ss -K (fault matrix)
# alsa-utils       aplay in the guest, playing through QEMU's usb-audio behind vhci
PACKAGES=(qemu-system-x86 busybox-static file kmod udev usbip mount apt dpkg systemd python3 util-linux
          iproute2 alsa-utils)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host.sh: run me as root (apt-get install)" >&2
    exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

lists_fresh() {
    # true if apt has package lists younger than a day
    [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit 2>/dev/null)" ]
}

if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup-host.sh: installing ${missing[*]}"
    lists_fresh || apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "setup-host.sh: Debian packages already installed"
fi

if ! command -v virtme-run >/dev/null 2>&1 && \
   [ ! -x "$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")/virtme-run" ]; then
    echo "setup-host.sh: installing virtme-ng ($ROOT[vm]) into $PY"
    PIP_CONSTRAINT="$ROOT/constraints.txt" "$PY" -m pip install -c "$ROOT/constraints.txt" -e "$ROOT[vm]"
fi

# The kernel: cached after the first run. A fresh cache needs apt's lists
# to name the current linux-image-amd64 dependency.
if ! PYTHONPATH="$ROOT" "$PY" -c 'import sys
from hotplug.testing.vm.kernels import cached_kernels
sys.exit(0 if cached_kernels() else 1)'; then
    lists_fresh || apt-get update
fi
PYTHONPATH="$ROOT" "$PY" -m hotplug.testing.vm --prepare
