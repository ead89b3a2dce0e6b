"""usbip-hotplug: export USB devices over USB/IP by connecting out, and keep them exported."""

__version__ = "0.1.0"
