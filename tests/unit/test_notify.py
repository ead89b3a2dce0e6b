import socket
from pathlib import Path

import pytest

from hotplug.notify import Notifier


@pytest.mark.timeout(10)
def test_full_notify_queue_never_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))  # never read: the queue fills up
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = Notifier()
    for i in range(1000):
        notifier.status(f"{i} exported")
        notifier.watchdog()
    assert listener.recv(100).startswith(b"STATUS=0 exported")
    listener.close()


def test_disabled_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    notifier.ready("x")
    assert not notifier.enabled
