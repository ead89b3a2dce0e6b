"""usbip-hotplug, the device-side program: it exports USB devices to usbipa, by
hand (`connect`) or as a policy says (`run`, the daemon).

cli.py is the one parser; each subcommand's handler lives in its own module
(oneshot.py, daemon_cli.py, status.py, completion.py). The daemon (daemon.py)
drives the pure core (policy/, reconcile.py) from the edges (udev.py,
events.py, control.py, records.py) and runs export.py's transactions, whose
network half is transport.py (plain TCP here, TLS and WebSocket in the relay
process, tunnel.py). It builds on hotplug.wire, hotplug.kernel and the shared
modules, and never imports the application side (hotplug.app).
"""
