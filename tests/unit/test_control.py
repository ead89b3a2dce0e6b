"""device/control.py: the daemon's control socket, its server and its client (a
daemon that does not answer is an error a user can read, not a traceback)."""

from __future__ import annotations

import asyncio
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from hotplug.device.control import AlreadyRunning, ControlError, bind_control_socket, request, serve


def test_a_daemon_that_does_not_answer_is_a_clear_error(tmp_path: Path) -> None:
    """Seen while testing issue 12, finding 12: `status` against a daemon stuck in
    a policy parse ended in a TimeoutError traceback."""
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(1)  # accepted by the kernel, never read: no reply will come
        with pytest.raises(ControlError, match=r"did not answer on .* within 0\.2 s"):
            request(path, {"command": "status"}, timeout=0.2)


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
