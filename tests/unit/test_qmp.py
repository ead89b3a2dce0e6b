"""testing/vm/qmp.py: the host's QMP client against a fake QEMU on a unix socket,
and the channel in-guest tests use, end to end without a VM (a FIFO stands in
for the guest's kernel log, a thread for the console reader).

The fake behaves as QEMU's monitor does: a greeting, nothing but
`qmp_capabilities` until it is sent, every reply carrying the request's `id`,
asynchronous events between replies, `\\r\\n` line ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hotplug.testing.vm import qmp as qmp_module
from hotplug.testing.vm.qmp import REPLIES, REQUEST_MARK, QmpChannel, QmpClient, QmpError, qmp
from tests.helpers import wait_for


class Refused(Exception):
    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class, self.desc = error_class, desc


class FakeQemu:
    """A QMP monitor on a unix socket, one connection at a time, in a thread.

    `commands` maps a command to a function of its arguments (raise Refused to
    refuse it). Two commands misbehave on purpose: `x-close` drops the
    connection, `x-late` is answered only after the next command arrives."""

    def __init__(self, path: Path, commands: dict[str, Callable[[dict[str, Any]], Any]]) -> None:
        self.path = path
        self.commands = commands
        self.connections = 0
        self.received: list[dict[str, Any]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        def send(msg: dict[str, Any]) -> None:
            conn.sendall(json.dumps(msg).encode() + b"\r\n")

        send(
            {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}
        )
        negotiated = False
        late: object = None
        for raw in conn.makefile("rb"):
            msg = json.loads(raw)
            self.received.append(msg)
            command, rid = msg.get("execute"), msg.get("id")
            if late is not None:
                send({"return": "late", "id": late})
                late = None
            if command == "x-close":
                return
            if command == "x-late":
                late = rid
                continue
            if not negotiated and command != "qmp_capabilities":
                send(
                    {
                        "error": {
                            "class": "CommandNotFound",
                            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
                        },
                        "id": rid,
                    }
                )
                continue
            if command == "qmp_capabilities":
                negotiated = True
                send({"return": {}, "id": rid})
                continue
            handler = self.commands.get(str(command))
            if handler is None:
                error = {
                    "class": "CommandNotFound",
                    "desc": f"The command {command} has not been found",
                }
                send({"error": error, "id": rid})
                continue
            send({"event": "SOMETHING", "data": {"before": command}, "timestamp": {"seconds": 1}})
            try:
                result = handler(msg.get("arguments") or {})
            except Refused as e:
                send({"error": {"class": e.error_class, "desc": e.desc}, "id": rid})
            else:
                send({"return": result, "id": rid})

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


def _device_add(args: dict[str, Any]) -> dict[str, Any]:
    if args.get("driver") != "usb-kbd":
        raise Refused("GenericError", f"'{args.get('driver')}' is not a valid device model name")
    return {}


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[FakeQemu]:
    fake = FakeQemu(
        tmp_path / "qmp.sock",
        {
            "query-status": lambda _a: {"status": "running", "running": True},
            "device_add": _device_add,
        },
    )
    yield fake
    fake.close()


@pytest.fixture
def client(qemu: FakeQemu) -> Iterator[QmpClient]:
    c = QmpClient(qemu.path, timeout=5)
    yield c
    c.close()


def test_execute_returns_qemus_answer_after_negotiating(client: QmpClient, qemu: FakeQemu) -> None:
    assert client.execute("query-status") == {"status": "running", "running": True}
    assert [m["execute"] for m in qemu.received] == ["qmp_capabilities", "query-status"]
    assert qemu.received[1]["id"] != qemu.received[0]["id"]  # replies are matched by id
    assert client.greeting["QMP"]["version"]["qemu"]["major"] == 7
    # The event QEMU sent before its reply is kept, not taken for the reply.
    assert list(client.events) == [
        {"event": "SOMETHING", "data": {"before": "query-status"}, "timestamp": {"seconds": 1}}
    ]
    assert client.execute("device_add", {"driver": "usb-kbd", "id": "k"}) == {}
    assert qemu.received[-1]["arguments"] == {"driver": "usb-kbd", "id": "k"}
    assert qemu.connections == 1


def test_a_refusal_carries_qemus_class_and_text(client: QmpClient) -> None:
    with pytest.raises(QmpError, match="'usb-nothing' is not a valid device model") as refused:
        client.execute("device_add", {"driver": "usb-nothing"})
    assert refused.value.error_class == "GenericError"
    with pytest.raises(QmpError, match="has not been found") as unknown:
        client.execute("no-such-command")
    assert unknown.value.error_class == "CommandNotFound"
    assert client.execute("query-status")["running"] is True  # the connection is still good


def test_a_closed_connection_is_an_error_and_the_next_command_reconnects(
    client: QmpClient, qemu: FakeQemu
) -> None:
    with pytest.raises(QmpError, match="closed the QMP socket"):
        client.execute("x-close")
    assert client.execute("query-status")["running"] is True
    assert qemu.connections == 2


def test_no_answer_is_an_error_within_the_timeout(client: QmpClient, qemu: FakeQemu) -> None:
    with pytest.raises(QmpError, match=r"no answer on QMP socket .* in time"):
        client.execute("x-late", timeout=0.3)
    # Its answer comes before the next command's: told apart by the id.
    assert client.execute("query-status")["running"] is True
    assert qemu.connections == 1


def test_no_qemu_names_the_socket(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match=r"cannot connect to QEMU's QMP socket .*nothing\.sock"):
        QmpClient(tmp_path / "nothing.sock", timeout=1).execute("query-status")


# --------------------------------------------------------------------------- the channel


@pytest.fixture
def channel(client: QmpClient, tmp_path: Path) -> Iterator[QmpChannel]:
    said: list[str] = []
    ch = QmpChannel(client, tmp_path / "exchange" / REPLIES, log=said.append)
    ch.said = said  # type: ignore[attr-defined]
    yield ch
    ch.close()


def _reply(channel: QmpChannel, rid: str) -> dict[str, Any]:
    path = channel.replies / f"{rid}.json"
    wait_for(path.exists, timeout=10, what=f"reply {rid}")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_channel_answers_a_console_line_with_a_reply_file(channel: QmpChannel) -> None:
    request = {"id": "12-1-ab", "execute": "query-status"}
    channel.feed(f"[   22.51] {REQUEST_MARK} {json.dumps(request)}")
    assert _reply(channel, "12-1-ab") == {"return": {"status": "running", "running": True}}
    channel.feed(
        f"[   22.60] {REQUEST_MARK} "
        + json.dumps({"id": "12-2-ab", "execute": "device_add", "arguments": {"driver": "x"}})
    )
    refused = _reply(channel, "12-2-ab")
    assert refused["error"]["class"] == "GenericError" and "'x'" in refused["error"]["desc"]
    # Written by rename: no half-written file is ever under the reply's name.
    assert sorted(p.name for p in channel.replies.iterdir()) == ["12-1-ab.json", "12-2-ab.json"]


def test_channel_ignores_other_lines_and_says_why_it_drops_a_request(channel: QmpChannel) -> None:
    channel.feed("[   22.51] usb 1-1: new SuperSpeed USB device number 2 using xhci_hcd")
    channel.feed(f"{REQUEST_MARK} {{not json")
    channel.feed(f"{REQUEST_MARK} " + json.dumps({"id": "../../etc/x", "execute": "query-status"}))
    channel.feed(f"{REQUEST_MARK} " + json.dumps({"id": "ok-1"}))  # no command: answered
    assert _reply(channel, "ok-1")["error"]["desc"] == "the request names no command ('execute')"
    assert list(channel.replies.iterdir()) == [channel.replies / "ok-1.json"]
    said = channel.said  # type: ignore[attr-defined]
    assert len(said) == 2 and all("malformed QMP request" in s for s in said), said


@pytest.fixture
def console(tmp_path: Path, channel: QmpChannel) -> Iterator[Path]:
    """A FIFO for the guest's /dev/kmsg, read line by line into the channel: the
    console as GuestVM reads it."""
    fifo = tmp_path / "kmsg"
    os.mkfifo(fifo)

    def read() -> None:
        with open(fifo) as f:  # reopened for each writer (qmp() opens it per request)
            for line in f:
                channel.feed(line.rstrip("\n"))

    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            read()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield fifo
    stop.set()
    with contextlib.suppress(OSError), open(fifo, "w"):
        pass  # lets the reader return
    thread.join(5)


def test_guest_side_round_trip_through_the_log_and_the_exchange_directory(
    console: Path, channel: QmpChannel
) -> None:
    exchange = channel.replies.parent
    assert qmp("query-status", exchange=exchange, kmsg=console) == {
        "status": "running",
        "running": True,
    }
    with pytest.raises(QmpError, match="not a valid device model") as refused:
        qmp("device_add", {"driver": "usb-nothing"}, exchange=exchange, kmsg=console)
    assert refused.value.error_class == "GenericError"
    assert len(list(channel.replies.glob("*.json"))) == 2


def test_guest_side_gives_up_when_nobody_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qmp_module, "REPLY_MARGIN", 0.1)
    (tmp_path / REPLIES).mkdir()
    kmsg = tmp_path / "kmsg.txt"
    with pytest.raises(QmpError, match=r"no reply from the host within 0\.3s"):
        qmp("query-status", exchange=tmp_path, kmsg=kmsg, timeout=0.2)
    line = kmsg.read_text()
    assert line.startswith(f"<5>{REQUEST_MARK} ") and line.endswith("\n")
    assert json.loads(line.partition(REQUEST_MARK)[2])["execute"] == "query-status"


def test_guest_side_outside_the_vm_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match="not inside the test VM"):
        qmp("query-status", exchange=tmp_path / "none")


def test_guest_side_refuses_a_request_too_long_for_the_log(tmp_path: Path) -> None:
    (tmp_path / REPLIES).mkdir()
    with pytest.raises(QmpError, match="too long for one kernel log record"):
        qmp("device_add", {"driver": "x" * 2000}, exchange=tmp_path, kmsg=tmp_path / "k")
