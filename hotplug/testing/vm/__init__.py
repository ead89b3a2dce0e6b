"""The real-kernel test VM: Debian's stock kernel in QEMU (virtme-ng).

kernels.py (host tools, the kernel cache, KVM or emulation), guest.py
(`GuestVM`: boot, run commands, read and write files), agent.py (the guest's
boot command: the other end of guest.py), gadget.py (inside the guest: USB
devices made with dummy_hcd and configfs gadgets), qmp.py (QEMU's QMP: the
host's client, and the channel in-guest tests use it through), qemu_usb.py
(QEMU's xhci controller at boot; its USB device models hot-plugged from inside
the guest), demo.py (`usbip-hotplug demo`), __main__.py (`python -m
hotplug.testing.vm --prepare`).

Nothing here is imported by the product's normal code paths, and this file
imports nothing: the agent starts with `python -S` and must stay light.
"""
