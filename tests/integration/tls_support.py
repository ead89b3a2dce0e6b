"""Helpers for the tls:// and wss:// tests: usbipa with secure listeners, the CLI
with certificates, stand-in servers and proxies, and a link we can cut."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from hotplug.testing.fake_kernel import FakeTree
from tests.helpers import loopback_server
from tests.rig import env_for, run_cli, run_usbipa, usbipa_process
from tests.tlscerts import Pair, Pki


def secure_env(tree: FakeTree, state: Path, **extra: str) -> dict[str, str]:
    env = env_for(tree, state)
    for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        env.pop(name, None)  # only the proxies a test asks for
    env["USBIP_HOTPLUG_RELAY_LOG"] = str(state / "relay.log")
    env.update(extra)
    return env


def cli(tree: FakeTree, state: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(tree, state, *args, env=secure_env(tree, state, **env))


def usbipa_once(tree: FakeTree, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """usbipa that is expected to exit at once (bad configuration)."""
    return run_usbipa(tree, state, *args, env=secure_env(tree, state))


def client_flags(pki: Pki, pair: Pair | None = None, ca: Path | None = None) -> list[str]:
    pair = pair or pki.client
    return ["--cert", str(pair.cert), "--key", str(pair.key), "--ca", str(ca or pki.ca)]


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


@contextmanager
def secure_usbipa(
    tree: FakeTree,
    state: Path,
    pki: Pki,
    *args: str,
    server: Pair | None = None,
    wss_path: str | None = None,
    allow: str | None = "127.0.0.0/8",
) -> Iterator[tuple[subprocess.Popen[str], dict[str, int]]]:
    """usbipa with a TLS listener (and a wss one if `wss_path`) on loopback.

    Yields (process, {"tls": port, "wss": port}). Its log is proc.stderr,
    readable once the block is left.
    """
    server = server or pki.server
    flags = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    flags += ["--tls-client-ca", str(pki.ca)]
    if wss_path is not None:
        flags += ["--wss-port", "0", "--wss-path", wss_path]
    if allow:
        flags += ["--allow", allow]
    with usbipa_process(secure_env(tree, state), state, *flags, *args) as (proc, ports):
        yield proc, ports


def log_of(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    return proc.stderr.read()


def relay_pids(tree: FakeTree) -> list[int]:
    """Relay processes (hotplug.device.tunnel) of this test's fake machine."""
    marker = f"USBIP_HOTPLUG_SYSFS_ROOT={tree.root}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"hotplug.device.tunnel" in cmdline and marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def rx_bytes(tree: FakeTree, busid: str = "1-1") -> bytes:
    """What the fake usbip-host received on its socket (the data phase)."""
    path = tree.root / ".fake-kernel-rx" / busid
    return path.read_bytes() if path.exists() else b""


def threaded_server(handle: Callable[[socket.socket], None]) -> AbstractContextManager[int]:
    """A loopback TCP server running `handle(conn)` per connection in threads."""
    return loopback_server(handle, threaded=True)


class Cutter:
    """A TCP forwarder between the device side and usbipa that can cut the link
    the way a failing network does to both ends at once: a reset, no goodbye."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.socks: list[socket.socket] = []
        self.pumps: list[threading.Thread] = []
        self.lock = threading.Lock()

    def handle(self, conn: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream))
        pumps = [
            threading.Thread(target=self._pump, args=(conn, up), daemon=True),
            threading.Thread(target=self._pump, args=(up, conn), daemon=True),
        ]
        with self.lock:
            self.socks += [conn, up]
            self.pumps += pumps
        for pump in pumps:
            pump.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        with self.lock:
            socks, pumps = list(self.socks), list(self.pumps)
            self.socks.clear()
            self.pumps.clear()
        for sock in socks:
            # SO_LINGER 0: close() resets. SHUT_RD wakes the pump blocked in
            # recv without sending anything, so the close below is the last
            # reference and the reset goes out at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
        for pump in pumps:
            pump.join(timeout=5)
        for sock in socks:
            sock.close()


def server_tls_context(pki: Pki, pair: Pair | None = None) -> ssl.SSLContext:
    pair = pair or pki.server
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pair.cert, pair.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pki.ca)
    return ctx


def raw_tls_client(pki: Pki, port: int, pair: Pair) -> ssl.SSLSocket:
    """A TLS client that is not ours: shows `pair` whatever it is, checks nothing of its own."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(pair.cert, pair.key)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def has_binary(name: str) -> bool:
    return (
        any(
            os.access(os.path.join(d, name), os.X_OK) for d in os.environ.get("PATH", "").split(":")
        )
        or os.access(f"/usr/sbin/{name}", os.X_OK)
        or os.access(f"/usr/bin/{name}", os.X_OK)
    )
