"""Issue 12, findings 12, 13 and 15: what the programs do with input nobody vetted
(policy files, USB strings, busids on the command line, event storms), run for
real against the fake kernel."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

from hotplug.kernel.fake import FakeTree, FakeUsbDevice
from tests.helpers import run_cli, wait_for
from tests.integration.test_daemon import Daemon, free_port, policy_text, target


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
