"""The daemon's local control socket: `usbip-hotplug status` asks the running daemon.

AF_UNIX stream socket `control.sock` in the state directory (/run/usbip-hotplug,
mode 0700), the socket itself mode 0600, and the peer must be root or the
daemon's own user (SO_PEERCRED): device names and targets are not for every
local user. One JSON request line, one JSON reply line, then close.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotplug import log
from hotplug.errors import HotplugError
from hotplug.privdir import ensure_private_dir
from hotplug.state import StateError

if TYPE_CHECKING:
    import asyncio

logger = log.get("hotplug.control")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(HotplugError):
    pass


class AlreadyRunning(ControlError):
    pass


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def bind_control_socket(path: Path) -> socket.socket:
    """Bind the control socket, 0600. A live socket there means another daemon runs."""
    try:
        ensure_private_dir(path.parent)
    except StateError as exc:
        raise ControlError(f"{exc} (run as root)") from exc
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # left behind by a daemon that was killed
        else:
            raise AlreadyRunning(f"another usbip-hotplug daemon is running ({path} answers)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # no window in which the socket is more open than 0600
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot create control socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def serve(sock: socket.socket, handler: Handler) -> asyncio.Server:
    # Here, not at the top: `usbip-hotplug status` is a client, and asyncio pulls in ssl.
    import asyncio

    """Answer requests on `sock` with `handler` (runs on the loop: keep it quick)."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer: socket.socket = writer.get_extra_info("socket")
            if _peer_uid(peer) not in (0, os.getuid()):
                reply: dict[str, Any] = {"ok": False, "error": "permission denied: run as root"}
            else:
                async with asyncio.timeout(5):
                    line = await reader.readline()
                reply = _answer(line, handler)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: line too long
            logger.debug("control client: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_unix_server(on_client, sock=sock, limit=MAX_REQUEST)


def _answer(line: bytes, handler: Handler) -> dict[str, Any]:
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("not an object")
    except ValueError:
        return {"ok": False, "error": "expected one JSON object per line"}
    try:
        return {"ok": True, **handler(request)}
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # one bad request must not take the daemon down
        log.event(logger, logging.ERROR, f"control request failed: {exc!r}", event="control")
        return {"ok": False, "error": f"internal error: {exc}"}


def request(path: Path, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to the daemon and return its reply (client side)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlError(
                f"the daemon is not running (no answer on {path}); "
                "start it with 'systemctl start usbip-hotplug'"
            ) from exc
        except PermissionError as exc:
            raise ControlError(f"permission denied on {path}: run as root") from exc
        data = bytearray()
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError as exc:
            raise ControlError(
                f"the daemon did not answer on {path} within {timeout:g} s (busy or stuck; "
                "see 'journalctl -u usbip-hotplug')"
            ) from exc
        except OSError as exc:
            raise ControlError(f"lost the connection to the daemon on {path}: {exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise ControlError(f"the daemon sent an unreadable reply on {path}") from exc
    if not isinstance(reply, dict):
        raise ControlError(f"the daemon sent an unreadable reply on {path}")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "request refused")))
    return reply
