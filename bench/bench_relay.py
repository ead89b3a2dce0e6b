"""Throughput, CPU and added latency of the tls:// and wss:// relays, against plain TCP.

    python -m bench.bench_relay [--megabytes 256] [--pings 2000] [--json]

Three paths between two "kernels" (this process's sockets), measured in one run:
  plain  the kernels' sockets connected directly over loopback TCP (what a
         plain-TCP export hands the kernels);
  tls    kernel A - loopback - the device side's relay process (the real
         `hotplug.device.tunnel`, started by `transport.run_tunnel` after a real
         EXPORT exchange) - TLS over loopback - the application side's relay
         (a process running usbipa's per-session code: TlsStream handshake,
         Inbox, reply, relay) - loopback - kernel B;
  wss    the same with WebSocket framing over the TLS.
For each, after 32 MB each way untimed: MB/s one way (A->B, then B->A) with
256 KiB writes; the relays' CPU seconds per MB (both relay processes
together, read from /proc); and the round-trip time of a 48-byte message (a
USB/IP command header) echoed by B, p50 and p99, with the relays' added
latency against plain.
Loopback only; the two relays and the two kernels share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import machine, percentile
from hotplug.device.policy.model import TlsOptions
from hotplug.device.transport import Remote, run_tunnel
from hotplug.usb import Speed
from hotplug.wire.channel import Channel, Inbox, TlsStream, WebSocketChannel
from hotplug.wire.protocol import (
    DEVICE_RECORD_SIZE,
    HEADER_SIZE,
    DeviceRecord,
    ExportReply,
    ExportRequest,
    ExportStatus,
    encode,
)
from hotplug.wire.relay import loopback_pair, relay
from hotplug.wire.tls import server_context
from tests.rig import proc_stats

CHUNK = 256 * 1024
PING = 48
WARM_UP = 32_000_000  # bytes each way before the timed transfers
WSS_PATH = "/bench"


# --------------------------------------------------------------------------- the far relay


async def serve(kind: str, cert: str, key: str, ca: str, kernel_port: int) -> None:
    """The application side's per-session work, as usbipa does it (hotplug/app/link.py)."""
    context = server_context(cert, key, ca)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    print(listener.getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    sessions: set[asyncio.Task[None]] = set()
    while True:
        conn, _ = await loop.sock_accept(listener)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.create_task(session(conn, kind, context, kernel_port))
        sessions.add(task)
        task.add_done_callback(sessions.discard)


async def session(conn: socket.socket, kind: str, context: Any, kernel_port: int) -> None:
    stream = await TlsStream.handshake(conn, context, server_side=True)
    channel = await WebSocketChannel.server(stream, WSS_PATH) if kind == "wss" else Channel(stream)
    inbox = Inbox(channel)
    await inbox.read_exactly(HEADER_SIZE + DEVICE_RECORD_SIZE)
    kernel = socket.create_connection(("127.0.0.1", kernel_port))
    kernel.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await channel.send(encode(ExportReply(ExportStatus.ATTACHED)))
    await relay(channel, kernel, inbox.leftover())


# --------------------------------------------------------------------------- measuring


def make_pki(directory: Path) -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.tlscerts import make_pki as make  # needs the test extra (cryptography)

    return make(directory)


def request() -> bytes:
    record = DeviceRecord(
        "/sys/bench", "1-1", 1, 2, Speed.HIGH, 0x1D6B, 0x0104, 0, 0, 0, 0, 1, 1, 1
    )
    return encode(ExportRequest(record))


def open_path(
    kind: str, pki: Any
) -> tuple[socket.socket, socket.socket, list[int], subprocess.Popen[str] | None]:
    """(kernel A, kernel B, relay pids, far relay process) for one path."""
    if kind == "plain":
        a, b = loopback_pair()
        return a, b, [], None
    kernels = socket.create_server(("127.0.0.1", 0))
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_relay", "serve", kind, str(pki.server.cert),
         str(pki.server.key), str(pki.ca), str(kernels.getsockname()[1])],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stdout is not None
    port = int(server.stdout.readline())
    tls = TlsOptions(str(pki.client.cert), str(pki.client.key), str(pki.ca))
    path = WSS_PATH if kind == "wss" else None
    remote = Remote(kind, "127.0.0.1", port, path, tls)  # type: ignore[arg-type]
    a, relay_end = loopback_pair()
    with relay_end:
        _, pid = run_tunnel(remote, request(), relay_end.fileno())
    b, _ = kernels.accept()
    kernels.close()
    b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b, [p for p in (pid, server.pid) if p], server


def cpu(pids: list[int]) -> float:
    return sum(proc_stats(pid).cpu_seconds for pid in pids)


def throughput(
    src: socket.socket, dst: socket.socket, total: int, pids: list[int]
) -> tuple[float, float]:
    """(MB/s, relay CPU seconds per MB) for `total` bytes src -> dst."""
    block = bytes(CHUNK)
    received = 0

    def sink() -> None:
        nonlocal received
        buf = bytearray(CHUNK)
        while received < total:
            n = dst.recv_into(buf, min(CHUNK, total - received))
            if not n:
                return
            received += n

    thread = threading.Thread(target=sink)
    cpu_before = cpu(pids)
    start = time.perf_counter()
    thread.start()
    sent = 0
    while sent < total:
        size = min(CHUNK, total - sent)
        src.sendall(block[:size] if size < CHUNK else block)
        sent += size
    thread.join()
    elapsed = time.perf_counter() - start
    assert received >= total, f"only {received} of {total} bytes arrived"
    megabytes = total / 1e6
    return megabytes / elapsed, (cpu(pids) - cpu_before) / megabytes


def latency(a: socket.socket, b: socket.socket, count: int) -> list[float]:
    """Round trips of a PING-byte message from A, echoed by B; microseconds."""
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            data = recv_exactly(b, PING)
            if not data:
                return
            b.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    message = bytes(range(PING))
    times = []
    for i in range(count + 100):
        start = time.perf_counter()
        a.sendall(message)
        assert recv_exactly(a, PING) == message
        if i >= 100:  # the first hundred warm up
            times.append((time.perf_counter() - start) * 1e6)
    stop.set()
    return times


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def measure(kind: str, pki: Any, megabytes: int, pings: int) -> dict[str, Any]:
    a, b, pids, server = open_path(kind, pki)
    try:
        total = megabytes * 1_000_000
        # Not timed: a fresh connection's first megabytes are slower whatever
        # the relay (TCP's windows grow, the relays' buffers are first touched).
        throughput(a, b, WARM_UP, pids)
        throughput(b, a, WARM_UP, pids)
        up, up_cpu = throughput(a, b, total, pids)
        down, down_cpu = throughput(b, a, total, pids)
        rtts = latency(a, b, pings)
    finally:
        a.close()  # ends the device side's relay
        b.close()
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    return {
        "path": kind,
        "a_to_b_MBps": up,
        "b_to_a_MBps": down,
        "relay_cpu_ms_per_MB": 1000 * (up_cpu + down_cpu) / 2,
        "rtt_p50_us": percentile(rtts, 50),
        "rtt_p99_us": percentile(rtts, 99),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        kind, cert, key, ca, port = args[1:6]
        asyncio.run(serve(kind, cert, key, ca, int(port)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.bench_relay", description=__doc__)
    parser.add_argument("--megabytes", type=int, default=256, help="per direction (256)")
    parser.add_argument("--pings", type=int, default=2000, help="round trips timed (2000)")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(args)
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        pki = make_pki(Path(tmp) / "pki")
        rows = [measure(k, pki, opts.megabytes, opts.pings) for k in ("plain", "tls", "wss")]
    plain = rows[0]["rtt_p50_us"]
    for row in rows:
        row["added_p50_us"] = row["rtt_p50_us"] - plain
    if opts.json:
        print(json.dumps({"machine": machine(), "rows": rows}, indent=1))
        return 0
    print(f"machine: {machine()}; {opts.megabytes} MB each way, {opts.pings} round trips")
    print(
        f"{'path':<6} {'A->B MB/s':>10} {'B->A MB/s':>10} {'relay CPU ms/MB':>16} "
        f"{'RTT p50 us':>11} {'p99 us':>8} {'added p50 us':>13}"
    )
    for row in rows:
        print(
            f"{row['path']:<6} {row['a_to_b_MBps']:>10.0f} {row['b_to_a_MBps']:>10.0f} "
            f"{row['relay_cpu_ms_per_MB']:>16.2f} {row['rtt_p50_us']:>11.0f} "
            f"{row['rtt_p99_us']:>8.0f} {row['added_p50_us']:>13.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
