"""The TLS stream, WebSocket and relay tests of tests/unit/test_tls_channel.py
again, in the guest, where the kernel has TLS (the `tls` ULP) and the host's
kernel here has none.

There OpenSSL hands the kernel each TLS 1.3 session's sending key (Debian 12's
OpenSSL 3.0 offloads sends only), so the code the host never runs runs here:
plain bytes written to a kTLS socket, the kernel's bytes spliced through a
pipe into it (tls://), close_notify and alerts sent as kernel TLS control
records, and everything the relay does under backpressure, resets and
cancellation with those. Each test that makes TLS sessions must show them in
the kernel's own counters (/proc/net/tls_stat), or it proves nothing here.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator

import pytest

from hotplug.wire.channel import CHUNK, Channel, TlsStream
from hotplug.wire.relay import loopback_pair, relay
from tests.tlscerts import Pki
from tests.unit.test_tls_channel import (
    pki,  # noqa: F401  (the fixture the tests below ask for)
    test_refused_client_certificate_is_explained_on_both_sides,
    test_relay_aborts_the_peer_when_the_kernel_resets,
    test_relay_answers_websocket_pings_while_data_flows,
    test_relay_both_ways_at_once_through_full_buffers,
    test_relay_closes_the_peer_when_the_kernel_ends,
    test_relay_drops_the_kernel_side_when_the_peer_goes,
    test_relay_moves_bytes_both_ways_early_bytes_first,
    test_relay_reports_a_peer_reset_as_link_loss,
    test_relay_stops_when_cancelled,
    test_tls_stream_round_trip,
    test_websocket_round_trip_and_exact_reads,
)
from tests.unit.tls_streams import run, tls_pair
from tests.vm.guest.oneshot import tls_stat

__all__ = [
    "test_refused_client_certificate_is_explained_on_both_sides",
    "test_relay_aborts_the_peer_when_the_kernel_resets",
    "test_relay_answers_websocket_pings_while_data_flows",
    "test_relay_both_ways_at_once_through_full_buffers",
    "test_relay_closes_the_peer_when_the_kernel_ends",
    "test_relay_drops_the_kernel_side_when_the_peer_goes",
    "test_relay_moves_bytes_both_ways_early_bytes_first",
    "test_relay_reports_a_peer_reset_as_link_loss",
    "test_relay_stops_when_cancelled",
    "test_tls_stream_round_trip",
    "test_websocket_round_trip_and_exact_reads",
]

# Tests whose sessions all complete their handshakes: each must open at least
# one kernel TLS socket per end. (A refused certificate's session may end
# before the keys are set, so that test only has to pass, here with kTLS on.)
KTLS_SESSIONS = ("test_relay_", "test_tls_stream_", "test_websocket_")


@pytest.fixture(scope="module", autouse=True)
def ktls_ready(pki: Pki) -> None:  # noqa: F811
    """The first kTLS socket of a fresh guest loads the `tls` module and sets
    up gcm(aes), cipher self-tests included, inside the handshake that asks
    for it: seconds under emulation. Done once here, bounded, and timed, so
    that the tests below measure the relay and not the module loader."""
    subprocess.run(["modprobe", "tls"], check=True, timeout=60)
    started = time.monotonic()

    async def first_session() -> tuple[str, str]:
        client, server = await tls_pair(pki)
        kinds = client.ktls, server.ktls
        client.abort()
        server.abort()
        return kinds

    kinds = run(first_session(), timeout=60)
    seconds = time.monotonic() - started
    print(f"first kTLS session in this guest: {seconds:.2f} s, kTLS {kinds}")
    assert kinds == ("send", "send"), (
        f"the kernel took no TLS key (client {kinds[0]}, server {kinds[1]}): "
        "without kTLS these tests repeat the host's"
    )


@pytest.fixture(autouse=True)
def ktls_used(request: pytest.FixtureRequest) -> Iterator[None]:
    before = tls_stat().get("TlsTxSw", 0)
    yield
    if not request.node.name.startswith(KTLS_SESSIONS):
        return
    opened = tls_stat().get("TlsTxSw", 0) - before
    assert opened >= 2, f"{opened} kernel TLS sockets opened: both ends' sends should be kTLS"


def test_relay_splices_bulk_into_ktls_and_sends_close_notify(pki: Pki) -> None:  # noqa: F811
    """tls:// with kTLS: the kernel's bytes go through the splice pipe into
    the TLS socket while the peer does not read, until the kernel's own socket
    is full (so the pipe and the TLS socket are full too: splice returned
    short and EAGAIN); then the peer reads everything, the kernel ends the
    session, and the peer gets a close_notify (a clean end, not a reset)."""
    size = 24 << 20  # more than every buffer on the way holds
    data = bytes(range(253)) * (size // 253)

    async def main() -> None:
        client, server = await tls_pair(pki)
        ours, peer = Channel(server), Channel(client)
        assert ours.splice_fd() is not None, f"no splice: kTLS {server.ktls}"
        kernel, relay_end = loopback_pair()
        kernel.setblocking(False)
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(relay(ours, relay_end, b""))
        full = asyncio.Event()

        async def kernel_sends() -> None:
            view = memoryview(data)
            while view:
                try:
                    view = view[kernel.send(view[:CHUNK]) :]
                except BlockingIOError:
                    full.set()  # nothing moves until the peer reads
                    await loop.sock_sendall(kernel, view[:CHUNK])
                    view = view[CHUNK:]
            kernel.close()  # the kernel ends the session: a clean close

        async def peer_reads() -> bytes:
            await full.wait()
            got = bytearray()
            while chunk := await peer.recv():
                got += chunk
            return bytes(got)

        try:
            _, got = await asyncio.gather(kernel_sends(), peer_reads())
            assert await task == "the local kernel closed the connection"
            assert len(got) == len(data)
            assert got == data
        finally:
            kernel.close()
            peer.abort()
            ours.abort()

    run(main(), timeout=180)


def test_stream_reads_what_a_ktls_peer_wrote_before_close(pki: Pki) -> None:  # noqa: F811
    """Writes through the kernel's TLS then close(): every byte, then b"" (the
    peer's close_notify went out after the data, as a TLS alert record)."""

    async def main() -> None:
        client, server = await tls_pair(pki)
        assert isinstance(client, TlsStream) and client.ktls_send
        payload = b"x" * (3 * 16384 + 7)  # records of every size
        await client.write(payload)
        await client.close()
        got = bytearray()
        while chunk := await server.read():
            got += chunk
        assert bytes(got) == payload
        server.abort()

    run(main(), timeout=60)
