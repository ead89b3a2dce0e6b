"""TCP sockets as the kernel will own them: the timeouts of one exchange, and the
options that let a kernel notice a dead peer once our process has let go."""

from __future__ import annotations

import socket
from dataclasses import dataclass

__all__ = ["Timeouts", "tune_socket"]


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    handshake: float = 5.0
    # How long the kernel may keep unacknowledged data before it declares the
    # link dead (TCP_USER_TIMEOUT), and keepalive probing for an idle link.
    user_timeout: float = 30.0
    keepalive_idle: int = 10
    keepalive_interval: int = 5
    keepalive_count: int = 3


def tune_socket(sock: socket.socket, timeouts: Timeouts) -> None:
    """Set what the kernel needs to notice a dead peer once it owns the socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, timeouts.keepalive_idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, timeouts.keepalive_interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, timeouts.keepalive_count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeouts.user_timeout * 1000))
