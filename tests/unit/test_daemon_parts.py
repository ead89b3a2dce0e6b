"""The daemon's small parts: policy file watching, the control socket, cancelling a handshake."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from hotplug.device.control import AlreadyRunning, ControlError, bind_control_socket, request, serve
from hotplug.device.export import ExportError
from hotplug.device.operations import Canceller
from hotplug.device.policy.watch import PolicyWatcher, policy_files
from hotplug.device.reconcile import Slot, Wanted
from hotplug.device.report import display_state
from hotplug.device.status import render_status


def test_watcher_sees_edits_replacements_and_dropins(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("version: 1\n")
    watcher = PolicyWatcher(tmp_path)
    assert not watcher.changed()
    (tmp_path / "policy.yaml").write_text("version: 1\nrules: []\n")  # in place
    assert watcher.changed() and not watcher.changed()  # once per change
    dropins = tmp_path / "policy.d"
    dropins.mkdir()
    assert watcher.changed()
    (dropins / "10-lab.yaml").write_text("version: 1\n")
    assert watcher.changed()
    tmp = tmp_path / ".policy.yaml.new"
    tmp.write_text("version: 1\nrules: []\n")  # same size: only the inode tells
    os.replace(tmp, tmp_path / "policy.yaml")
    assert watcher.changed()
    (dropins / "10-lab.yaml").unlink()
    assert watcher.changed()


def test_watcher_on_a_single_file(tmp_path: Path) -> None:
    path = tmp_path / "my.yaml"
    assert policy_files(path) == [path]
    watcher = PolicyWatcher(path)
    path.write_text("version: 1\n")  # appears
    assert watcher.changed()
    watcher.mark()
    assert not watcher.changed()


def _serve_in_thread(
    path: Path, handler: Any
) -> tuple[threading.Thread, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(serve(bind_control_socket(path), handler))
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    return thread, loop


def test_control_socket_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state" / "control.sock"

    def handler(message: dict[str, Any]) -> dict[str, Any]:
        if message.get("command") == "boom":
            raise ControlError("no such thing")
        return {"echo": message}

    thread, loop = _serve_in_thread(path, handler)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        reply = request(path, {"command": "status"})
        assert reply == {"ok": True, "echo": {"command": "status"}}
        with pytest.raises(ControlError, match="no such thing"):
            request(path, {"command": "boom"})
        with socket.socket(socket.AF_UNIX) as raw:  # garbage gets an error, not a crash
            raw.connect(str(path))
            raw.sendall(b"[1, 2\n")
            assert b'"ok": false' in raw.recv(4096)
        with pytest.raises(AlreadyRunning):
            bind_control_socket(path)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_stale_control_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a killed daemon leaves the file, with nobody listening
    sock = bind_control_socket(path)
    sock.close()


def test_request_without_daemon(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="not running"):
        request(tmp_path / "control.sock", {"command": "status"})


def test_canceller_wakes_a_blocked_handshake() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    client.settimeout(10)
    canceller = Canceller()
    canceller.watch(client)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(client.recv(8)))
    reader.start()
    canceller.fire()
    reader.join(5)
    assert got == [b""]  # woken with EOF long before the 10 s timeout
    client.close()
    canceller.fire()  # after the export closed its socket: harmless
    listener.close()


def test_canceller_fired_before_connect() -> None:
    canceller = Canceller()
    canceller.fire()
    with socket.socket() as sock, pytest.raises(ExportError):
        canceller.watch(sock)


def test_display_state() -> None:
    export = Wanted("export", "r", "why", ())
    assert display_state(Slot(phase="backoff"), export) == "retrying"
    assert display_state(Slot(phase="exported"), export) == "exported"
    assert display_state(Slot(), None) == "unplugged"
    assert display_state(Slot(), Wanted("ignore", "r", "why")) == "ignored"
    assert display_state(Slot(), Wanted("none", None, "no rule matched")) == "not matched"


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
