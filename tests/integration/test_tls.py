"""tls:// and wss:// end to end: our CLI and relay process, the real usbipa, the fake kernel.

Every refusal is checked from both sides (one clear line each) and for what
it leaves behind: nothing bound, no vhci port used, no relay process.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as ws_serve

from hotplug.device.export import ExportError, export
from hotplug.device.transport import parse_remote
from hotplug.testing.fake_kernel import FakeTree
from hotplug.wire.protocol import DEVICE_RECORD_SIZE, HEADER_SIZE, ExportReply, ExportStatus, encode
from hotplug.wire.sockets import Timeouts
from tests.helpers import wait_for
from tests.integration.conftest import DISK
from tests.integration.export_facts import assert_untouched, driver, stub_status, used_ports
from tests.integration.tls_support import (
    Cutter,
    cli,
    client_flags,
    last_line,
    log_of,
    raw_tls_client,
    relay_pids,
    rx_bytes,
    secure_usbipa,
    server_tls_context,
    threaded_server,
    usbipa_once,
)
from tests.tlscerts import Pki

REQUEST_SIZE = HEADER_SIZE + DEVICE_RECORD_SIZE
# What a vhci might send right behind the EXPORT reply: it must reach usbip-host intact.
EARLY_URB = bytes(range(48)) * 3


def connect(tree: FakeTree, state: Path, remote: str, *flags: str) -> tuple[int, str]:
    result = cli(tree, state, "connect", "-r", remote, "-b", "1-1", "--timeout", "3", *flags)
    return result.returncode, last_line(result) if result.returncode else result.stdout


def test_tls_connect_disconnect(tree: FakeTree, state: Path, pki: Pki) -> None:
    tree.add_device(DISK, devnum=5)
    with secure_usbipa(tree, state, pki) as (proc, ports):
        code, out = connect(tree, state, f"tls://127.0.0.1:{ports['tls']}", *client_flags(pki))
        assert code == 0, out
        assert f"to tls://127.0.0.1:{ports['tls']}" in out
        assert stub_status(tree, "1-1") == "2"
        (vport,) = [p for p in tree.vhci().ports() if p.state == 6]
        assert vport.devid == (1 << 16) | 5
        assert len(relay_pids(tree)) == 1

        # disconnect finds the certificates in the export record
        result = cli(tree, state, "disconnect", "-b", "1-1")
        assert result.returncode == 0, result.stderr
        assert used_ports(tree) == []
        assert driver(tree, "1-1") == "usb"
        wait_for(lambda: not relay_pids(tree), 2, "the relay process to end")
    log = log_of(proc)
    assert "attached 1-1 from 127.0.0.1 (CN=lab-1)" in log
    assert "unexported by the device side" in log


def test_wss_connect_disconnect(tree: FakeTree, state: Path, pki: Pki) -> None:
    tree.add_device(DISK)
    with secure_usbipa(tree, state, pki, wss_path="/usbip") as (proc, ports):
        remote = f"wss://127.0.0.1:{ports['wss']}/usbip"
        code, out = connect(tree, state, remote, *client_flags(pki))
        assert code == 0, out
        wait_for(lambda: len(used_ports(tree)) == 1, 10, "usbipa to attach (it replies first)")
        assert stub_status(tree, "1-1") == "2"
        result = cli(tree, state, "disconnect", "-b", "1-1")
        assert result.returncode == 0, result.stderr
        assert used_ports(tree) == [] and driver(tree, "1-1") == "usb"
        wait_for(lambda: not relay_pids(tree), 2, "the relay process to end")

        code, err = connect(tree, state, f"wss://127.0.0.1:{ports['wss']}/nope", *client_flags(pki))
        assert code == 1
        assert "WebSocket upgrade to /nope refused: HTTP 404 Not Found" in err
        assert_untouched(tree)
    assert "WebSocket request for '/nope', which is not '/usbip'" in log_of(proc)


@pytest.mark.parametrize(
    ("pair", "client_says", "usbipa_says"),
    [
        (
            "client_self_signed",
            "the server does not trust the CA that issued our certificate",
            "client certificate not accepted: self-signed certificate",
        ),
        (
            "client_other_ca",
            "the server does not trust the CA that issued our certificate",
            "client certificate not accepted: unable to get local issuer certificate",
        ),
    ],
)
def test_bad_client_certificate(
    tree: FakeTree, state: Path, pki: Pki, pair: str, client_says: str, usbipa_says: str
) -> None:
    tree.add_device(DISK)
    with secure_usbipa(tree, state, pki) as (proc, ports):
        flags = client_flags(pki, getattr(pki, pair))
        code, err = connect(tree, state, f"tls://127.0.0.1:{ports['tls']}", *flags)
        assert code == 1
        assert err == f"usbip-hotplug: tls://127.0.0.1:{ports['tls']}: {client_says}"
        assert_untouched(tree)
        wait_for(lambda: not relay_pids(tree), 2, "the relay process to end")
    assert f"refused tls connection from 127.0.0.1: {usbipa_says}" in log_of(proc)


def test_client_without_certificate(tree: FakeTree, state: Path, pki: Pki) -> None:
    tree.add_device(DISK)
    with secure_usbipa(tree, state, pki) as (proc, ports):
        code, err = connect(tree, state, f"tls://127.0.0.1:{ports['tls']}", "--ca", str(pki.ca))
        assert code == 1
        assert err.endswith(
            "the server requires a certificate and we showed none (give --cert and --key)"
        )
        assert_untouched(tree)
    assert "refused tls connection from 127.0.0.1: the client showed no certificate" in log_of(proc)


def test_expired_or_unsuitable_client_certificate(tree: FakeTree, state: Path, pki: Pki) -> None:
    tree.add_device(DISK)
    with secure_usbipa(tree, state, pki) as (proc, ports):
        remote = f"tls://127.0.0.1:{ports['tls']}"
        # Our own client refuses to start with it ...
        code, err = connect(tree, state, remote, *client_flags(pki, pki.client_expired))
        assert code == 1
        assert f"{pki.client_expired.cert}: certificate has expired (valid " in err
        code, err = connect(tree, state, remote, *client_flags(pki, pki.server_as_client))
        assert code == 1
        assert "unsuitable certificate purpose" in err and "clientAuth" in err
        assert_untouched(tree)
        # ... and usbipa refuses a client that shows it anyway.
        for pair in (pki.client_expired, pki.server_as_client):
            with (
                raw_tls_client(pki, ports["tls"], pair) as sock,
                pytest.raises((ssl.SSLError, ConnectionError)),
            ):
                sock.sendall(b"\x01\x11")
                sock.recv(8)  # the alert
    log = log_of(proc)
    assert "refused tls connection from 127.0.0.1: client certificate not accepted: " in log
    assert "certificate has expired" in log
    assert "unsuitable certificate purpose" in log


@pytest.mark.parametrize(
    ("pair", "client_says", "usbipa_says"),
    [
        (
            "server_self_signed",
            "server certificate not accepted: self-signed certificate",
            "the client does not trust the CA that issued our certificate",
        ),
        (
            "server_other_ca",
            "server certificate not accepted: unable to get local issuer certificate",
            "the client does not trust the CA that issued our certificate",
        ),
        (
            "server_wrong_host",
            "server certificate not accepted: IP address mismatch, "
            "certificate is not valid for '127.0.0.1'",
            "the client rejected our certificate",
        ),
    ],
)
def test_bad_server_certificate(
    tree: FakeTree, state: Path, pki: Pki, pair: str, client_says: str, usbipa_says: str
) -> None:
    tree.add_device(DISK)
    with secure_usbipa(tree, state, pki, server=getattr(pki, pair)) as (proc, ports):
        code, err = connect(tree, state, f"tls://127.0.0.1:{ports['tls']}", *client_flags(pki))
        assert code == 1
        assert err == f"usbip-hotplug: tls://127.0.0.1:{ports['tls']}: {client_says}"
        assert_untouched(tree)
        wait_for(lambda: not relay_pids(tree), 2, "the relay process to end")
    assert f"refused tls connection from 127.0.0.1: {usbipa_says}" in log_of(proc)


def test_usbipa_checks_its_certificate_files(tree: FakeTree, state: Path, pki: Pki) -> None:
    def start(cert: Path, key: Path, ca: Path) -> str:
        flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca)]
        result = usbipa_once(tree, state, "--listen", "127.0.0.1", "-t", "0", *flags)
        assert result.returncode == 1
        return last_line(result)

    server, ca = pki.server, pki.ca
    expired = pki.server_expired
    assert start(expired.cert, expired.key, ca).startswith(
        f"usbipa: {expired.cert}: certificate has expired (valid "
    )
    assert start(server.cert, pki.client.key, ca) == (
        f"usbipa: key {pki.client.key} does not match certificate {server.cert}"
    )
    missing = state / "missing.crt"
    assert start(missing, server.key, ca) == f"usbipa: certificate {missing}: no such file"
    assert start(server.cert, server.key, server.cert).startswith(
        f"usbipa: client CA file {server.cert}: holds no CA certificate"
    )
    assert start(pki.client.cert, pki.client.key, ca).endswith(
        "unsuitable certificate purpose (a server certificate needs extendedKeyUsage serverAuth)"
    )


def test_authorization_by_certificate(tree: FakeTree, state: Path, pki: Pki) -> None:
    tree.add_device(DISK)
    config = state / "usbipa.yaml"
    config.write_text(
        "allow:\n"
        "  - client: 'CN=lab-1'\n"
        "    devices: ['1d6b:*']\n"
        "    max_devices: 1\n"
        "  - client: 'CN=lab-2'\n"
        "    devices: ['0781:*']\n"
    )
    with secure_usbipa(tree, state, pki, "-c", str(config), allow=None) as (proc, ports):
        remote = f"tls://127.0.0.1:{ports['tls']}"
        code, err = connect(tree, state, remote, *client_flags(pki, pki.client2))
        assert code == 1 and "the application side could not attach the device" in err
        assert_untouched(tree)
        code, out = connect(tree, state, remote, *client_flags(pki))
        assert code == 0, out
        wait_for(lambda: len(used_ports(tree)) == 1, 10, "usbipa to attach (it replies first)")
    log = log_of(proc)
    assert (
        "refused export from 127.0.0.1 (CN=lab-2): device 1d6b:0104 not allowed for this peer"
        in log
    )
    assert "client=CN=lab-2" in log


def test_tls_client_sending_garbage(tree: FakeTree, state: Path, pki: Pki) -> None:
    tree.add_device(DISK)
    with secure_usbipa(tree, state, pki) as (proc, ports):
        with raw_tls_client(pki, ports["tls"], pki.client) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(400))
            assert sock.recv(64) == b""  # usbipa hung up
        assert used_ports(tree) == []
        # ... and it still serves everyone else.
        code, out = connect(tree, state, f"tls://127.0.0.1:{ports['tls']}", *client_flags(pki))
        assert code == 0, out
    assert "127.0.0.1: malformed request: " in log_of(proc)


def test_proxy_refusing_connect(tree: FakeTree, state: Path, pki: Pki) -> None:
    tree.add_device(DISK)
    requests: list[bytes] = []

    def refuse(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            requests.append(conn.recv(4096))
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    with threaded_server(refuse) as proxy_port:
        flags = [*client_flags(pki), "--proxy", f"http://127.0.0.1:{proxy_port}"]
        code, err = connect(tree, state, "wss://apps.example.net/usbip", *flags)
    assert code == 1
    assert err == (
        f"usbip-hotplug: proxy http://127.0.0.1:{proxy_port} refused CONNECT to "
        "apps.example.net:443: 403 Forbidden"
    )
    assert requests and requests[0].startswith(b"CONNECT apps.example.net:443 HTTP/1.1\r\n")
    assert_untouched(tree)


def test_outer_connection_cut(tree: FakeTree, state: Path, pki: Pki) -> None:
    """Link loss on an encrypted session looks to both kernels like link loss."""
    tree.add_device(DISK)
    with secure_usbipa(tree, state, pki) as (proc, ports):
        cutter = Cutter(ports["tls"])
        with threaded_server(cutter.handle) as middle:
            code, out = connect(tree, state, f"tls://127.0.0.1:{middle}", *client_flags(pki))
            assert code == 0, out
            wait_for(lambda: len(used_ports(tree)) == 1, 10, "usbipa to attach (it replies first)")
            assert stub_status(tree, "1-1") == "2"
            cutter.cut()
            wait_for(lambda: stub_status(tree, "1-1") == "1", 1.0, "usbip-host to drop the link")
            wait_for(lambda: used_ports(tree) == [], 1.0, "vhci to free the port")
            wait_for(lambda: not relay_pids(tree), 2, "the relay process to end")
    log = log_of(proc)
    assert "encrypted link ended: connection lost" in log


def _replying_tls_server(pki: Pki) -> AbstractContextManager[int]:
    ctx = server_tls_context(pki)

    def handle(conn: socket.socket) -> None:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(5)
            got = b""
            while len(got) < REQUEST_SIZE:
                got += tls.recv(REQUEST_SIZE - len(got))
            tls.sendall(encode(ExportReply(ExportStatus.ATTACHED)) + EARLY_URB)
            tls.settimeout(None)
            tls.recv(1)  # hold the session until the device side goes

    return threaded_server(handle)


def test_bytes_after_the_tls_reply_reach_the_kernel(tree: FakeTree, state: Path, pki: Pki) -> None:
    tree.add_device(DISK)
    with _replying_tls_server(pki) as port:
        code, out = connect(tree, state, f"tls://127.0.0.1:{port}", *client_flags(pki))
        assert code == 0, out
        wait_for(lambda: rx_bytes(tree) == EARLY_URB, 2, "the early URB at usbip-host")


def test_bytes_after_the_wss_reply_reach_the_kernel(tree: FakeTree, state: Path, pki: Pki) -> None:
    """Also our WebSocket client against the websockets library's own server."""
    tree.add_device(DISK)
    done = threading.Event()

    def handler(ws: ServerConnection) -> None:
        got = b""
        while len(got) < REQUEST_SIZE:
            message = ws.recv()
            assert isinstance(message, bytes)
            got += message
        ws.send(encode(ExportReply(ExportStatus.ATTACHED)) + EARLY_URB)
        done.wait(10)

    with ws_serve(handler, "127.0.0.1", 0, ssl=server_tls_context(pki)) as server:
        port = server.socket.getsockname()[1]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            code, out = connect(tree, state, f"wss://127.0.0.1:{port}/", *client_flags(pki))
            assert code == 0, out
            wait_for(lambda: rx_bytes(tree) == EARLY_URB, 2, "the early URB at usbip-host")
        finally:
            done.set()
            server.shutdown()
            thread.join(timeout=5)


def _silent_tls_server(pki: Pki) -> AbstractContextManager[int]:
    """Completes TLS, takes the request, never answers."""
    ctx = server_tls_context(pki)

    def handle(conn: socket.socket) -> None:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(10)
            with contextlib.suppress(OSError):
                while tls.recv(4096):
                    pass

    return threaded_server(handle)


def test_no_reply_times_out_or_is_cancelled(tree: FakeTree, state: Path, pki: Pki) -> None:
    """The daemon's canceller (export's on_connect) works for encrypted exports too."""
    tree.add_device(DISK)
    with _silent_tls_server(pki) as port:
        remote = f"tls://127.0.0.1:{port}"
        code, err = connect(tree, state, remote, *client_flags(pki), "--timeout", "1")
        assert code == 1
        assert err == f"usbip-hotplug: {remote}: no reply within the handshake timeout"
        assert_untouched(tree)

        target = parse_remote(
            remote,
            cert=str(pki.client.cert),
            key=str(pki.client.key),
            ca=str(pki.ca),
            env={},
            timeouts=Timeouts(5, 5),
        )
        seen: list[socket.socket] = []
        cut = threading.Timer(0.5, lambda: seen[0].shutdown(socket.SHUT_RDWR))
        cut.start()
        started = time.monotonic()
        with pytest.raises(ExportError, match="cancelled while waiting for the reply"):
            export(tree.stub(), "1-1", target, on_connect=seen.append)
        assert time.monotonic() - started < 3
        assert_untouched(tree)
        wait_for(lambda: not relay_pids(tree), 2, "the relay process to end")
