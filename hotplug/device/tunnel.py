"""The device side's relay process: one tls:// or wss:// export (or one unexport).

`python -m hotplug.device.tunnel`, started by `transport.run_tunnel`, reads its job
as JSON on stdin: the remote, the timeouts, the request PDU, the fd of a pipe
to report on and, for an export, the fd of its end of the loopback pair. It
connects (directly or through an HTTP CONNECT proxy), does the TLS and
WebSocket handshakes, sends the request, reads exactly the 8-byte reply and
reports it (or a one-line error). After a status-0 EXPORT reply it relays
until either side closes; anything else ends it.

For an export it detaches first (forks; the first half exits at once), so
the caller reaps it immediately and the relay outlives a one-shot `connect`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import ssl
import sys
import time
from typing import Any

from hotplug import log
from hotplug.device.policy.model import TlsOptions
from hotplug.device.transport import (
    RELAY_LOG_ENV,
    Proxy,
    Remote,
    TransportError,
    parse_proxy,
)
from hotplug.wire.channel import Channel, ChannelError, Inbox, TlsStream, WebSocketChannel
from hotplug.wire.protocol import HEADER_SIZE, ExportStatus, Op, ProtocolError, decode_header
from hotplug.wire.relay import relay
from hotplug.wire.sockets import Timeouts, tune_socket
from hotplug.wire.tls import CertError, client_context, describe

logger = log.get("hotplug.relay")
MAX_PROXY_REPLY = 16 * 1024


# --------------------------------------------------------------------------- TCP and the proxy


def open_tcp(remote: Remote) -> socket.socket:
    """A TCP connection to the remote, through its proxy if it has one (blocking)."""
    timeouts = remote.timeouts
    deadline = time.monotonic() + timeouts.connect
    if remote.proxy:
        proxy = parse_proxy(remote.proxy)
        sock = _connect(proxy.host, proxy.port, timeouts.connect, f"proxy {proxy}")
        try:
            http_connect(sock, proxy, remote.host, remote.port, deadline)
        except BaseException:
            sock.close()
            raise
    else:
        sock = _connect(remote.host, remote.port, timeouts.connect, str(remote))
    tune_socket(sock, timeouts)
    sock.settimeout(None)
    return sock


def _connect(host: str, port: int, timeout: float, what: str) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise TransportError(f"{what}: connection timed out after {timeout:g} s") from None
    except socket.gaierror as exc:
        raise TransportError(f"{what}: cannot resolve host: {exc.strerror}") from None
    except OSError as exc:
        raise TransportError(f"{what}: {exc.strerror or exc}") from None


def http_connect(sock: socket.socket, proxy: Proxy, host: str, port: int, deadline: float) -> None:
    """Ask an HTTP proxy for a tunnel (RFC 9110 CONNECT); return once it is open.

    The reply head is read a byte at a time: it is short, and whatever
    follows it belongs to the TLS handshake.
    """
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.user is not None:
        token = base64.b64encode(f"{proxy.user}:{proxy.password or ''}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    head = bytearray()
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while not head.endswith(b"\r\n\r\n"):
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            byte = sock.recv(1)
            if not byte:
                raise TransportError(f"proxy {proxy}: closed the connection before replying")
            head += byte
            if len(head) > MAX_PROXY_REPLY:
                raise TransportError(f"proxy {proxy}: reply head too long")
    except TimeoutError:
        raise TransportError(f"proxy {proxy}: no answer to CONNECT in time") from None
    except OSError as exc:
        raise TransportError(f"proxy {proxy}: {exc.strerror or exc}") from None
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise TransportError(f"proxy {proxy}: not an HTTP reply: {status_line[:60]!r}")
    if not parts[1].startswith("2"):
        reason = parts[2] if len(parts) > 2 else ""
        raise TransportError(
            f"proxy {proxy} refused CONNECT to {authority}: {parts[1]} {reason}".rstrip()
        )


# --------------------------------------------------------------------------- TLS, WebSocket


async def open_channel(remote: Remote, sock: socket.socket, ctx: ssl.SSLContext) -> Channel:
    stream = await TlsStream.handshake(sock, ctx, server_side=False, server_hostname=remote.host)
    if remote.scheme == "wss":
        try:
            return await WebSocketChannel.client(
                stream, remote.host, remote.port, remote.path or "/"
            )
        except BaseException:
            stream.abort()
            raise
    return Channel(stream)


# --------------------------------------------------------------------------- the process


class Reporter:
    """The one answer to the waiting caller: a JSON line on the result pipe."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, **answer: Any) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # the caller gave up (timed out)
            os.write(self.fd, (json.dumps(answer) + "\n").encode())
        os.close(self.fd)
        self.fd = None


async def session(
    remote: Remote,
    sock: socket.socket,
    ctx: ssl.SSLContext,
    request: bytes,
    timeouts: Timeouts,
    inner: socket.socket | None,
    report: Reporter,
    fields: dict[str, Any],
) -> None:
    channel: Channel | None = None
    step = "TLS handshake"
    try:
        async with asyncio.timeout(timeouts.handshake):
            channel = await open_channel(remote, sock, ctx)
            step = "reply"
            await channel.send(request)
            inbox = Inbox(channel)
            reply = await inbox.read_exactly(HEADER_SIZE)
    except TimeoutError:
        if channel is not None:
            channel.abort()
        layers = "TLS and WebSocket handshakes" if remote.scheme == "wss" else "TLS handshake"
        what = "no reply" if step == "reply" else f"the {layers} did not finish"
        report.send(error=f"{remote}: {what} within the handshake timeout")
        return
    except (OSError, ChannelError) as exc:
        if channel is not None:
            channel.abort()
        why = str(exc) if isinstance(exc, ChannelError) else describe(exc, "client")
        if isinstance(exc, ssl.SSLError) and not (remote.tls and remote.tls.cert):
            shown = "showed none" in why
            why += " (give --cert and --key)" if shown else " (we showed no certificate)"
        report.send(error=f"{remote}: {why}")
        return
    if len(reply) < HEADER_SIZE:
        channel.abort()
        got = f"after {len(reply)} of {HEADER_SIZE} bytes" if reply else "before replying"
        report.send(error=f"{remote}: connection closed {got}")
        return
    report.send(reply=reply.hex(), pid=os.getpid())
    if inner is None or not _attached(reply):
        await channel.close()
        return
    ktls = channel.stream.ktls
    log.event(
        logger,
        logging.INFO,
        f"relaying to {remote} (kTLS: {ktls})",
        event="relay-started",
        ktls=ktls,
        **fields,
    )
    why = await relay(channel, inner, inbox.leftover())
    log.event(
        logger, logging.INFO, f"relay to {remote} ended: {why}", event="relay-ended", **fields
    )


def _attached(reply: bytes) -> bool:
    try:
        header = decode_header(reply)
    except ProtocolError:
        return False
    return header.code == Op.REP_EXPORT and header.status == ExportStatus.ATTACHED


def _detach() -> None:
    if os.fork() > 0:
        os._exit(0)  # the caller reaps this half; the relay is reparented to init
    os.chdir("/")


def _setup_logging() -> None:
    path = os.environ.get(RELAY_LOG_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        log.setup("usbip-hotplug", force_stderr=True)
    else:
        log.setup("usbip-hotplug")  # the journal under systemd; stderr is /dev/null


def main() -> int:
    job = json.loads(sys.stdin.buffer.read())
    inner_fd = job["inner_fd"]
    if inner_fd is not None:
        _detach()
    _setup_logging()
    report = Reporter(int(job["result_fd"]))
    remote = Remote.from_json(job["remote"], Timeouts(**job["timeouts"]))
    timeouts = remote.timeouts
    inner = socket.socket(fileno=int(inner_fd)) if inner_fd is not None else None
    fields = {"busid": job.get("busid"), "target": str(remote)}
    tls = remote.tls or TlsOptions()
    try:
        ctx = client_context(tls.cert, tls.key, tls.ca)
        sock = open_tcp(remote)
    except (CertError, TransportError) as exc:
        report.send(error=str(exc))
        return 1
    asyncio.run(
        session(remote, sock, ctx, bytes.fromhex(job["request"]), timeouts, inner, report, fields)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
