"""A real-kernel test VM for usbip-hotplug.

`hotplug.testvm.vm` boots Debian's stock kernel in QEMU (virtme-ng) and runs
commands in it (`GuestVM`); `hotplug.testvm.gadget` runs inside that guest and
makes real USB devices with dummy_hcd and configfs gadgets.

Nothing here is imported by the product's normal code paths; import the
submodules explicitly.
"""
