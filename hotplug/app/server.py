"""usbipa, the application-side daemon: receives exports and attaches them to vhci_hcd.

One asyncio task per connection; each control phase is bounded in time and
size, so a slow or hostile client costs one connection and never the daemon.
Sockets are read with `sock_recv` of exactly the bytes the codec still needs:
nothing is read ahead, because once `attach` is written the stream belongs to
the kernel. The EXPORT reply is sent before `attach` (vhci writes its first
URB as soon as it is attached; docs/PROTOCOL.md); the port chosen is reserved
across that one await, so two exports never race for one port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotplug import log
from hotplug.app.config import (
    AppdConfig,
    IPAddress,
    admitted_by_address,
    authorize,
    authorize_peer,
    could_admit,
    peer_address,
    prefix_of,
)
from hotplug.app.link import LinkRefused, PlainLink, SecureLink, SecureServer
from hotplug.app.sessions import Session, Sessions
from hotplug.errors import HotplugError
from hotplug.kernel.sysfs import KernelError
from hotplug.kernel.vhci import Vhci
from hotplug.notify import Notifier
from hotplug.privdir import ensure_private_dir
from hotplug.state import default_dir
from hotplug.usb import Speed
from hotplug.wire.address import Endpoint
from hotplug.wire.peercert import PeerCert
from hotplug.wire.protocol import (
    Decoder,
    DeviceRecord,
    DevlistReply,
    DevlistRequest,
    ExportReply,
    ExportRequest,
    ExportStatus,
    ImportReply,
    ImportRequest,
    ImportStatus,
    NeedData,
    Op,
    Pdu,
    ProtocolError,
    UnexportReply,
    UnexportRequest,
    UnexportStatus,
    encode,
)
from hotplug.wire.sockets import Timeouts, tune_socket

logger = log.get("usbipa")

SESSION_POLL_INTERVAL = 2.0
REQUESTS = (Op.REQ_EXPORT, Op.REQ_UNEXPORT, Op.REQ_DEVLIST, Op.REQ_IMPORT)
# An address that passed authorization keeps its claim on the reserved
# connection slots this long after its last session (see _slot_refusal).
PROVEN_FOR = 3600.0
# Warnings any stranger can cause (refused connections, bad requests): at most
# LOG_BURST lines per kind every LOG_WINDOW s, then one line with the count.
LOG_BURST = 10
LOG_WINDOW = 10.0
# The kernel's devid is a __u32, (busnum << 16) | devnum: wider fields do not fit.
MAX_BUSNUM = MAX_DEVNUM = 0xFFFF


class ClosedBeforeRequest(Exception):
    """The peer closed its connection before sending a byte."""


@dataclass(frozen=True)
class _Reservation:
    """A free port promised to one export between its reply and its `attach`."""

    port: int
    speed: Speed
    record: DeviceRecord
    peer: str
    peer_port: int
    client: PeerCert | None
    who: str
    fields: dict[str, Any]


class BadRequest(HotplugError):
    """The peer broke the control phase; close its connection."""


class ListenError(HotplugError):
    """usbipa cannot listen where it was told to."""


class Appd:
    def __init__(self, config: AppdConfig, vhci: Vhci, notifier: Notifier | None = None) -> None:
        self.config = config
        self.vhci = vhci
        state_dir = Path(config.state_dir) if config.state_dir else default_dir("app")
        ensure_private_dir(state_dir)  # StateError: another owner's directory is refused
        self.sessions = Sessions(vhci, state_dir)
        self.notifier = notifier or Notifier()
        self.connections: dict[str, int] = {}
        self.prefix_connections: dict[str, int] = {}
        self.total_connections = 0
        self.proven: dict[str, float] = {}  # address -> when it last passed authorization
        self.throttle = Throttle()
        self.verified: dict[int, Session] = {}  # port -> session whose device was checked
        self.listeners: list[socket.socket] = []
        self.kinds: dict[socket.socket, str] = {}  # listener -> "tcp", "tls" or "wss"
        # TLS and WebSocket listeners; checks the certificate files now (CertError).
        self.secure = SecureServer(config) if config.tls is not None else None
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        # Ports promised to an export whose reply is being sent, not yet attached.
        self.reserved: dict[int, _Reservation] = {}
        from hotplug.app.metrics import AppdMetrics  # the library: not for `usbipa status`

        self.metrics = AppdMetrics(self)

    # ---------------------------------------------------------------- listening

    def open_listeners(self) -> list[socket.socket]:
        self._listen(self.config.port, "tls" if self.config.tls else "tcp")
        if self.config.wss is not None:
            self._listen(self.config.wss.port, "wss")
        if not self.listeners:
            raise ListenError("no address to listen on")
        return self.listeners

    def _listen(self, port: int, kind: str) -> None:
        addresses = self.config.listen
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # With both 0.0.0.0 and :: configured, each family gets its own socket.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port))
            except OSError as exc:
                sock.close()
                if family == socket.AF_INET6 and address == "::" and len(addresses) > 1:
                    logger.warning("not listening on [::]: %s", exc.strerror)
                    continue
                raise ListenError(
                    f"cannot listen on {address} port {port}: {exc.strerror}"
                ) from exc
            sock.listen(128)
            sock.setblocking(False)
            self.listeners.append(sock)
            self.kinds[sock] = kind

    @property
    def bound_port(self) -> int:
        port: int = self.listeners[0].getsockname()[1]
        return port

    async def serve(self) -> None:
        self.vhci.require_loaded()
        self.sessions.adopt()
        if not self.listeners:
            self.open_listeners()
        if not self.config.allow:
            logger.warning("no peer is allowed (default deny): every export will be refused")
        if self.secure is not None:
            self.secure.log_start()
        accepters = [
            asyncio.create_task(self._accept_loop(s, self.kinds.get(s, "tcp")))
            for s in self.listeners
        ]
        reaper = asyncio.create_task(self._reap_loop())
        names = ", ".join(self._listener_name(s) for s in self.listeners)
        logger.info("listening on %s", names)
        self.notifier.ready(self.status_line())
        try:
            await self.stopping.wait()
        finally:
            self.notifier.stopping()
            for task in [*accepters, reaper, *self.tasks]:
                task.cancel()
            await asyncio.gather(*accepters, reaper, *self.tasks, return_exceptions=True)
            for sock in self.listeners:
                sock.close()

    def stop(self) -> None:
        self.stopping.set()

    def status_line(self) -> str:
        names = ", ".join(self._listener_name(s) for s in self.listeners)
        return f"{len(self.sessions.by_port)} attached; listening on {names}"

    def _listener_name(self, sock: socket.socket) -> str:
        """'127.0.0.1:3240' (plain, as always), 'tls://…:3240', 'wss://…:443/path'."""
        kind = self.kinds.get(sock, "tcp")
        if kind == "tcp":
            return _sockname(sock)
        path = self.config.wss.path if kind == "wss" and self.config.wss else ""
        return f"{kind}://{_sockname(sock)}{path}"

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(SESSION_POLL_INTERVAL)
            self.notifier.watchdog()
            self._reap()
            self._detach_unenumerated()
            self._check_devices()
            self._forget_proven()
            self.throttle.flush(time.monotonic())

    def _check_devices(self) -> None:
        """Issue 12, finding 7: the peer's record is a claim; what enumerated
        behind vhci is what the kernel drives. Detach a device that is not the
        one `allow` admitted (its idVendor/idProduct differ from the record's)."""
        try:
            ports = {p.port: p for p in self.vhci.ports()}
        except KernelError as exc:
            logger.error("cannot read vhci status: %s", exc)
            return
        for number in [n for n in self.verified if n not in self.sessions.by_port]:
            del self.verified[number]
        for number, session in list(self.sessions.by_port.items()):
            port = ports.get(number)
            if port is None or self.verified.get(number) is session:
                continue
            ids = self.vhci.device_ids(port)
            if ids is None:
                continue  # not enumerated (yet)
            self.verified[number] = session
            if ids != (session.vendor, session.product):
                self._detach(
                    number,
                    f"the device that enumerated is {ids[0]:04x}:{ids[1]:04x}, not the "
                    f"{session.vendor:04x}:{session.product:04x} its export claimed",
                )

    def _forget_proven(self) -> None:
        now = time.monotonic()
        owners = {s.peer for s in self.sessions.by_port.values()}
        for peer, since in list(self.proven.items()):
            if peer in owners:
                self.proven[peer] = now
            elif now - since > PROVEN_FOR:
                del self.proven[peer]

    def _detach_unenumerated(self) -> None:
        # Only from the poll: an export pays for reap()'s status read, not this.
        timeout = self.config.limits.enumeration_timeout
        try:
            stuck = self.sessions.never_enumerated(timeout, time.monotonic())
        except KernelError as exc:
            logger.error("cannot read vhci status: %s", exc)
            return
        for session in stuck:
            # Closing the link is what tells the device side: its stub leaves
            # "used", and a hotplug daemon there exports the device again.
            self._detach(session.port, f"never enumerated within {timeout:g} s")
            self.metrics.enumeration_timeout()

    def _reap(self) -> None:
        try:
            gone = self.sessions.reap()
        except KernelError as exc:
            logger.error("cannot read vhci status: %s", exc)
            return
        for session in gone:
            log.event(
                logger,
                logging.INFO,
                f"port {session.port} released by the kernel: {session.busid} "
                f"from {session.peer} (link closed or detached)",
                event="port-released",
                busid=session.busid,
                peer=session.peer,
                port=session.port,
            )
        if gone:
            self.notifier.status(self.status_line())

    async def _accept_loop(self, listener: socket.socket, kind: str = "tcp") -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                logger.error("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            peer = str(peer_address(addr[0]))
            refusal = self._slot_refusal(peer)
            if refusal is not None:
                self.metrics.refused(refusal)
                message = f"refused connection from {peer}: {refusal}"
                self.throttle.warn("connection", message, event="refused", peer=peer)
                conn.close()
                continue
            self._count_in(peer)
            task = asyncio.create_task(self._handle(conn, peer, addr[1], kind))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _slot_refusal(self, peer: str) -> str | None:
        """Why a new connection from `peer` gets no slot, or None (issue 12, finding 4).

        Decided before anything is read: an address no allow entry could admit
        is refused at once; per address and per prefix counts stop one host
        from taking every slot; and the last eighth of `max_connections` is kept
        for peers known to be admissible (named by address in `allow`, or
        recently authorized), so a flood of strangers that might each hold a
        certificate cannot lock them out.
        """
        limits = self.config.limits
        address = peer_address(peer)
        if not could_admit(self.config, address):
            return "no allow entry admits this address"
        if self.connections.get(peer, 0) >= limits.per_peer_connections:
            return "too many connections from this peer"
        if self.prefix_connections.get(prefix_of(address), 0) >= limits.per_prefix_connections:
            return f"too many connections from {prefix_of(address)}"
        if self.total_connections >= limits.max_connections:
            return "too many connections"
        reserve = limits.max_connections // 8
        known = peer in self.proven or admitted_by_address(self.config, address)
        if not known and self.total_connections >= limits.max_connections - reserve:
            return "too many connections from peers not yet authorized"
        return None

    def _count_in(self, peer: str) -> None:
        prefix = prefix_of(peer_address(peer))
        self.connections[peer] = self.connections.get(peer, 0) + 1
        self.prefix_connections[prefix] = self.prefix_connections.get(prefix, 0) + 1
        self.total_connections += 1

    def _count_out(self, peer: str) -> None:
        prefix = prefix_of(peer_address(peer))
        self.connections[peer] -= 1
        if not self.connections[peer]:
            del self.connections[peer]
        self.prefix_connections[prefix] -= 1
        if not self.prefix_connections[prefix]:
            del self.prefix_connections[prefix]
        self.total_connections -= 1

    # ---------------------------------------------------------------- one connection

    async def _handle(
        self, conn: socket.socket, peer: str, peer_port: int, kind: str = "tcp"
    ) -> None:
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if kind == "tcp":
            # Issue 12, finding 9: a plain socket goes to vhci as it is, and the
            # kernel must notice a device side that vanished without a word
            # (secure links get the same in SecureServer.open).
            tune_socket(conn, Timeouts())
        handed_over = False
        link: PlainLink | SecureLink = PlainLink(conn)
        started, request = time.monotonic(), None  # for the control-phase histogram
        try:
            async with asyncio.timeout(self.config.limits.control_timeout):
                if kind != "tcp" and self.secure is not None:
                    link = await self.secure.open(conn, kind)
                request = await self._read_request(link)
                handed_over = await self._dispatch(link, request, peer, peer_port)
        except LinkRefused as exc:
            self.metrics.refused("tls")
            self.throttle.warn(
                "link", f"refused {kind} connection from {peer}: {exc}", event="refused", peer=peer
            )
        except TimeoutError:
            self.throttle.warn(
                "timeout", f"{peer}: control phase timed out", event="timeout", peer=peer
            )
        except BadRequest as exc:
            self.throttle.warn(
                "control", f"{peer}: closing connection: {exc}", event="bad-request", peer=peer
            )
        except ClosedBeforeRequest:
            # A port probe or health check (connect, then close): not malformed.
            log.event(logger, logging.DEBUG, f"{peer}: closed before sending a request", peer=peer)
        except ProtocolError as exc:
            self.throttle.warn(
                "malformed", f"{peer}: malformed request: {exc}", event="bad-request", peer=peer
            )
        except OSError as exc:
            log.event(logger, logging.INFO, f"{peer}: connection error: {exc}", peer=peer)
        finally:
            self._count_out(peer)
            link.finish(handed_over)
            self.metrics.control_phase(request, started)
        if handed_over and isinstance(link, SecureLink):
            await self._relay(link)

    async def _relay(self, link: SecureLink) -> None:
        """The data phase of a TLS or wss session: ours to carry, the kernel's to use."""
        port = link.port
        session = self.sessions.by_port.get(port) if port is not None else None
        why = await link.relay(self.metrics.relayed)
        if port is not None and session is not None and self.sessions.by_port.get(port) is session:
            # Its vhci socket is closed already, so the kernel frees the port by
            # itself; detaching now makes that immediate and says why.
            self._detach(port, f"encrypted link ended: {why}")

    async def _read_request(self, link: PlainLink | SecureLink) -> Pdu:
        decoder = Decoder(accept=REQUESTS)
        started = False
        while True:
            pdu = decoder.next_pdu()
            if not isinstance(pdu, NeedData):
                return pdu
            # An empty read is end of stream: the decoder turns a cut-short
            # request into a ProtocolError that says where it was cut.
            data = await link.recv(decoder.bytes_needed())
            if not data and not started:
                raise ClosedBeforeRequest
            started = True
            decoder.receive_data(data)

    async def _dispatch(
        self, link: PlainLink | SecureLink, request: Pdu, peer: str, peer_port: int
    ) -> bool:
        client = link.client
        if isinstance(request, ExportRequest):
            try:
                kernel_sock = link.kernel_socket()
            except OSError as exc:
                raise BadRequest(f"cannot make the relay's loopback connection: {exc}") from exc
            status, reserved = self._export(kernel_sock, request, peer, peer_port, client)
            if reserved is None:
                await link.send(encode(ExportReply(status)))
                return False
            attached = await self._reply_then_attach(link, kernel_sock, reserved)
            link.port = attached
            return attached is not None
        if isinstance(request, UnexportRequest):
            await link.send(encode(UnexportReply(self._unexport(request, peer, client))))
        elif isinstance(request, DevlistRequest):
            # usbipa exports nothing itself: an honest, empty list for `usbip list -r`.
            await link.send(encode(DevlistReply(0, ())))
        elif isinstance(request, ImportRequest):
            await link.send(encode(ImportReply(ImportStatus.NA, None)))
        else:
            raise BadRequest(f"unexpected {type(request).__name__}")
        return False

    def _export(
        self,
        conn: socket.socket,
        request: ExportRequest,
        peer: str,
        peer_port: int,
        client: PeerCert | None = None,
    ) -> tuple[int, int | None]:
        record = request.device
        fields: dict[str, Any] = {
            "peer": peer,
            "busid": record.busid,
            "vid_pid": f"{record.id_vendor:04x}:{record.id_product:04x}",
            "client": client.name if client is not None else None,
        }
        who = f"{peer} ({client.name})" if client is not None else peer
        reason = self._admit_export(record, peer, client)
        if reason is not None:
            self.metrics.refused(reason)
            self.throttle.warn(
                "export", f"refused export from {who}: {reason}", event="refused", **fields
            )
            return ExportStatus.FAILED, None
        speed = Speed(record.speed)
        port = self.vhci.find_free_port(speed, exclude=self.reserved)
        if port is None:
            kind = "SuperSpeed" if speed.needs_superspeed_port else "high-speed"
            self.metrics.refused("no_free_port")
            log.event(
                logger,
                logging.WARNING,
                f"refused export from {who}: no free {kind} port",
                event="no-port",
                **fields,
            )
            return ExportStatus.NO_FREE_PORT, None
        self.reserved[port.port] = _Reservation(
            port.port, speed, record, peer, peer_port, client, who, fields
        )
        return ExportStatus.ATTACHED, port.port

    async def _reply_then_attach(
        self, link: PlainLink | SecureLink, conn: socket.socket, port: int
    ) -> int | None:
        """Send the status-0 reply, then attach: the attached port, or None.

        vhci writes its first URB into the socket as soon as it is attached
        (100-280 ms later on 6.1, at once over the fake kernel); sent after
        it, the reply would reach the device side behind that URB (issue 16).
        The port stays reserved across the send, so no other export takes it.
        """
        # Plain TCP: corked, the reply waits in the send queue, ahead of
        # anything the kernel writes, until `attach` is done; so the device
        # side never sees status 0 for a port not yet attached.
        corked = isinstance(link, PlainLink) and _cork(conn, True)
        try:
            await link.send(encode(ExportReply(ExportStatus.ATTACHED)))
        except BaseException:
            self.reserved.pop(port, None)
            raise  # OSError: the peer is gone; nothing was attached
        reservation = self.reserved.pop(port)
        try:
            if not self._attach(conn, reservation):
                # The device side believes it is attached: closing the connection
                # (link.finish) is ordinary link loss to it, and it exports again.
                return None
        finally:
            if corked:
                _cork(conn, False)
        return port

    def _attach(self, conn: socket.socket, r: _Reservation) -> bool:
        conn.setblocking(True)  # the kernel does blocking I/O on it
        try:
            self.vhci.attach(r.port, conn, r.record.devid, r.speed)
        except KernelError as exc:
            conn.setblocking(False)
            log.event(
                logger,
                logging.ERROR,
                f"attach failed after the reply: {exc}; closing the connection, so the "
                "device side sees link loss and exports again",
                event="attach-failed",
                port=r.port,
                **r.fields,
            )
            return False
        conn.setblocking(False)
        record = r.record
        self.sessions.add(
            Session(
                port=r.port,
                peer=r.peer,
                peer_port=r.peer_port,
                busid=record.busid,
                devid=record.devid,
                vendor=record.id_vendor,
                product=record.id_product,
                speed=int(r.speed),
                since=time.time(),  # for display; timeouts use Sessions.clock
                client=r.client.name if r.client is not None else None,
                client_id=r.client.identity if r.client is not None else None,
                path=record.path,
            )
        )
        self.metrics.attached(r.port, r.peer, record, r.client)
        log.event(
            logger,
            logging.INFO,
            f"attached {record.busid} from {r.who} on port {r.port}",
            event="attached",
            port=r.port,
            **r.fields,
        )
        self.notifier.status(self.status_line())
        return True

    def _admit_export(self, record: DeviceRecord, peer: str, client: PeerCert | None) -> str | None:
        """Check an EXPORT before it touches any session; None if it may go ahead.

        Issue 12, finding 2: authorization comes first, so a refused client
        cannot withdraw anyone's device by exporting the same busid. Finding 3:
        only the same device (same owner, busid and record identity) replaces a
        session; another machine behind the same address keeps its own.
        Finding 6: the record must fit the kernel's fields.
        """
        problem = _record_problem(record)
        if problem is not None:
            return problem
        owner = client.identity if client is not None else peer
        self._reap()
        previous = self.sessions.find_device(owner, record)
        exported = self.sessions.count_for(owner) - (previous is not None)
        reason = authorize(
            self.config, _ip(peer), record.id_vendor, record.id_product, exported, client
        )
        if reason is not None:
            return reason
        self.proven[peer] = time.monotonic()
        if previous is not None:
            # The same device from the same peer again: its old link is stale
            # (the device side restarted or lost the link before we noticed).
            self._detach(previous.port, "replaced by a new export of the same device")
        return None

    def _unexport(
        self, request: UnexportRequest, peer: str, client: PeerCert | None = None
    ) -> UnexportStatus:
        """Detach what the sender exported, if an allow entry admits the sender
        (issue 12, finding 2): owned by its certificate, or else its address."""
        reason = authorize_peer(self.config, _ip(peer), client)
        who = f"{peer} ({client.name})" if client is not None else peer
        if reason is not None:
            self.metrics.refused(reason)
            self.throttle.warn(
                "unexport",
                f"refused unexport from {who}: {reason}",
                event="refused",
                peer=peer,
                busid=request.device.busid,
            )
            return UnexportStatus.NOT_FOUND
        self.proven[peer] = time.monotonic()
        owner = client.identity if client is not None else peer
        session = self.sessions.find_unexported(owner, request.device)
        if session is None:
            log.event(
                logger,
                logging.INFO,
                f"unexport from {who}: {request.device.busid} is not attached here",
                event="unexport-unknown",
                peer=peer,
                busid=request.device.busid,
            )
            return UnexportStatus.NOT_FOUND
        self._detach(session.port, "unexported by the device side")
        return UnexportStatus.DETACHED

    def _detach(self, port: int, why: str) -> None:
        session = self.sessions.by_port.get(port)
        with contextlib.suppress(KernelError):  # EINVAL: the kernel already freed it
            self.vhci.detach(port)
        self.sessions.drop(port)
        if session is not None:
            log.event(
                logger,
                logging.INFO,
                f"detached port {port}: {session.busid} from {session.peer} ({why})",
                event="detached",
                port=port,
                busid=session.busid,
                peer=session.peer,
            )
        self.notifier.status(self.status_line())


def _ip(peer: str) -> IPAddress:
    return peer_address(peer)


def _cork(conn: socket.socket, on: bool) -> bool:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))
    except OSError:
        return False
    return True


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Endpoint(host, port))


def _record_problem(record: DeviceRecord) -> str | None:
    """What in an EXPORT's record the kernel cannot take (issue 12, finding 6)."""
    if record.busnum > MAX_BUSNUM:
        return f"busnum {record.busnum} out of range (at most {MAX_BUSNUM})"
    if record.devnum > MAX_DEVNUM:
        return f"devnum {record.devnum} out of range (at most {MAX_DEVNUM})"
    if record.speed == Speed.UNKNOWN:
        return "device speed unknown (0): vhci_hcd attaches only a known speed"
    return None


class Throttle(log.Throttle):
    """Rate limit for the warnings strangers can cause (issue 12, finding 4):
    per kind, LOG_BURST lines per LOG_WINDOW s, then how many were left out."""

    def __init__(self) -> None:
        summary = "{count} more warnings like the last ({kind}) in {window:g} s not logged"
        super().__init__(logger, LOG_BURST, LOG_WINDOW, summary)

    def warn(self, kind: str, message: str, **fields: Any) -> None:
        self.log(logging.WARNING, kind, message, time.monotonic(), **fields)
