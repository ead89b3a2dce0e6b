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
import subprocess
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from hotplug.device.policy.model import Target, TlsOptions
from hotplug.errors import HotplugError
from hotplug.spawn import CHILD_CWD, child_env, python_module
from hotplug.wire.address import AddressError, Endpoint, Scheme, parse_address, parse_endpoint

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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Remote:
        fields = dict(data)
        tls = fields.pop("tls", None)
        return cls(**fields, tls=TlsOptions(**tls) if tls else None)


def parse_remote(
    text: str,
    *,
    cert: str | None = None,
    key: str | None = None,
    ca: str | None = None,
    proxy: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Remote:
    """`-r` and its companion flags -> Remote. Raises AddressError with a one-line reason."""
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
        return Remote(scheme, host, port)
    tls = TlsOptions(*(os.path.abspath(p) if p else None for p in (cert, key, ca)))
    return Remote(scheme, host, port, path, tls, resolve_proxy(proxy, host, env))


def remote_for_target(target: Target, env: Mapping[str, str] | None = None) -> Remote:
    """A policy target as `export()` takes it (the daemon exports through this)."""
    proxy = resolve_proxy(None, target.host, env) if target.scheme != "tcp" else None
    return Remote(
        target.scheme, target.host, target.port, target.path, target.tls, proxy, name=target.name
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


# --------------------------------------------------------------------------- the relay process


def run_tunnel(
    remote: Remote,
    request: bytes,
    timeouts: Mapping[str, float],
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
        "timeouts": dict(timeouts),
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
    limit = timeouts["connect"] + timeouts["handshake"] + STARTUP_MARGIN
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
