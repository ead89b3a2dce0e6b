"""device/status.py: the daemon's reply rendered as `usbip-hotplug status` shows it."""

from __future__ import annotations

from hotplug.device.status import render_status


def test_render_status() -> None:
    reply = {
        "daemon": {"pid": 42, "status": "1 exported, 1 retrying (lab: refused)", "policy": ["p"]},
        "devices": [
            {
                "busid": "1-1",
                "vid_pid": "1d6b:0104",
                "vendor": "Linux Foundation",
                "product": "Gadget",
                "state": "exported",
                "target": "lab",
                "address": "10.0.0.1:3240",
                "since": 0.0,
                "rule": "gadgets",
                "last_error": None,
                "next_retry": None,
            },
            {
                "busid": "1-2",
                "vid_pid": "046d:c52b",
                "vendor": None,
                "product": None,
                "state": "retrying",
                "target": "lab",
                "address": "10.0.0.1:3240",
                "since": None,
                "rule": "gadgets",
                "last_error": "10.0.0.1:3240: Connection refused",
                "next_retry": 1e12,
            },
        ],
    }
    reply["usbip_host"] = {
        "slots": 16,
        "used": 14,
        "leaked": 2,
        "leaked_busids": ["3-1", "3-2"],
        "free": 2,
        "warning": "only 2 of usbip-host's 16 busid slots left",
    }
    text = render_status(reply)
    assert "usbip-host: 14 of 16 busid slots used, 2 leaked (3-1 3-2)" in text
    assert "warning: only 2 of usbip-host's 16 busid slots left" in text
    assert "1 exported, 1 retrying" in text and "pid 42" in text
    assert "1-1      1d6b:0104  exported    lab 10.0.0.1:3240" in text
    assert "last error: 10.0.0.1:3240: Connection refused; next retry in" in text
