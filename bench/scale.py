"""usbipa under 1,000 concurrent exports, then 1,000 unexports (issue 7, item 5).

    python -m bench.scale --connections 1000

One asyncio client opens --connections TCP connections to a real usbipa at
once, each sending OP_REQ_EXPORT for a distinct device (busid, busnum/devnum)
built with hotplug.wire.protocol; after a status-0 reply the fake vhci holds the
socket, and the client keeps its end open, as usbip-host would. Then it sends
as many OP_REQ_UNEXPORT, each on a new connection, all at once.

The fake vhci has ceil(N / 15) controllers of 15 ports per hub (the most the
kernel's vhci_hcd allows), so every device finds a port; usbipa's limits are
raised above N by its config file.

Printed: wall time and throughput of each phase, per-operation latency
(p50/p99/max), errors (must be 0), usbipa's RSS and fds before, after the
exports and after the unexports (memory must come back flat), and every
vhci port free at the end.

Baseline in the same run: the same client doing N concurrent bare connect +
8-byte exchanges against an asyncio server shaped like usbipa
(bench.echo_server), so the ratio shows usbipa's cost over loopback TCP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    EchoServer,
    add_dir_option,
    machine,
    raise_fd_limit,
    scratch_dir,
    summary,
    wait_for,
)
from hotplug.wire.protocol import (
    HEADER_SIZE,
    DeviceRecord,
    ExportRequest,
    Op,
    UnexportRequest,
    decode_header,
    encode,
)
from tests.helpers import disk_record
from tests.rig import FakeKernel, ProcStats, Usbipa, proc_stats

PORTS_PER_HUB = 15  # USB_SS_MAXPORTS: the kernel's vhci_hcd allows no more per hub
BARE_REQUEST = b"\x01\x11\x80\x06\x00\x00\x00\x00"


def record(n: int) -> DeviceRecord:
    """Device number n, distinct in busid and devid as the peer sees it."""
    busnum, devnum = n // 127 + 1, n % 127 + 1
    return disk_record(f"{busnum}-{devnum}", busnum=busnum, devnum=devnum)


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


async def request(port: int, payload: bytes, keep: list[socket.socket] | None) -> int:
    """Connect, send `payload`, read the 8-byte reply; return its status."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_sendall(sock, payload)
        reply = await recv_exactly(sock, HEADER_SIZE)
    except BaseException:
        sock.close()
        raise
    if keep is not None:
        keep.append(sock)  # the "kernel" on our side keeps the link
    else:
        sock.close()
    header = decode_header(reply)
    if header.code not in (Op.REP_EXPORT, Op.REP_UNEXPORT, Op.REQ_EXPORT):
        raise ConnectionError(f"unexpected reply code 0x{header.code:04x}")
    return header.status


def listen_drops() -> int:
    """The host's count of connections dropped because a listen backlog was full."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenDrops"])
    return 0


class Phase:
    def __init__(self, name: str) -> None:
        self.name = name
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.wall = 0.0
        self.listen_drops = 0  # SYNs the client had to send again (host-wide counter)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


async def run_phase(name: str, n: int, one: Callable[[int], Awaitable[int]]) -> Phase:
    phase = Phase(name)

    async def timed(i: int) -> None:
        start = time.perf_counter()
        try:
            status = await one(i)
        except (OSError, ValueError) as exc:
            phase.error(type(exc).__name__)
            return
        phase.latencies.append((time.perf_counter() - start) * 1000.0)
        if status != 0:
            phase.error(f"status {status}")

    drops = listen_drops()
    start = time.perf_counter()
    await asyncio.gather(*(timed(i) for i in range(n)))
    phase.wall = time.perf_counter() - start
    phase.listen_drops = listen_drops() - drops
    return phase


def print_phase(phase: Phase, n: int) -> None:
    s = summary(phase.latencies)
    print(
        f"  {phase.name:<22} {phase.wall:7.2f} s {n / phase.wall:8.0f}/s   "
        f"p50 {s['p50']:8.1f} ms  p99 {s['p99']:8.1f} ms  max {s['max']:8.1f} ms   "
        f"errors {phase.error_count}{' ' + str(phase.errors) if phase.errors else ''}   "
        f"listen drops {phase.listen_drops}"
    )


def print_mem(label: str, stats: ProcStats) -> None:
    print(f"  {label:<34} RSS {stats.rss_kb / 1024:6.1f} MB  fds {stats.fds}")


@dataclass
class Round:
    exports: Phase
    unexports: Phase
    attached: int
    after_exports: ProcStats
    after_unexports: ProcStats
    cpu: tuple[float, float, float, float]  # usbipa export, kernel export, usbipa un-, kernel un-


async def one_round(n: int, usbipa: Usbipa, app: FakeKernel, before: ProcStats) -> Round:
    held: list[socket.socket] = []
    kernel0 = proc_stats(app.pid).cpu_seconds
    exports = await run_phase(
        "export", n, lambda i: request(usbipa.port, encode(ExportRequest(record(i))), held)
    )
    attached = len(app.used_ports())
    after_exports, kernel1 = usbipa.stats(), proc_stats(app.pid).cpu_seconds
    unexports = await run_phase(
        "unexport", n, lambda i: request(usbipa.port, encode(UnexportRequest(record(i))), None)
    )
    wait_for(lambda: not app.used_ports(), timeout=60, what="every vhci port to be freed")
    # usbipa closes its end just after the reply we have read: let it finish.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: usbipa.fds() <= before.fds, timeout=10, what="usbipa's fds to settle")
    after_unexports, kernel2 = usbipa.stats(), proc_stats(app.pid).cpu_seconds
    for sock in held:
        sock.close()
    return Round(
        exports,
        unexports,
        attached,
        after_exports,
        after_unexports,
        (
            after_exports.cpu_seconds - before.cpu_seconds,
            kernel1 - kernel0,
            after_unexports.cpu_seconds - after_exports.cpu_seconds,
            kernel2 - kernel1,
        ),
    )


async def scenario(n: int, rounds: int, usbipa: Usbipa, echo: EchoServer, app: FakeKernel) -> int:
    start = usbipa.stats()
    done: list[Round] = []
    for _ in range(rounds):
        done.append(await one_round(n, usbipa, app, done[-1].after_unexports if done else start))
    baseline = await run_phase(
        "bare TCP (baseline)", n, lambda i: request(echo.port, BARE_REQUEST, None)
    )

    print(f"bench.scale: {n} concurrent connections from one peer, {rounds} round(s)")
    print_mem("usbipa at start", start)
    ok = True
    for number, r in enumerate(done, 1):
        print(f"round {number}: {r.attached} of {n} vhci ports attached after the exports")
        for phase in (r.exports, r.unexports):
            print_phase(phase, n)
        print_mem(f"after {n} exports", r.after_exports)
        print_mem(f"after {n} unexports", r.after_unexports)
        print(
            f"  CPU: exports usbipa {r.cpu[0]:.2f} s, fake kernel {r.cpu[1]:.2f} s; "
            f"unexports usbipa {r.cpu[2]:.2f} s, fake kernel {r.cpu[3]:.2f} s"
        )
        ok = ok and r.attached == n and not r.exports.error_count and not r.unexports.error_count
    print_phase(baseline, n)
    end = done[-1].after_unexports
    print(
        f"memory over the run: {(end.rss_kb - start.rss_kb) / 1024:+.1f} MB RSS "
        f"(peak {end.hwm_kb / 1024:.1f} MB), {end.fds - start.fds:+d} fds"
    )
    if len(done) > 1:
        grew = (done[-1].after_unexports.rss_kb - done[0].after_unexports.rss_kb) / 1024
        print(f"  growth from round 1 to round {len(done)} (a leak shows here): {grew:+.1f} MB")
    first = done[0]
    print(
        f"ratio to bare TCP: export wall x{first.exports.wall / baseline.wall:.1f}, "
        f"unexport wall x{first.unexports.wall / baseline.wall:.1f}"
    )
    errors = sum(r.exports.error_count + r.unexports.error_count for r in done)
    print(f"errors: {errors} (target 0)")
    return 0 if ok and end.fds == start.fds else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--connections", type=int, default=1000, help="default 1000")
    parser.add_argument(
        "--rounds", type=int, default=2, help="export+unexport rounds (default 2: a leak grows)"
    )
    add_dir_option(parser)
    args = parser.parse_args(argv)
    n = args.connections
    at_start = machine()
    # Us (n held + n in flight), the fake vhci (n held) and usbipa (n in flight).
    raise_fd_limit(3 * n + 256)
    controllers = -(-n // PORTS_PER_HUB)
    config = {
        "limits": {
            "per_peer_connections": n + 16,
            "max_connections": n + 16,
            "control_timeout": 60,
        }
    }
    with scratch_dir("bench-scale-", args.dir) as tmp:
        work = Path(tmp)
        with (
            FakeKernel(
                work / "app", stub=False, vhci_controllers=controllers, ports_per_hub=PORTS_PER_HUB
            ) as app,
            Usbipa(app, work / "usbipa", config) as usbipa,
            EchoServer() as echo,
        ):
            result = asyncio.run(scenario(n, args.rounds, usbipa, echo, app))
            print(f"machine: {at_start} (at start)")
            if not usbipa.alive():
                print("usbipa died")
                result = 1
            refused = usbipa.log().count("refused")
            if refused:
                print(f"usbipa refused {refused} connections or exports (see its log)")
    return result


if __name__ == "__main__":
    sys.exit(main())
