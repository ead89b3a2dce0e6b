"""Test doubles shipped on purpose, and the real-kernel test VM.

- `fake_kernel`: a sysfs tree and a process that plays the kernel behind it.
- `fifo_events`: device events as JSON lines on a FIFO, in place of udev.
- `vm/`: a QEMU guest with Debian's kernel, the agent that runs in it, USB
  gadgets made with dummy_hcd, and `usbip-hotplug demo`.

The product reaches in here at three documented seams only, each chosen by
the caller and never by default: `hotplug.kernel.make_stub`/`make_vhci`
(USBIP_HOTPLUG_FAKE_KERNEL set), `usbip-hotplug run --events FIFO` (hidden)
and `usbip-hotplug demo`. tests/unit/test_import_boundaries.py keeps it so.
"""
