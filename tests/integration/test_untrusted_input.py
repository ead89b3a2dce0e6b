"""Issue 12, findings 12, 13 and 15: what the programs do with input nobody vetted
(policy files, USB strings, busids on the command line, event storms), run for
real against the fake kernel."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import ssl
import struct
from pathlib import Path

import pytest

from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice
from hotplug.wire.channel import MAX_MESSAGE
from tests.helpers import wait_for
from tests.integration.daemon_rig import Daemon, free_port, policy_text, target
from tests.integration.tls_support import raw_tls_client, secure_usbipa
from tests.rig import run_cli, running_usbipa
from tests.tlscerts import Pki

UPGRADE = (
    b"GET /usbip HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def open_writer(fifo: Path) -> int | None:
    """Our end of `fifo`, once a reader has it open (None before that)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nobody reads it yet
            return None
        raise


def test_status_answers_while_a_reload_parses(tree: FakeTree, state: Path, tmp_path: Path) -> None:
    """Issue 12, finding 12: a slow policy parse froze the daemon (no `status` for
    16 s, past WatchdogSec). A drop-in that is a FIFO holds the reload inside its
    read for as long as the test wants, with no timing involved: `status` must
    answer while it is held, and the reload completes once the text arrives."""
    config = tmp_path / "conf"
    (config / "policy.d").mkdir(parents=True)
    (config / "policy.yaml").write_text(policy_text({"lab": target(free_port())}, []))
    daemon = Daemon(tree, state, tmp_path / "daemon", config)
    try:
        daemon.start("--watch-interval", "60")  # only the signal reloads
        slow = config / "policy.d" / "50-slow.yaml"
        os.mkfifo(slow)
        daemon.signal(signal.SIGHUP)
        daemon.expect("RELOADING")
        # Our open succeeds once the daemon has the FIFO open to read: from then
        # on its reload waits for our bytes.
        fd = wait_for(lambda: open_writer(slow), 10, "the daemon to open the policy drop-in")
        assert fd is not None
        try:
            status = run_cli(tree, state, "status", "--json", timeout=20)
            assert status.returncode == 0, status.stderr
            assert '"pid"' in status.stdout
            assert "policy reloaded" not in daemon.text()  # the reload is still held
            os.write(fd, b"version: 1\nrules:\n  - {match: {vendor: '1d6b'}, action: ignore}\n")
        finally:
            os.close(fd)
        daemon.expect("READY")
        wait_for(lambda: "policy reloaded (SIGHUP): 1 rules" in daemon.text(), 10, "the reload")
    finally:
        daemon.close()


SNEAKY = "Totally Legit\x1b[8m hidden\u202e"
SHOWN = "Totally Legit\\x1b[8m hidden\\u202e"
LIAR = FakeUsbDevice(
    "1-5",
    0xF00D,
    0x0042,
    serial="S\x1b]0;pwned\x07",
    manufacturer="ACME\x9b2J",
    product_name=SNEAKY,
)


def test_usb_strings_are_escaped_in_human_output_and_logs(
    tree: FakeTree, state: Path, tmp_path: Path
) -> None:
    """Issue 12, finding 13: a product string holding escape sequences reached root's
    terminal raw through `list`, `status` and log lines. They are escaped there;
    `--json` keeps the exact strings."""
    tree.add_device(LIAR, devnum=7)
    listed = run_cli(tree, state, "list")
    assert listed.returncode == 0, listed.stderr
    assert f"ACME\\x9b2J : {SHOWN}" in listed.stdout
    assert_no_raw_controls(listed.stdout)
    rows = json.loads(run_cli(tree, state, "list", "--json").stdout)
    row = next(r for r in rows if r["busid"] == "1-5")
    assert (row["product"], row["vendor"], row["serial"]) == (
        SNEAKY,
        LIAR.manufacturer,
        LIAR.serial,
    )

    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text({"lab": target(free_port())}, []))
    daemon = Daemon(tree, state, tmp_path / "daemon", policy)
    try:
        daemon.start()
        status = run_cli(tree, state, "status")
        assert status.returncode == 0, status.stderr
        line = next(ln for ln in status.stdout.splitlines() if ln.startswith("1-5 "))
        assert line.endswith(f"ACME\\x9b2J : {SHOWN}"), line
        assert_no_raw_controls(status.stdout)
        exact = daemon.device("1-5")
        assert exact is not None and exact["product"] == SNEAKY
        assert exact["vendor"] == LIAR.manufacturer
        wait_for(lambda: f"1-5 (f00d:0042 ACME\\x9b2J : {SHOWN})" in daemon.text(), 10, "decision")
        assert_no_raw_controls(daemon.text())
    finally:
        daemon.close()


def assert_no_raw_controls(text: str) -> None:
    raw = [c for c in text if c in "\x1b\x07\x9b\u202e"]
    assert not raw, f"raw control characters in the output: {raw!r}"


def test_oversized_wss_frame_is_closed_with_1009(
    tree: FakeTree, state: Path, pki: Pki, tmp_path: Path
) -> None:
    """Issue 12, finding 15: a WebSocket frame over the size limit held the connection
    until control_timeout; usbipa answers with close code 1009 and hangs up."""
    config = tmp_path / "usbipa.yaml"
    config.write_text("limits: {control_timeout: 300}\n")  # far beyond this test's waits
    usbipa = secure_usbipa(tree, state, pki, "-c", str(config), wss_path="/usbip")
    with usbipa as (_, ports), raw_tls_client(pki, ports["wss"], pki.client) as sock:
        sock.settimeout(30)
        received = upgrade(sock)
        too_big = MAX_MESSAGE + 1
        sock.sendall(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", too_big) + b"mask")
        while chunk := sock.recv(4096):  # to the end: usbipa must hang up by itself
            received += chunk
    assert received[:1] == b"\x88", received  # a close frame, unmasked (from the server)
    assert struct.unpack("!H", received[2:4])[0] == 1009, received


def upgrade(sock: ssl.SSLSocket) -> bytes:
    """Do the WebSocket upgrade; returns what came after the 101 response."""
    sock.sendall(UPGRADE)
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        assert chunk, f"usbipa hung up during the upgrade: {reply!r}"
        reply += chunk
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return rest


def test_an_event_storm_logs_a_burst_and_a_count(
    tree: FakeTree, state: Path, tmp_path: Path
) -> None:
    """Issue 12, finding 15: a device that comes and goes wrote a log line per udev
    event. Now each busid gets a burst of lines per window, then one line with the
    count of those left out; every event is still accounted for."""
    storm = FakeUsbDevice("1-7", 0xF00D, 0x0007, serial="FLAKY")
    tree.add_device(storm, devnum=9)
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text({"lab": target(free_port())}, []))
    daemon = Daemon(tree, state, tmp_path / "daemon", policy)
    cycles = 150
    try:
        daemon.start()
        # The device stays in sysfs: each add is read and decided, each remove forgets it.
        batch = b"".join(
            json.dumps({"action": action, "busid": "1-7"}).encode() + b"\n"
            for _ in range(cycles)
            for action in ("remove", "add")
        )
        fd = os.open(daemon.fifo, os.O_WRONLY)
        try:
            os.write(fd, batch)
        finally:
            os.close(fd)
        expected = 1 + 2 * cycles  # "present at start", then unplugged / plugged in

        def accounted() -> bool:
            text = daemon.text()
            logged = sum(
                text.count(what) for what in ("1-7 unplugged", "in: 1-7 (", "start: 1-7 (")
            )
            counted = sum(int(n) for n in re.findall(r"1-7: (\d+) more plug/unplug lines", text))
            return counted > 0 and logged + counted == expected

        wait_for(accounted, 40, "every event logged or counted")
        logged_lines = [ln for ln in daemon.text().splitlines() if "1-7 unplugged" in ln]
        assert len(logged_lines) < cycles // 2, len(logged_lines)
    finally:
        daemon.close()


@pytest.mark.parametrize("busid", ["../../etc/x", "1-1\n", "\u0661-1", "1-1/../2"])
@pytest.mark.parametrize("command", ["connect", "disconnect"])
def test_a_busid_that_is_no_busid_is_a_usage_error(
    tree: FakeTree, state: Path, command: str, busid: str
) -> None:
    """Issue 12, finding 15: `disconnect -b ../../etc/x` ended in a traceback (the
    busid named a record file). -b is checked first: a usage error, exit 2."""
    result = run_cli(tree, state, command, "-r", "127.0.0.1:9", "-b", busid)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"argument -b/--busid: {busid!r} is not a USB busid" in result.stderr


def test_existing_state_directories_are_tightened_to_0700(
    tree: FakeTree, state: Path, tmp_path: Path
) -> None:
    """Issue 12, finding 15: a state directory that already existed kept its mode
    (0755 here); the daemon and usbipa make theirs 0700 when they start."""
    for side in ("device", "app"):
        (state / side).mkdir(mode=0o755)
        (state / side).chmod(0o755)
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text({"lab": target(free_port())}, []))
    daemon = Daemon(tree, state, tmp_path / "daemon", policy)
    try:
        daemon.start()
        assert (state / "device").stat().st_mode & 0o777 == 0o700
    finally:
        daemon.close()
    with running_usbipa(tree, state):
        assert (state / "app").stat().st_mode & 0o777 == 0o700
