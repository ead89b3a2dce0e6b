"""Certificate checks, the TLS/WebSocket channel and the relay, in one process over loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from websockets.frames import Opcode

from hotplug.wire.channel import (
    CHUNK,
    MAX_MESSAGE,
    Channel,
    ChannelError,
    Inbox,
    TlsStream,
    WebSocketChannel,
)
from hotplug.wire.relay import loopback_pair, relay
from hotplug.wire.tls import (
    CertError,
    check_ca,
    check_pair,
    client_context,
    describe,
    fingerprint,
    issued_by,
)
from tests.tlscerts import Pki, make_pki
from tests.unit.tls_streams import contexts, expect, kernel_read, run, tls_pair


# Its own, not the session's (tests/conftest.py): tests/vm/guest/test_relay_ktls.py
# reruns tests of this module in the guest, and takes this fixture, `run` and
# `tls_pair` from here with them.
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --------------------------------------------------------------------------- certificate files


def test_check_pair_reads_names_dates_fingerprint(pki: Pki) -> None:
    info = check_pair(str(pki.server.cert), str(pki.server.key), "server")
    assert info.subject == "CN=usbipa"
    assert info.san == ("IP:127.0.0.1", "DNS:localhost")
    cert = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    expected = cert.fingerprint(hashes.SHA256()).hex().upper()
    assert info.fingerprint == "SHA256:" + ":".join(
        expected[i : i + 2] for i in range(0, len(expected), 2)
    )
    assert fingerprint(str(pki.server.cert)) == info.fingerprint
    assert check_pair(str(pki.client.cert), str(pki.client.key), "client").subject == "CN=lab-1"


def test_check_pair_errors(pki: Pki, tmp_path: Path) -> None:
    def error(cert: Path, key: Path, role: str = "client") -> str:
        with pytest.raises(CertError) as info:
            check_pair(str(cert), str(key), role)  # type: ignore[arg-type]
        return str(info.value)

    client = pki.client
    assert (
        error(tmp_path / "no.crt", client.key) == f"certificate {tmp_path / 'no.crt'}: no such file"
    )
    assert error(tmp_path, client.key) == f"certificate {tmp_path}: is a directory, not a file"
    assert error(client.key, client.key) == (
        f"certificate {client.key}: not a PEM certificate (expected '-----BEGIN …' lines)"
    )
    assert error(client.cert, pki.client2.key) == (
        f"key {pki.client2.key} does not match certificate {client.cert}"
    )
    expired = pki.client_expired
    assert error(expired.cert, expired.key).startswith(
        f"{expired.cert}: certificate has expired (valid "
    )
    assert error(client.cert, client.key, "server") == (
        f"{client.cert}: unsuitable certificate purpose "
        "(a server certificate needs extendedKeyUsage serverAuth)"
    )
    locked = tmp_path / "locked.key"
    key = serialization.load_pem_private_key(client.key.read_bytes(), None)
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert "is encrypted with a passphrase" in error(client.cert, locked)


def test_ca_checks(pki: Pki) -> None:
    check_ca(str(pki.ca))
    with pytest.raises(CertError, match="holds no CA certificate"):
        check_ca(str(pki.client.cert))
    assert issued_by(str(pki.server.cert), str(pki.server.key), "server", str(pki.ca)) is None
    assert issued_by(str(pki.server.cert), str(pki.server.key), "server", str(pki.other_ca)) == (
        "unable to get local issuer certificate"
    )


def test_client_certificate_needs_its_key(pki: Pki) -> None:
    with pytest.raises(CertError, match="needs its key: give both --cert and --key"):
        client_context(str(pki.client.cert), None, None)


# --------------------------------------------------------------------------- channels


def test_tls_stream_round_trip(pki: Pki) -> None:
    async def main() -> None:
        client, server = await tls_pair(pki)
        assert (server.peercert() or {}).get("subject") == ((("commonName", "lab-1"),),)
        big = bytes(range(256)) * 4096  # 1 MiB: several records and reads
        await asyncio.gather(client.write(big), expect(server, big))
        await server.write(b"reply")
        assert await client.read() == b"reply"
        await client.close()
        assert await server.read() == b""

    run(main())


def test_refused_client_certificate_is_explained_on_both_sides(pki: Pki) -> None:
    async def main() -> tuple[BaseException, BaseException]:
        server_ctx, client_ctx = contexts(pki, pki.client_other_ca)
        a, b = loopback_pair()

        async def client() -> BaseException:
            # TLS 1.3: our handshake completes, the verdict comes with the first read.
            stream = await TlsStream.handshake(a, client_ctx, False, "127.0.0.1")
            with pytest.raises(ssl.SSLError) as info:
                await stream.read()
            return info.value

        async def server() -> BaseException:
            with pytest.raises(ssl.SSLError) as info:
                await TlsStream.handshake(b, server_ctx, server_side=True)
            return info.value

        return tuple(await asyncio.gather(client(), server()))  # type: ignore[return-value]

    client_error, server_error = run(main())
    assert describe(client_error, "client") == (
        "the server does not trust the CA that issued our certificate"
    )
    assert describe(server_error, "server") == (
        "client certificate not accepted: unable to get local issuer certificate"
    )


async def ws_pair(pki: Pki, path: str = "/usbip") -> tuple[WebSocketChannel, WebSocketChannel]:
    client, server = await tls_pair(pki)
    return await asyncio.gather(
        WebSocketChannel.client(client, "127.0.0.1", 443, path),
        WebSocketChannel.server(server, "/usbip"),
    )


def test_websocket_round_trip_and_exact_reads(pki: Pki) -> None:
    async def main() -> None:
        client, server = await ws_pair(pki)
        await client.send(b"12345678" + b"URB")
        inbox = Inbox(server)
        assert await inbox.read_exactly(8) == b"12345678"
        assert inbox.leftover() == b"URB"  # what follows a PDU stays for the kernel
        big = bytes(range(256)) * 8192  # 2 MiB in 256 KiB messages, as the relay sends it

        async def send_chunks() -> None:
            for start in range(0, len(big), CHUNK):
                await server.send(big[start : start + CHUNK])

        await asyncio.gather(send_chunks(), expect(client, big))
        # A peer's oversized message (a memory attack) ends the stream.
        await server.send(bytes(MAX_MESSAGE + 1))
        assert await client.recv() == b""

    run(main())


def test_websocket_wrong_path_and_text_frames(pki: Pki) -> None:
    async def wrong_path() -> tuple[BaseException, BaseException]:
        results = await asyncio.gather(*ws_pair_calls(pki, "/other"), return_exceptions=True)
        return results[0], results[1]  # type: ignore[return-value]

    client_error, server_error = run(wrong_path())
    assert str(client_error) == "WebSocket upgrade to /other refused: HTTP 404 Not Found"
    assert str(server_error) == "WebSocket request for '/other', which is not '/usbip'"

    async def text_frame() -> None:
        client, server = await ws_pair(pki)
        client.protocol.send_text(b"hello")
        await client._flush()
        with pytest.raises(ChannelError, match="text WebSocket frame"):
            await server.recv()

    run(text_frame())


def ws_pair_calls(pki: Pki, path: str) -> list[Awaitable[WebSocketChannel]]:
    async def client_side(streams: asyncio.Future[tuple[TlsStream, TlsStream]]) -> WebSocketChannel:
        client, _ = await streams
        return await WebSocketChannel.client(client, "127.0.0.1", 443, path)

    async def server_side(streams: asyncio.Future[tuple[TlsStream, TlsStream]]) -> WebSocketChannel:
        _, server = await streams
        return await WebSocketChannel.server(server, "/usbip")

    streams = asyncio.ensure_future(tls_pair(pki))
    return [client_side(streams), server_side(streams)]


# --------------------------------------------------------------------------- the relay


def test_loopback_pair_is_private() -> None:
    kernel_end, relay_end = loopback_pair()
    with kernel_end, relay_end:
        assert kernel_end.getpeername() == relay_end.getsockname()
        assert kernel_end.getsockname()[0] == "127.0.0.1"
        assert kernel_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with pytest.raises(ConnectionRefusedError):  # its listener is gone
            socket.create_connection(kernel_end.getsockname()[:2], timeout=1).close()


RelayTest = Callable[[Channel, socket.socket, "asyncio.Task[str]"], Awaitable[None]]


def with_relay(pki: Pki, body: RelayTest, pending: bytes = b"", wss: bool = False) -> None:
    """Runs `body(peer channel, kernel socket, relay task)` around a live relay."""

    async def main() -> None:
        ours: Channel
        peer: Channel
        if wss:
            peer_ws, ours_ws = await ws_pair(pki)
            client, ours, peer = peer_ws.stream, ours_ws, peer_ws
        else:
            client, server = await tls_pair(pki)
            ours, peer = Channel(server), Channel(client)
        kernel_end, relay_end = loopback_pair()
        task = asyncio.create_task(relay(ours, relay_end, pending))
        kernel_end.setblocking(False)
        try:
            await body(peer, kernel_end, task)
        finally:
            kernel_end.close()
            client.abort()
            await asyncio.gather(task, return_exceptions=True)

    run(main())


def test_relay_moves_bytes_both_ways_early_bytes_first(pki: Pki) -> None:
    async def body(peer: Channel, kernel: socket.socket, task: asyncio.Task[str]) -> None:
        loop = asyncio.get_running_loop()
        await peer.send(b"URB-1")
        assert await kernel_read(kernel, len(b"EARLYURB-1")) == b"EARLYURB-1"
        big = bytes(range(256)) * 4096
        await asyncio.gather(loop.sock_sendall(kernel, big), expect(peer, big))

    with_relay(pki, body, pending=b"EARLY")


def test_relay_drops_the_kernel_side_when_the_peer_goes(pki: Pki) -> None:
    async def body(peer: Channel, kernel: socket.socket, task: asyncio.Task[str]) -> None:
        peer.abort()  # the outer connection dies
        async with asyncio.timeout(1):
            assert await asyncio.get_running_loop().sock_recv(kernel, 10) == b""
            why = await task
        assert why in (
            "the peer closed the connection",
            "connection lost: Connection reset by peer",
        )

    with_relay(pki, body)


def test_relay_closes_the_peer_when_the_kernel_ends(pki: Pki) -> None:
    async def body(peer: Channel, kernel: socket.socket, task: asyncio.Task[str]) -> None:
        kernel.close()
        async with asyncio.timeout(1):
            assert await peer.recv() == b""  # close_notify, then the end
            assert await task == "the local kernel closed the connection"

    with_relay(pki, body)


@pytest.mark.parametrize("wss", [False, True], ids=["tls", "wss"])
def test_relay_both_ways_at_once_through_full_buffers(pki: Pki, wss: bool) -> None:
    """Both directions busy, each reader slower than its writer: every socket
    fills up, so both flows stop and resume on partial writes many times."""
    size = 6 << 20
    down = bytes(range(251)) * (size // 251)  # a period that no chunk size divides
    up = bytes(range(241)) * (size // 241)

    async def body(peer: Channel, kernel: socket.socket, task: asyncio.Task[str]) -> None:
        loop = asyncio.get_running_loop()

        async def peer_sends() -> None:
            for start in range(0, len(down), 100_000):
                await peer.send(down[start : start + 100_000])

        async def kernel_reads() -> bytes:
            got = bytearray()
            while len(got) < len(down):
                chunk = await loop.sock_recv(kernel, 1000)
                assert chunk, f"the kernel's end closed after {len(got)} bytes"
                got += chunk
            return bytes(got)

        results = await asyncio.gather(
            peer_sends(), kernel_reads(), loop.sock_sendall(kernel, up), expect(peer, up)
        )
        assert results[1] == down
        assert not task.done()

    with_relay(pki, body, wss=wss)


def test_relay_reports_a_peer_reset_as_link_loss(pki: Pki) -> None:
    async def body(peer: Channel, kernel: socket.socket, task: asyncio.Task[str]) -> None:
        sock = peer.stream.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.abort()  # a reset, no close_notify
        async with asyncio.timeout(2):
            assert await asyncio.get_running_loop().sock_recv(kernel, 10) == b""
            assert await task == "connection lost: Connection reset by peer"

    with_relay(pki, body)


def test_relay_aborts_the_peer_when_the_kernel_resets(pki: Pki) -> None:
    async def body(peer: Channel, kernel: socket.socket, task: asyncio.Task[str]) -> None:
        kernel.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        kernel.close()
        async with asyncio.timeout(2):
            assert await task == "connection lost: Connection reset by peer"
            try:
                end = await peer.recv()
            except ConnectionResetError:
                end = b""
            assert end == b""  # no close_notify: the peer sees the link lost

    with_relay(pki, body)


def test_relay_answers_websocket_pings_while_data_flows(pki: Pki) -> None:
    async def body(peer: Channel, kernel: socket.socket, task: asyncio.Task[str]) -> None:
        assert isinstance(peer, WebSocketChannel)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(kernel, b"URB")
        peer.protocol.send_ping(b"are you there")
        await peer._flush()
        events: list[Any] = []
        payload = b""
        # The kernel's bytes and the pong cross the relay by different ways: either may come first.
        while payload != b"URB" or not any(
            getattr(e, "opcode", None) is Opcode.PONG for e in events
        ):
            data = await peer.stream.read()
            assert data, "the stream ended before the pong"
            peer.protocol.receive_data(data)
            new = peer.protocol.events_received()
            payload += peer._payload(new)
            events += new
        pong = next(e for e in events if getattr(e, "opcode", None) is Opcode.PONG)
        assert pong.data == b"are you there"
        assert payload == b"URB"

    with_relay(pki, body, wss=True)


def test_relay_stops_when_cancelled(pki: Pki) -> None:
    async def body(peer: Channel, kernel: socket.socket, task: asyncio.Task[str]) -> None:
        await peer.send(b"URB")
        assert await kernel_read(kernel, 3) == b"URB"  # the relay runs
        task.cancel()
        async with asyncio.timeout(2):
            assert await asyncio.get_running_loop().sock_recv(kernel, 10) == b""
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not [t for t in threading.enumerate() if t.name == "relay"]

    with_relay(pki, body)
