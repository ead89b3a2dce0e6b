"""usbipa, the application-side program: it accepts devices exported to it and
attaches them to vhci_hcd.

cli.py (the command line: run, status), server.py (the daemon: listeners, one
control phase per connection, attach and detach), sessions.py (the ports it
attached, mirrored to /run), config.py (usbipa.yaml and the access decision),
link.py (one connection, plain or TLS/WebSocket), metrics.py (Prometheus).
It builds on hotplug.wire, hotplug.kernel (vhci) and the shared modules, and
never imports the device side (hotplug.device).
"""
