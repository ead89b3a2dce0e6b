"""What both programs speak on the network: the USB/IP codec, addresses, sockets,
TLS and WebSocket channels, and the relay between a channel and the kernel.

Nothing here imports a policy, the kernel edges or either program: the
device side (hotplug.device) and the application side (hotplug.app) both
build on it. tests/unit/test_import_boundaries.py keeps it so.
"""
