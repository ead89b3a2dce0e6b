"""The ports usbipa attached, mirrored to /run so that a restart can adopt them.

A `Session` is one attached device: the vhci port, who exported it (address,
and the client certificate when there is one) and which device it is. The
records under the state directory's ports/ are written and read here alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hotplug import log
from hotplug.kernel.sysfs import KernelError
from hotplug.kernel.vhci import PortRecord, PortState, Vhci, VhciPort
from hotplug.state import RecordDir, StateError
from hotplug.wire.protocol import DeviceRecord

logger = log.get("usbipa")


@dataclass
class Session:
    port: int
    peer: str  # device side's address
    peer_port: int
    busid: str  # the device's busid on the device side
    devid: int
    vendor: int
    product: int
    speed: int
    since: float
    client: str | None = None  # the TLS client certificate's subject, if it showed one
    client_id: str | None = None  # that certificate's identity (PeerCert.identity)
    path: str = ""  # the device's sysfs path on the device side, as its record says

    @property
    def owner(self) -> str:
        """Who exported it: the certificate itself when there is one (the
        address may change, e.g. behind NAT or a proxy; names can collide),
        else the address."""
        return self.client_id or self.peer

    @property
    def key(self) -> tuple[str, str]:
        return (self.owner, self.busid)

    def same_device(self, record: DeviceRecord) -> bool:
        """Whether `record` names the device this session carries, not merely
        one with the same busid on another machine behind the same address."""
        return (self.path, self.devid, self.vendor, self.product) == (
            record.path,
            record.devid,
            record.id_vendor,
            record.id_product,
        )


class Sessions:
    """Ports this daemon attached, mirrored to /run so a restart can adopt them."""

    def __init__(self, vhci: Vhci, directory: Path) -> None:
        self.vhci = vhci
        self.records = RecordDir(directory / "ports")
        self.by_port: dict[int, Session] = {}
        self.enumerated: set[int] = set()  # ports whose device got through enumeration
        # When each port's enumeration clock started (time.monotonic()): the
        # wall-clock `since` is for display only (issue 12, finding 14).
        self.clock: dict[int, float] = {}

    def find(self, peer: str, busid: str) -> Session | None:
        for session in self.by_port.values():
            if session.key == (peer, busid):
                return session
        return None

    def find_device(self, owner: str, record: DeviceRecord) -> Session | None:
        """The session of this very device from this owner (issue 12, finding 3)."""
        for session in self.by_port.values():
            if session.key == (owner, record.busid) and session.same_device(record):
                return session
        return None

    def find_unexported(self, owner: str, record: DeviceRecord) -> Session | None:
        """The session an UNEXPORT means: the same device if the record says which
        (busid alone is ambiguous when several device sides share an address),
        else the only one with that busid."""
        candidates = [s for s in self.by_port.values() if s.key == (owner, record.busid)]
        exact = [s for s in candidates if s.same_device(record)]
        if exact:
            return exact[0]
        return candidates[0] if len(candidates) == 1 else None

    def count_for(self, owner: str) -> int:
        return sum(1 for s in self.by_port.values() if s.owner == owner)

    def add(self, session: Session) -> None:
        self.by_port[session.port] = session
        self.clock[session.port] = time.monotonic()
        try:
            self.records.put(str(session.port), asdict(session))
            self.vhci.write_record(
                session.port, PortRecord(session.peer, str(session.peer_port), session.busid)
            )
        except (StateError, OSError) as exc:
            # The port works without its record; only a restart cannot adopt it.
            state_warning(
                f"cannot record port {session.port} ({exc}); a restarted usbipa will not adopt it",
                session.port,
            )

    def drop(self, port: int) -> Session | None:
        session = self.by_port.pop(port, None)
        self.enumerated.discard(port)
        self.clock.pop(port, None)
        try:
            self.records.remove(str(port))
            self.vhci.remove_record(port)
        except (StateError, OSError) as exc:
            state_warning(f"cannot remove the record of port {port}: {exc}", port)
        return session

    def adopt(self) -> None:
        """Take back the sessions of a previous run whose ports the kernel still holds."""
        live = {p.port: p for p in self.vhci.ports()}
        try:
            records = list(self.records.items())
        except (StateError, OSError) as exc:
            logger.error(
                "cannot read session records in %s: %s; ports attached before this start "
                "are not adopted",
                self.records.directory,
                getattr(exc, "strerror", None) or exc,
            )
            return
        for key, data in records:
            try:
                session = Session(**data)
            except TypeError:
                self.records.remove(key)
                continue
            port = live.get(session.port)
            if port is not None and port.holds(session.devid):
                self.by_port[session.port] = session
                self.clock[session.port] = time.monotonic()  # a clock does not survive us
                log.event(
                    logger,
                    logging.INFO,
                    f"adopted port {session.port}: {session.busid} from {session.peer}",
                    event="adopted",
                    busid=session.busid,
                    peer=session.peer,
                    port=session.port,
                )
            else:
                self.drop(session.port)
                log.event(
                    logger,
                    logging.INFO,
                    f"forgot port {session.port}: {session.busid} from {session.peer} "
                    "(the kernel no longer holds it)",
                    event="port-released",
                    busid=session.busid,
                    peer=session.peer,
                    port=session.port,
                )

    def reap(self) -> list[Session]:
        """Drop sessions whose port the kernel freed (link lost, detached by hand)."""
        live = {p.port: p for p in self.vhci.ports()}
        gone = []
        for number, session in list(self.by_port.items()):
            port = live.get(number)
            if port is None or not port.holds(session.devid):
                self.drop(number)
                gone.append(session)
        return gone

    def never_enumerated(self, timeout: float, now: float) -> list[Session]:
        """Sessions whose device is still not enumerated `timeout` s after attach.

        `now` is time.monotonic(): a wall-clock step must neither detach live
        sessions nor disable the rule (issue 12, finding 14).

        vhci_hcd keeps such a port, and its link, for good: the device side sees
        its stub "used" and believes the export works (seen on 6.1 in the VM).
        """
        live = {p.port: p for p in self.vhci.ports()}
        pending: dict[int, VhciPort] = {}
        for number in self.by_port:
            port = live.get(number)
            if port is None:
                continue
            if number in self.enumerated:
                # udev may switch autosuspend on after we first looked: re-check.
                self.keep_awake(port)
                continue
            if self.vhci.enumerated(port):
                self.enumerated.add(number)
                self.keep_awake(port)
            else:
                pending[number] = port
                self.clock.setdefault(number, now)
        stuck = []
        for number, port in pending.items():
            if self._waiting_for_hub(port, pending):
                self.clock[number] = now  # the hub has not reached it: not its fault yet
            elif now - self.clock[number] > timeout:
                stuck.append(self.by_port[number])
        return stuck

    def _waiting_for_hub(self, port: VhciPort, pending: dict[int, VhciPort]) -> bool:
        """Whether the root hub is still busy with an older port before this one.

        The hub enumerates one port at a time; while a port ahead of this one
        stalls it (a dead link takes the hub 12-35 s to give up on, issue 16),
        a port that still reads NOTASSIGNED has not been tried. A USED port has
        (vhci saw the hub's SET_ADDRESS), so its clock runs in any case.
        """
        if port.state != PortState.NOTASSIGNED:
            return False
        mine = self.clock[port.port]
        return any(
            other.port != port.port
            and (other.controller, other.hub) == (port.controller, port.hub)
            and self.clock[other.port] < mine
            for other in pending.values()
        )

    def keep_awake(self, port: VhciPort) -> None:
        """power/control = on for the device behind `port`: USB/IP cannot carry
        remote wakeup, so a device vhci lets autosuspend (udev enables it for
        some, e.g. QEMU's usb-kbd) would never send its input again (issue 16)."""
        try:
            self.vhci.keep_awake(port)
        except (KernelError, OSError) as exc:
            state_warning(f"cannot keep the device on port {port.port} awake: {exc}", port.port)


def state_warning(message: str, port: int) -> None:
    log.event(logger, logging.WARNING, message, event="state-error", port=port)
