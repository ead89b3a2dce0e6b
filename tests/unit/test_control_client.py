"""The control socket's client side: a daemon that does not answer is an error
a user can read, not a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hotplug.device.control import ControlError, request


def test_a_daemon_that_does_not_answer_is_a_clear_error(tmp_path: Path) -> None:
    """Seen while testing issue 12, finding 12: `status` against a daemon stuck in
    a policy parse ended in a TimeoutError traceback."""
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(1)  # accepted by the kernel, never read: no reply will come
        with pytest.raises(ControlError, match=r"did not answer on .* within 0\.2 s"):
            request(path, {"command": "status"}, timeout=0.2)
