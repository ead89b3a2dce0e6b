"""usbipa's connection slots under a flood of peers it should not serve.

Issue 12, finding 4: limits were counted before the allow list was asked, so
peers no entry admits filled `max_connections` from a few addresses and held
each slot for `control_timeout`. The floods here come from many loopback
source addresses (127.0.0.0/8 is all ours), against the real usbipa.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import yaml

from hotplug.app.config import Limits
from hotplug.testing.fake_kernel import FakeTree
from hotplug.wire.protocol import ExportStatus
from tests.fault.checks import closed_by_server
from tests.helpers import wait_for
from tests.integration.export_facts import used_ports
from tests.integration.raw_peers import Peers, record
from tests.integration.tls_support import secure_usbipa
from tests.rig import running_usbipa
from tests.tlscerts import Pki

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "usbipa.service"


def config_file(state: Path, allow: list[dict[str, str]], **limits: float) -> str:
    path = state / "usbipa.yaml"
    path.write_text(yaml.safe_dump({"allow": allow, "limits": {"control_timeout": 30, **limits}}))
    return str(path)


def flood(
    stack: ExitStack, port: int, sources: Iterator[str], per_source: int
) -> list[socket.socket]:
    """Idle connections, `per_source` from each address: they send nothing."""
    socks = []
    for source in sources:
        for _ in range(per_source):
            sock = socket.create_connection(("127.0.0.1", port), 5, (source, 0))
            socks.append(stack.enter_context(sock))
    return socks


def addresses(prefix: str, count: int) -> Iterator[str]:
    return (f"{prefix}.{i}" for i in range(2, 2 + count))


def held(socks: list[socket.socket]) -> int:
    return sum(1 for sock in socks if not closed_by_server(sock, 0))


def test_address_no_entry_admits_is_refused_at_accept(tree: FakeTree, state: Path) -> None:
    """Issue 12, finding 4: connections from addresses no allow entry could admit
    are closed at once instead of holding a slot for control_timeout (30 s here),
    so they cannot lock the allowed peer out."""
    cfg = config_file(state, [{"from": "127.0.0.1/32"}], max_connections=16)
    with running_usbipa(tree, state, "-c", cfg, allow="") as (proc, port), ExitStack() as stack:
        strangers = flood(stack, port, addresses("127.0.9", 40), 1)
        for sock in strangers:
            assert closed_by_server(sock, 5), "a stranger's connection was held"
        assert Peers(stack, port=port).export(record()) == ExportStatus.ATTACHED
        wait_for(lambda: len(used_ports(tree)) == 1, 10, "usbipa to attach (it replies first)")
        stack.close()
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "refused connection from 127.0.9.2: no allow entry admits this address" in log


def test_one_prefix_cannot_take_every_slot(tree: FakeTree, state: Path) -> None:
    """Issue 12, finding 4: connections are counted per /24 (IPv4) and /64 (IPv6)
    as well as per address: 30 addresses of one /24, each within its own
    per-address limit, hold only per_prefix_connections slots between them, and
    a peer from elsewhere still exports."""
    cfg = config_file(
        state,
        [{"from": "127.0.0.0/8"}],
        max_connections=64,
        per_peer_connections=4,
        per_prefix_connections=8,
    )
    with running_usbipa(tree, state, "-c", cfg, allow="") as (proc, port), ExitStack() as stack:
        hostile = flood(stack, port, addresses("127.0.9", 30), 4)
        assert Peers(stack, port=port).export(record()) == ExportStatus.ATTACHED
        wait_for(lambda: held(hostile) == 8, 5, "all but 8 of the /24's connections refused")
        stack.close()
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.stderr is not None
    assert "too many connections from 127.0.9.0/24" in proc.stderr.read()


def test_slots_are_kept_for_authorized_peers(tree: FakeTree, state: Path, pki: Pki) -> None:
    """Issue 12, finding 4: with certificate-only entries, any address may be a
    client until its handshake, so strangers fill slots; the last eighth of
    max_connections is kept for peers already authorized, and such a peer
    exports again while strangers hold all they may."""
    cfg = config_file(
        state,
        [{"client": "CN=lab-1"}],
        max_connections=16,
        per_peer_connections=64,
    )
    with secure_usbipa(tree, state, pki, "-c", cfg, allow=None) as (proc, ports):
        with ExitStack() as stack:
            peers = Peers(stack, pki, ports["tls"])
            assert peers.export(record(), pki.client) == ExportStatus.ATTACHED
            strangers = flood(stack, ports["tls"], addresses("127.0.9", 20), 1)
            wait_for(lambda: held(strangers) == 14, 5, "strangers held to 16 - 16 // 8")
            assert peers.export(record("1-2"), pki.client) == ExportStatus.ATTACHED
            # The reply goes out before `attach` (issue 16): the port follows it.
            wait_for(lambda: len(used_ports(tree)) == 2, 5, "both ports attached")
        proc.terminate()
        proc.wait(timeout=10)


def test_unit_allows_descriptors_for_max_connections() -> None:
    """Issue 12, finding 4: systemd's default LimitNOFILE (1024) is what
    max_connections allows by default, with nothing left for sessions, relays
    and listeners; the unit gives several descriptors per connection."""
    match = re.search(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.MULTILINE)
    assert match, "systemd/usbipa.service sets no LimitNOFILE"
    assert int(match.group(1)) >= 4 * Limits.max_connections
