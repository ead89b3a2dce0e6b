"""Interop with other implementations, as real processes on loopback:
- stunnel (Debian stunnel4) as the TLS end in front of a plain usbipa, our
  tls:// client against it;
- tinyproxy (Debian) as the HTTP CONNECT proxy for our wss:// client,
  both when it lets us through and when its ConnectPort rule refuses us.
Skipped, saying why, where the binary is not installed (scripts/bootstrap
installs both).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hotplug.testing.fake_kernel import FakeTree
from tests.helpers import wait_for
from tests.integration.conftest import DISK
from tests.integration.export_facts import assert_untouched, driver, stub_status, used_ports
from tests.integration.tls_support import (
    cli,
    client_flags,
    last_line,
    log_of,
    relay_pids,
    secure_usbipa,
)
from tests.rig import running_usbipa, stop
from tests.tlscerts import Pki

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
TINYPROXY = shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/sbin:/usr/bin")
needs_stunnel = pytest.mark.skipif(
    STUNNEL is None, reason="stunnel4 is not installed (apt-get install stunnel4)"
)
needs_tinyproxy = pytest.mark.skipif(
    TINYPROXY is None, reason="tinyproxy is not installed (apt-get install tinyproxy)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


@contextmanager
def daemon(cmd: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or accepting(port), 10, f"{cmd[0]} to listen")
        assert proc.poll() is None, f"{cmd[0]} exited: {log.read_text()}"
        yield proc
    finally:
        stop(proc)


@contextmanager
def stunnel(directory: Path, pki: Pki, upstream: int) -> Iterator[int]:
    """stunnel in server mode: TLS 1.2+, client certificates from our CA required."""
    assert STUNNEL is not None
    port = free_port()
    conf = directory / "stunnel.conf"
    conf.write_text(
        "foreground = yes\n"
        "pid =\n"
        "debug = notice\n"
        "[usbip]\n"
        f"accept = 127.0.0.1:{port}\n"
        f"connect = 127.0.0.1:{upstream}\n"
        f"cert = {pki.server.cert}\n"
        f"key = {pki.server.key}\n"
        f"CAfile = {pki.ca}\n"
        "verifyChain = yes\n"
        "requireCert = yes\n"
        "sslVersionMin = TLSv1.2\n"
    )
    with daemon([STUNNEL, str(conf)], port, directory / "stunnel.log"):
        yield port


@contextmanager
def tinyproxy(directory: Path, connect_port: int) -> Iterator[int]:
    """tinyproxy on loopback that allows CONNECT to `connect_port` only."""
    assert TINYPROXY is not None
    port = free_port()
    conf = directory / "tinyproxy.conf"
    conf.write_text(
        f"Port {port}\n"
        "Listen 127.0.0.1\n"
        "Timeout 60\n"
        "Allow 127.0.0.1\n"
        f"ConnectPort {connect_port}\n"
        f'LogFile "{directory / "tinyproxy.log"}"\n'
        "LogLevel Info\n"
        "MaxClients 8\n"
    )
    with daemon([TINYPROXY, "-d", "-c", str(conf)], port, directory / "tinyproxy.out"):
        yield port


@needs_stunnel
def test_tls_client_through_stunnel(tree: FakeTree, state: Path, pki: Pki) -> None:
    tree.add_device(DISK)
    with (
        running_usbipa(tree, state) as (usbipa, plain_port),
        stunnel(state, pki, plain_port) as port,
    ):
        remote = f"tls://127.0.0.1:{port}"
        result = cli(tree, state, "connect", "-r", remote, "-b", "1-1", *client_flags(pki))
        assert result.returncode == 0, result.stderr
        wait_for(lambda: len(used_ports(tree)) == 1, 10, "usbipa to attach (it replies first)")
        assert stub_status(tree, "1-1") == "2"
        result = cli(tree, state, "disconnect", "-b", "1-1")
        assert result.returncode == 0, result.stderr
        assert used_ports(tree) == [] and driver(tree, "1-1") == "usb"
        wait_for(lambda: not relay_pids(tree), 2, "the relay process to end")

        # stunnel checks client certificates too: a stranger's is refused.
        flags = client_flags(pki, pki.client_other_ca)
        result = cli(tree, state, "connect", "-r", remote, "-b", "1-1", *flags)
        assert result.returncode == 1
        assert last_line(result).startswith(f"usbip-hotplug: {remote}: the server ")
        assert_untouched(tree)
    assert "attached 1-1 from 127.0.0.1" in log_of(usbipa)


@needs_tinyproxy
def test_wss_client_through_tinyproxy(tree: FakeTree, state: Path, pki: Pki) -> None:
    tree.add_device(DISK)
    with secure_usbipa(tree, state, pki, wss_path="/usbip") as (_, ports):
        with tinyproxy(state, ports["wss"]) as proxy:
            remote = f"wss://127.0.0.1:{ports['wss']}/usbip"
            flags = [*client_flags(pki), "--timeout", "5"]
            # The proxy comes from the environment, as for curl.
            env = {"https_proxy": f"http://127.0.0.1:{proxy}"}
            result = cli(tree, state, "connect", "-r", remote, "-b", "1-1", *flags, **env)
            assert result.returncode == 0, result.stderr
            wait_for(lambda: len(used_ports(tree)) == 1, 10, "usbipa to attach (it replies first)")
            assert stub_status(tree, "1-1") == "2"
            result = cli(tree, state, "disconnect", "-b", "1-1")
            assert result.returncode == 0, result.stderr
            assert used_ports(tree) == [] and driver(tree, "1-1") == "usb"
        log = (state / "tinyproxy.log").read_text()
    # connect and disconnect each went through it
    assert log.count(f"CONNECT 127.0.0.1:{ports['wss']} HTTP/1.1") == 2


@needs_tinyproxy
def test_tinyproxy_refusing_connect(tree: FakeTree, state: Path, pki: Pki) -> None:
    tree.add_device(DISK)
    with tinyproxy(state, 443) as proxy:
        target = free_port()  # not 443: tinyproxy's ConnectPort rule refuses it
        flags = [*client_flags(pki), "--proxy", f"http://127.0.0.1:{proxy}"]
        remote = f"tls://127.0.0.1:{target}"
        result = cli(tree, state, "connect", "-r", remote, "-b", "1-1", *flags)
    assert result.returncode == 1
    assert last_line(result).startswith(
        f"usbip-hotplug: proxy http://127.0.0.1:{proxy} refused CONNECT to 127.0.0.1:{target}: 403"
    )
    assert_untouched(tree)
