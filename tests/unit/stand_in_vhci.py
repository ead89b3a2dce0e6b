"""A stand-in for usbipa's vhci (`StandInVhci`: its ports from a table, each
enumerated or not) and the `session` usbipa would record for one of its ports.
Shared by the unit tests of usbipa's sessions and of its metrics.

It answers `enumerated()` from the table, the way `Vhci.enumerated` answers from
sysfs (tests/unit/test_app_sessions.py checks that the fake kernel's tree agrees).
"""

from __future__ import annotations

from hotplug.app.sessions import Session
from hotplug.kernel.vhci import PortRecord, PortState, VhciPort

DEVID = (17 << 16) | 3


class StandInVhci:
    """vhci ports from a table: port -> (state, enumerated); records detaches."""

    def __init__(self, table: dict[int, tuple[int, bool]]) -> None:
        self.table = table
        self.detached: list[int] = []
        self.awake: set[int] = set()
        self.other_hub: set[int] = set()  # ports on controller 1's root hub

    def ports(self) -> list[VhciPort]:
        return [
            VhciPort(
                "hs",
                n,
                state,
                3,
                DEVID if state == PortState.USED else 0,
                5,
                f"1-{n + 1}",
                1 if n in self.other_hub else 0,
            )
            for n, (state, _) in sorted(self.table.items())
        ]

    def enumerated(self, port: VhciPort) -> bool:
        return self.table[port.port][1]

    def keep_awake(self, port: VhciPort) -> None:
        self.awake.add(port.port)

    def detach(self, port: int) -> None:
        self.detached.append(port)
        self.table[port] = (PortState.NULL, False)

    def write_record(self, port: int, record: PortRecord) -> None:
        pass

    def remove_record(self, port: int) -> None:
        pass


def session(port: int, since: float, busid: str) -> Session:
    return Session(
        port=port,
        peer="127.0.0.1",
        peer_port=40000 + port,
        busid=busid,
        devid=DEVID,
        vendor=0x1D6B,
        product=0x0104,
        speed=3,
        since=since,
    )
