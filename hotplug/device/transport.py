"""How the device side reaches usbipa: the remote address, its scheme, and the relay.

Remotes:
  HOST[:PORT]                 plain TCP (as mainline USB/IP; port 3240)
  tls://HOST[:PORT]           TLS 1.2+, both sides show a certificate (port 3240)
  wss://HOST[:PORT]/PATH      USB/IP in binary WebSocket frames over TLS (port 443)
Either secure scheme can go through an HTTP CONNECT proxy (`--proxy`, or the
`https_proxy` environment variable unless `no_proxy` names the host).

Plain TCP is done in `export.py`, in this process, as before. A secure export
runs in a relay process (`hotplug.device.tunnel`): it connects, does the TLS and
WebSocket handshakes and the EXPORT exchange, reports the reply here over a
pipe, and then relays bytes between the encrypted connection and one end of a
loopback pair whose other end this process gives the kernel. The relay
process detaches, so a one-shot `connect` can return while the session goes
on; it ends by itself when either side closes (disconnect, unplug, link loss).
Doing the network work in the child, not after a fork of the caller, keeps
the daemon free of fork-with-threads hazards and of TLS state that cannot be
handed between processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from hotplug import log
from hotplug.device.policy.model import Target, TlsOptions
from hotplug.errors import HotplugError
from hotplug.faultpoints import reach
from hotplug.spawn import CHILD_CWD, child_env, python_module
from hotplug.wire import urbs
from hotplug.wire.address import AddressError, Endpoint, Scheme, parse_address, parse_endpoint
from hotplug.wire.protocol import (
    HEADER_SIZE,
    DeviceRecord,
    ExportRequest,
    ExportStatus,
    Op,
    ProtocolError,
    UnexportRequest,
    data_phase_command,
    decode_header,
    encode,
)
from hotplug.wire.sockets import Timeouts, tune_socket

# The handshake is part of an export's story: its lines go where export.py's go.
logger = log.get("hotplug.export")

RELAY_LOG_ENV = "USBIP_HOTPLUG_RELAY_LOG"  # a file the relay process logs to (debugging)
STARTUP_MARGIN = 10.0  # seconds the relay process may take to start, on top of the timeouts


class TransportError(HotplugError):
    """A secure connection could not be made or used; the message says why."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    user: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        return f"http://{Endpoint(self.host, self.port)}"


@dataclass(frozen=True)
class Remote:
    """Where to export to and how: what `export()`/`unexport()` take for any scheme."""

    scheme: Scheme
    host: str
    port: int
    path: str | None = None  # wss only
    tls: TlsOptions | None = None
    proxy: str | None = None  # http://HOST:PORT, already resolved (flag or environment)
    # The policy target's name, for log fields; not part of where the remote is.
    name: str | None = field(default=None, compare=False)
    # How long connecting and the handshake may take; not part of where it is either.
    timeouts: Timeouts = field(default_factory=Timeouts, compare=False)

    def __str__(self) -> str:
        where = str(Endpoint(self.host, self.port))
        if self.scheme == "tcp":
            return where
        path = (self.path or "/") if self.scheme == "wss" else ""
        return f"{self.scheme}://{where}{path}"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)

    @property
    def secure(self) -> bool:
        return self.scheme != "tcp"

    @classmethod
    def plain(cls, endpoint: Endpoint, timeouts: Timeouts | None = None) -> Remote:
        """host:port over plain TCP, as mainline USB/IP."""
        return cls("tcp", endpoint.host, endpoint.port, timeouts=timeouts or Timeouts())

    def to_json(self) -> dict[str, Any]:
        """Where the remote is (the relay's job carries the timeouts apart)."""
        data = asdict(self)
        del data["timeouts"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], timeouts: Timeouts | None = None) -> Remote:
        fields = dict(data)
        tls = fields.pop("tls", None)
        return cls(
            **fields, tls=TlsOptions(**tls) if tls else None, timeouts=timeouts or Timeouts()
        )


def parse_remote(
    text: str,
    *,
    cert: str | None = None,
    key: str | None = None,
    ca: str | None = None,
    proxy: str | None = None,
    env: Mapping[str, str] | None = None,
    timeouts: Timeouts | None = None,
) -> Remote:
    """`-r` and its companion flags -> Remote. Raises AddressError with a one-line reason."""
    timeouts = timeouts or Timeouts()
    if "://" in text:
        try:
            scheme, host, port, path = parse_address(text.strip())
        except ValueError as exc:
            raise AddressError(f"'{text}': {exc}") from None
    else:
        endpoint = parse_endpoint(text)
        scheme, host, port, path = "tcp", endpoint.host, endpoint.port, None
    given = [flag for flag, value in (("--cert", cert), ("--key", key), ("--ca", ca)) if value]
    if scheme == "tcp":
        if given:
            raise AddressError(
                f"{given[0]} applies to tls:// and wss:// remotes, not to plain '{text}'"
            )
        if proxy:
            raise AddressError(
                "--proxy needs a tls:// or wss:// remote: plain USB/IP would cross the "
                "proxy and the internet unencrypted"
            )
        return Remote(scheme, host, port, timeouts=timeouts)
    tls = TlsOptions(*(os.path.abspath(p) if p else None for p in (cert, key, ca)))
    return Remote(scheme, host, port, path, tls, resolve_proxy(proxy, host, env), timeouts=timeouts)


def remote_for_target(target: Target, env: Mapping[str, str] | None = None) -> Remote:
    """A policy target as `export()` takes it (the daemon exports through this)."""
    proxy = resolve_proxy(None, target.host, env) if target.scheme != "tcp" else None
    timeouts = Timeouts(connect=target.connect_timeout, handshake=target.handshake_timeout)
    return Remote(
        target.scheme,
        target.host,
        target.port,
        target.path,
        target.tls,
        proxy,
        name=target.name,
        timeouts=timeouts,
    )


def parse_proxy(text: str) -> Proxy:
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise AddressError(
            f"proxy '{text}': only http:// proxies (HTTP CONNECT) are supported, "
            f"got {parts.scheme}://"
        )
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise AddressError(f"proxy '{text}': expected http://HOST:PORT")
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    return Proxy(parts.hostname, port, user, password)


def resolve_proxy(explicit: str | None, host: str, env: Mapping[str, str] | None) -> str | None:
    """The proxy to use: `--proxy`, else https_proxy unless no_proxy covers `host`."""
    if explicit:
        return _checked_proxy(explicit)
    env = os.environ if env is None else env
    value = env.get("https_proxy") or env.get("HTTPS_PROXY")
    if not value:
        return None
    if bypasses_proxy(host, env.get("no_proxy") or env.get("NO_PROXY") or ""):
        return None
    return _checked_proxy(value)


def bypasses_proxy(host: str, no_proxy: str) -> bool:
    """no_proxy as curl reads it: '*', or names that match the host or a parent domain."""
    host = host.lower().strip("[]").rstrip(".")
    for entry in no_proxy.split(","):
        name = entry.strip().lower()
        if name == "*":
            return True
        if name.startswith("["):
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]  # 'host:port': the port does not matter here
        name = name.lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _checked_proxy(text: str) -> str:
    parse_proxy(text)  # refuse a bad proxy now, with the flag's or variable's own spelling
    text = text.strip()
    return text if "://" in text else f"http://{text}"


# --------------------------------------------------------------------------- the handshakes


class ExportError(HotplugError):
    """An export or unexport did not happen; the message says why."""


EXPORT_REFUSALS = {
    ExportStatus.FAILED: "the application side could not attach the device",
    ExportStatus.NO_FREE_PORT: "the application side has no free port of the needed speed",
}


def handshake_export(
    record: DeviceRecord,
    remote: Remote,
    on_connect: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """Connect, offer `record` and return the socket after a status-0 reply: the
    kernel's end of the link, whatever the scheme (this is where plain and
    secure part).

    The caller hands the socket to the kernel and closes its own copy (use it
    as a context manager); on any failure the socket is already closed.
    `on_connect` is called with the socket once it is connected (another
    thread may shut it down to cut the handshake short).
    """
    if remote.secure:
        return _secure_handshake(record, remote, on_connect)
    timeouts = remote.timeouts
    sock = connect(remote.endpoint, timeouts)
    try:
        if on_connect is not None:
            on_connect(sock)
        reach("export.after-connect")
        request = encode(ExportRequest(record))
        reply = _exchange(sock, request, Op.REP_EXPORT, remote.endpoint, timeouts)
        reach("export.after-reply")
        if reply != ExportStatus.ATTACHED:
            reason = EXPORT_REFUSALS.get(reply, f"refused with status {reply}")  # type: ignore[call-overload]
            raise ExportError(f"{remote} refused {record.busid}: {reason}")
        sock.settimeout(None)  # the kernel does blocking I/O on it
    except BaseException:
        sock.close()
        raise
    return sock


# Answering an abandoned session (hotplug/wire/urbs.py). The far side's hub asks
# in bursts: a few GET_DESCRIPTORs within milliseconds, then a port reset of a
# quarter second or so before it asks again (seen in the VM). Closing in such a
# gap, after answering a burst, finds the hub resetting a port that is now
# disconnected, so it gives up at once; closing while a request is on its way
# leaves that one unanswered. Measured in the VM: closing without answering held
# the hub 5 to 30 s; answering first, 0.2 s.
DECLINE_FIRST_WAIT = 1.0  # for the first request: vhci sends it 0.1-0.3 s after attach
DECLINE_QUIET = 0.05  # no request for this long after an answer: the burst is over
DECLINE_CAP = 2.0
DECLINE_MAX_BYTES = 1 << 20


def decline_urbs(sock: socket.socket) -> int:
    """Refuse the requests the far side's vhci sends on a session we abandon after
    its status-0 reply; the caller closes `sock` afterwards. Returns how many
    requests were answered. Bounded in time and bytes; a socket error ends it."""
    start = time.monotonic()
    wait = DECLINE_FIRST_WAIT
    pending = b""
    answered = received = 0
    with contextlib.suppress(OSError):
        while received < DECLINE_MAX_BYTES:
            wait = min(wait, start + DECLINE_CAP - time.monotonic())
            if wait <= 0:
                break
            sock.settimeout(wait)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += len(chunk)
            answers, used, stop = urbs.decline(pending + chunk)
            pending = (pending + chunk)[used:]
            if answers:
                answered += len(answers) // urbs.URB_HEADER_SIZE
                sock.sendall(answers)
                wait = DECLINE_QUIET
            if stop:
                break
    return answered


def exchange_unexport(record: DeviceRecord, remote: Remote) -> int:
    """OP_REQ_UNEXPORT on a new connection, plain or secure; the reply's status."""
    request = encode(UnexportRequest(record))
    if remote.secure:
        try:
            raw, _ = run_tunnel(remote, request, None)
        except TransportError as exc:
            raise ExportError(str(exc)) from None
        return _reply_status(raw, Op.REP_UNEXPORT, remote)
    with connect(remote.endpoint, remote.timeouts) as sock:
        return _exchange(sock, request, Op.REP_UNEXPORT, remote.endpoint, remote.timeouts)


def connect(endpoint: Endpoint, timeouts: Timeouts) -> socket.socket:
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeouts.connect)
    except TimeoutError as exc:
        raise ExportError(f"{endpoint}: connection timed out after {timeouts.connect:g} s") from exc
    except socket.gaierror as exc:
        raise ExportError(f"{endpoint}: cannot resolve host: {exc.strerror}") from exc
    except OSError as exc:
        raise ExportError(f"{endpoint}: {exc.strerror or exc}") from exc
    tune_socket(sock, timeouts)
    return sock


def recv_exactly(sock: socket.socket, size: int, deadline: float, endpoint: Endpoint) -> bytes:
    """Read exactly `size` bytes and not one more: what follows belongs to the kernel."""
    chunks = bytearray()
    while len(chunks) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ExportError(f"{endpoint}: no reply within the handshake timeout")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(size - len(chunks))
        except TimeoutError as exc:
            raise ExportError(f"{endpoint}: no reply within the handshake timeout") from exc
        except ConnectionResetError as exc:
            if chunks:
                raise ExportError(f"{endpoint}: connection reset while waiting for reply") from exc
            # usbipa closed unread what no allow entry could admit; our request
            # still unread there turns its close into a reset (a race with EOF).
            raise ExportError(
                f"{endpoint}: connection closed before replying (does the application side's "
                "allow list name this machine's address?)"
            ) from exc
        except OSError as exc:
            raise ExportError(f"{endpoint}: {exc.strerror or exc} while waiting for reply") from exc
        if not chunk:
            if chunks:
                raise ExportError(
                    f"{endpoint}: connection closed after {len(chunks)} of {size} bytes"
                )
            # usbipa closes at once, unread, what no allow entry could admit.
            raise ExportError(
                f"{endpoint}: connection closed before replying (does the application side's "
                "allow list name this machine's address?)"
            )
        chunks += chunk
    return bytes(chunks)


def _exchange(
    sock: socket.socket, request: bytes, expected: Op, endpoint: Endpoint, timeouts: Timeouts
) -> int:
    deadline = time.monotonic() + timeouts.handshake
    sock.settimeout(timeouts.handshake)
    try:
        sock.sendall(request)
    except OSError as exc:
        raise ExportError(f"{endpoint}: sending request failed: {exc.strerror or exc}") from exc
    reply = recv_exactly(sock, HEADER_SIZE, deadline, endpoint)
    return _reply_status(reply, expected, endpoint)


def _reply_status(reply: bytes, expected: Op, endpoint: Endpoint | Remote) -> int:
    command = data_phase_command(reply)
    if command is not None:
        # Issue 16: an application side that writes `attach` before its reply
        # lets the kernel's first URB overtake it. Our caller closes the
        # connection, so that side's vhci frees the port, and rolls back.
        code = int.from_bytes(reply[:4], "big")
        raise ExportError(
            f"{endpoint}: bad reply: the application side sent data-phase bytes (looks like "
            f"{command} 0x{code:08x}) before its {expected.name.replace('REP_', 'OP_REP_')}: "
            "it attached before replying; closed the connection (retry, or fix the "
            "application side to reply first)"
        )
    try:
        header = decode_header(reply)
    except ProtocolError as exc:
        raise ExportError(f"{endpoint}: bad reply: {exc}") from exc
    if header.code != expected:
        raise ExportError(
            f"{endpoint}: bad reply: op code 0x{header.code:04x}, not {expected.name}"
        )
    return header.status


def _secure_handshake(
    record: DeviceRecord,
    remote: Remote,
    on_connect: Callable[[socket.socket], None] | None,
) -> socket.socket:
    """handshake_export for tls:// and wss://: the exchange runs in a relay process.

    Returns the kernel's end of this session's loopback pair; the relay process
    holds the other end and the encrypted connection (tunnel.py). Closing
    the returned socket ends the relay and so the session on the far side:
    that is the rollback. `on_connect` gets the kernel's end: shutting it down
    cancels the wait for the reply.
    """
    from hotplug.wire.relay import loopback_pair  # plain-TCP users never load TLS/WebSocket code

    try:
        kernel_end, relay_end = loopback_pair()
    except OSError as exc:
        raise ExportError(f"cannot make the relay's loopback connection: {exc}") from exc
    try:
        if on_connect is not None:
            on_connect(kernel_end)
        with relay_end:  # the relay process keeps its own copy
            raw, pid = run_tunnel(
                remote,
                encode(ExportRequest(record)),
                relay_end.fileno(),
                busid=record.busid,
                cancel_fd=kernel_end.fileno(),
            )
        reply = _reply_status(raw, Op.REP_EXPORT, remote)
        if reply != ExportStatus.ATTACHED:
            reason = EXPORT_REFUSALS.get(reply, f"refused with status {reply}")  # type: ignore[call-overload]
            raise ExportError(f"{remote} refused {record.busid}: {reason}")
    except TransportError as exc:
        kernel_end.close()
        raise ExportError(str(exc)) from None
    except BaseException:
        kernel_end.close()
        raise
    logger.debug("%s: relay process %s carries the session to %s", record.busid, pid, remote)
    return kernel_end


# --------------------------------------------------------------------------- the relay process


def run_tunnel(
    remote: Remote,
    request: bytes,
    inner_fd: int | None,
    busid: str | None = None,
    cancel_fd: int | None = None,
) -> tuple[bytes, int | None]:
    """Run the control exchange in a relay process; return (8-byte reply, relay pid).

    With `inner_fd` (the relay's end of a loopback pair) the process stays on
    after a status-0 EXPORT reply and relays; without it, it exits after the
    reply (UNEXPORT). Raises TransportError with the relay's one-line reason.
    `cancel_fd` turning readable (another thread shut it down) cancels the wait.
    """
    read_fd, write_fd = os.pipe()
    job = {
        "remote": remote.to_json(),
        "timeouts": asdict(remote.timeouts),
        "request": request.hex(),
        "inner_fd": inner_fd,
        "result_fd": write_fd,
        "busid": busid,
    }
    passed = [write_fd] + ([inner_fd] if inner_fd is not None else [])
    try:
        proc = subprocess.Popen(
            python_module("hotplug.device.tunnel"),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=passed,
            start_new_session=True,  # no terminal signals: it outlives `connect`
            cwd=CHILD_CWD,
            env=child_env(),
        )
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        raise TransportError(f"cannot start the relay process: {exc.strerror}") from exc
    os.close(write_fd)
    limit = remote.timeouts.connect + remote.timeouts.handshake + STARTUP_MARGIN
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
        result = _read_result(read_fd, time.monotonic() + limit, cancel_fd)
    except BaseException:
        _kill_group(proc.pid)
        raise
    finally:
        os.close(read_fd)
        # The relay process forks at once and its first half exits: reap it here,
        # so the daemon never collects zombies.
        try:
            proc.wait(timeout=STARTUP_MARGIN)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
    if "error" in result:
        raise TransportError(str(result["error"]))
    reply = bytes.fromhex(str(result["reply"]))
    pid = result.get("pid")
    return reply, int(pid) if isinstance(pid, int) else None


def _read_result(fd: int, deadline: float, cancel_fd: int | None) -> dict[str, Any]:
    watched = [fd] if cancel_fd is None else [fd, cancel_fd]
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransportError("the relay process did not answer in time")
        ready, _, _ = select.select(watched, [], [], remaining)
        if cancel_fd in ready and fd not in ready:
            # Nothing is written to the kernel's end before the reply: readable
            # means shut down, i.e. cancelled (see export's on_connect).
            raise TransportError("cancelled while waiting for the reply")
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise TransportError("the relay process ended without an answer")
        data += chunk
    return cast(dict[str, Any], json.loads(data))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGTERM)
