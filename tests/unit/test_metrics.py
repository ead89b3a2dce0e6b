"""Issue 15, item 3: the metrics settings, the endpoint, and the families no plug shows.

The plug/unplug story is in tests/integration/test_metrics.py (real daemons,
scraped over HTTP, and a real Prometheus); here: what a config or flag may
say and what it is told when wrong, the server's own behaviour, usbipa's
refusal reasons as its real code words them, enumeration timeouts and relay
bytes.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from hotplug._metrics_http import MAX_CLIENTS
from hotplug.app import cli as app_cli
from hotplug.app.config import (
    AllowRule,
    AppdConfig,
    ConfigError,
    Limits,
    authorize,
    parse_config,
    parse_network,
    with_cli,
)
from hotplug.app.metrics import REASONS, refusal_reason
from hotplug.app.server import Appd, _record_problem
from hotplug.device import cli
from hotplug.device.policy.merge import parse_policy
from hotplug.device.policy.model import PolicyError
from hotplug.kernel.vhci import PortState
from hotplug.metrics import MetricsError, MetricsServer
from hotplug.usb import Speed
from hotplug.wire.address import AddressError, Endpoint, parse_listen
from hotplug.wire.channel import Channel
from hotplug.wire.peercert import PeerCert, parse_subject_pattern
from hotplug.wire.relay import loopback_pair, relay
from tests.helpers import disk_record, wait_for
from tests.tlscerts import Pki
from tests.unit.stand_in_vhci import StandInVhci, session
from tests.unit.tls_streams import expect, kernel_read, run, tls_pair

# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9100", "127.0.0.1", 9100),
        ("[::1]:9100", "::1", 9100),
        ("[::]:9100", "::", 9100),
        ("0.0.0.0:9100", "0.0.0.0", 9100),
        ("localhost:0", "localhost", 0),
    ],
)
def test_listen_addresses(text: str, host: str, port: int) -> None:
    assert parse_listen(text) == Endpoint(host, port)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("::1:9100", "put an IPv6 address in brackets, e.g. '[::1]:9100'"),
        ("127.0.0.1", "expected host:port"),
        ("[::1]", "expected host:port"),
        (":9100", "missing host (0.0.0.0 for every IPv4 address, [::] for every address)"),
        ("127.0.0.1:65536", "port must be a number from 0 to 65535, got '65536'"),
        ("127.0.0.1:http", "port must be a number from 0 to 65535, got 'http'"),
        ("[lab]:9100", "'lab' is not an IPv6 address"),
        ("[::1:9100", "missing ']'"),
    ],
)
def test_bad_listen_addresses_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(AddressError, match=re.escape(message)):
        parse_listen(text)


# --------------------------------------------------------------------------- the policy key


def policy(settings: str) -> str:
    return "version: 1\nsettings:\n" + settings


def test_policy_metrics_listen() -> None:
    parsed = parse_policy([("p.yaml", policy("  metrics:\n    listen: '[::1]:9100'\n"))])
    assert parsed.settings.metrics_listen == Endpoint("::1", 9100)
    assert parse_policy([("p.yaml", "version: 1\n")]).settings.metrics_listen is None
    # As the shipped example has it: the section, its key commented out.
    off = parse_policy([("p.yaml", policy("  metrics:\n    # listen: x\n"))])
    assert off.settings.metrics_listen is None


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (
            "  metrics:\n    listen: '::1:9100'\n",
            "p.yaml:4: settings.metrics.listen: '::1:9100': put an IPv6 address in brackets",
        ),
        (
            "  metrics:\n    listen: 127.0.0.1\n",
            "p.yaml:4: settings.metrics.listen: '127.0.0.1': expected host:port",
        ),
        (
            "  metrics:\n    lisen: 127.0.0.1:9100\n",
            "p.yaml:4: settings.metrics.lisen: unknown key; did you mean 'listen'?",
        ),
        ("  metrics: 9100\n", "p.yaml:3: settings.metrics: expected a mapping with 'listen'"),
        ("  metrics:\n    listen: [a, b]\n", "p.yaml:4: settings.metrics.listen: expected host"),
    ],
)
def test_policy_metrics_errors_have_file_and_line(settings: str, error: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy([("p.yaml", policy(settings))])
    assert str(caught.value).startswith(error), str(caught.value)


# --------------------------------------------------------------------------- usbipa.yaml, flags


def test_usbipa_metrics_listen_and_the_flag_over_it() -> None:
    config = parse_config("metrics:\n  listen: 127.0.0.1:9101\n", "usbipa.yaml")
    assert config.metrics_listen == Endpoint("127.0.0.1", 9101)
    assert parse_config("metrics:\n  # listen: x\n", "usbipa.yaml").metrics_listen is None
    flag = with_cli(config, [], None, [], [], metrics_listen=Endpoint("::1", 9102))
    assert flag.metrics_listen == Endpoint("::1", 9102)
    assert with_cli(config, [], None, [], []).metrics_listen == Endpoint("127.0.0.1", 9101)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("metrics:\n  listen: '::1:9101'\n", "usbipa.yaml:2: metrics.listen: '::1:9101': put an"),
        ("metrics:\n  listen: 9101\n", "usbipa.yaml:2: metrics.listen: expected host:port"),
        ("metrics:\n  port: 9101\n", "usbipa.yaml:2: metrics"),
        ("metrics: on\n", "usbipa.yaml:1: metrics: expected a mapping with listen"),
    ],
)
def test_usbipa_metrics_errors(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "usbipa.yaml")
    assert str(caught.value).startswith(error), str(caught.value)


def test_both_flags_refuse_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    good = cli.build_parser().parse_args(["run", "--metrics-listen", "[::1]:9100"])
    assert good.metrics_listen == Endpoint("::1", 9100)
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["run", "--metrics-listen", "::1:9100"])
    assert exited.value.code == 2
    assert "put an IPv6 address in brackets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app_cli.run_parser().parse_args(["--metrics-listen", "127.0.0.1"])
    assert "--metrics-listen: '127.0.0.1': expected host:port" in capsys.readouterr().err


# --------------------------------------------------------------------------- the server


def test_the_server_serves_the_registry_on_ipv6_loopback_and_stops() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    registry = CollectorRegistry()
    Counter("demo_things", "Things.", registry=registry).inc(3)
    server = MetricsServer(registry)
    url = server.start(Endpoint("::1", 0))
    try:
        assert url.startswith("http://[::1]:") and url.endswith("/metrics")
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert "demo_things_total 3.0" in reply.read().decode()
    finally:
        server.stop()
    with pytest.raises(OSError):  # the port is closed, not merely unserved
        urllib.request.urlopen(url, timeout=5)


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(CollectorRegistry())
        with pytest.raises(MetricsError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}: "):
            server.start(Endpoint("127.0.0.1", port))
        assert not server.running


def test_an_unknown_host_is_a_clear_error() -> None:
    match = r"cannot serve metrics on no-such-host\.invalid:9100: unknown host: "
    with pytest.raises(MetricsError, match=match):
        MetricsServer(CollectorRegistry()).start(Endpoint("no-such-host.invalid", 9100))


def test_a_flood_of_idle_connections_is_bounded_and_goes_away() -> None:
    """Each client holds a thread: past MAX_CLIENTS a connection is closed unread,
    and once the idle ones leave, scrapes are served again."""
    registry = CollectorRegistry()
    Counter("demo_things", "Things.", registry=registry).inc()
    server = MetricsServer(registry)
    url = server.start(Endpoint("127.0.0.1", 0))
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(MAX_CLIENTS)]
    try:
        # Polled: until the server has accepted every idle one, an extra one is served.
        def refused() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                try:
                    return extra.recv(100) == b""
                except ConnectionResetError:
                    return True

        wait_for(refused, 10, "a connection past MAX_CLIENTS closed unread")
    finally:
        for sock in idle:
            sock.close()
    try:

        def served() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    return "demo_things_total 1.0" in reply.read().decode()
            except OSError:
                return False

        wait_for(served, 10, "scrapes served again")
    finally:
        server.stop()


def test_commands_other_than_the_daemons_do_not_load_the_library() -> None:
    """`status`, `check`, `connect` and every tab completion import the daemon's
    module: prometheus_client (and its HTTP server) load only when a daemon starts."""
    code = (
        "import sys; from hotplug.app import cli as app_cli; "
        "from hotplug.device import cli, completion, daemon, daemon_cli, oneshot, status; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prometheus_client', "
        "'wsgiref')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


# --------------------------------------------------------------------------- usbipa's families


def stand_in_appd(tmp_path: Path, config: AppdConfig | None = None) -> tuple[Appd, StandInVhci]:
    vhci = StandInVhci({0: (PortState.USED, False)})
    config = config or AppdConfig(state_dir=str(tmp_path))
    return Appd(replace(config, state_dir=str(tmp_path)), vhci), vhci  # type: ignore[arg-type]


def sample(appd: Appd, name: str, **labels: str) -> float | None:
    return appd.metrics.registry.get_sample_value(name, labels)


def test_every_refusal_usbipa_words_has_its_reason(tmp_path: Path) -> None:
    """The messages as the real code makes them (not copies): a new wording that
    no longer maps would count as "other" and fail here."""
    lab = AllowRule((parse_network("127.0.0.0/8", "t"),), ("1d6b:*",), max_devices=1)
    config = AppdConfig(allow=(lab,))
    here = parse_network("127.0.0.1", "t").network_address
    cert = PeerCert((("CN", "lab-9"),), fingerprint="ab" * 32)
    words = {
        "not_allowed": [
            authorize(config, parse_network("192.0.2.1", "t").network_address, 1, 1, 0),
            authorize(config, parse_network("192.0.2.1", "t").network_address, 1, 1, 0, cert),
        ],
        "device_not_allowed": [authorize(config, here, 0x2222, 1, 0)],
        "max_devices": [authorize(config, here, 0x1D6B, 1, 1)],
    }
    limits = Limits(per_peer_connections=1, per_prefix_connections=2, max_connections=16)
    appd, _ = stand_in_appd(tmp_path, replace(config, limits=limits))
    slot = appd._slot_refusal
    words["address"] = [slot("192.0.2.1")]
    appd._count_in("127.0.0.1")
    words["peer_connections"] = [slot("127.0.0.1")]
    appd._count_in("127.0.0.2")
    words["prefix_connections"] = [slot("127.0.0.3")]
    appd.total_connections = 16
    words["max_connections"] = [slot("127.1.0.1")]
    # Inside the last eighth of the slots, kept for peers known to be admissible:
    # a stranger that only a certificate could admit is refused.
    appd.total_connections = 14
    by_cert = AllowRule((), clients=(parse_subject_pattern("CN=lab-*"),))
    appd.config = replace(appd.config, allow=(by_cert,))
    words["unproven_connections"] = [slot("192.0.2.9")]
    words["bad_record"] = [
        _record_problem(replace(disk_record(), busnum=0x10000)),
        _record_problem(replace(disk_record(), devnum=0x10000)),
        _record_problem(replace(disk_record(), speed=Speed.UNKNOWN)),
    ]
    for reason, messages in words.items():
        for message in messages:
            assert message is not None, reason
            assert refusal_reason(message) == reason, message
    assert refusal_reason("tls") == "tls" and refusal_reason("no_free_port") == "no_free_port"
    assert refusal_reason("something new") == "other"
    assert set(words) | {"tls", "no_free_port", "other"} == set(REASONS)


def test_enumeration_timeouts_are_counted(tmp_path: Path) -> None:
    appd, vhci = stand_in_appd(tmp_path)
    assert sample(appd, "usbipa_enumeration_timeouts_total") == 0
    appd.sessions.add(session(0, time.time() - 60, "17-1"))
    appd.sessions.clock[0] = time.monotonic() - 60  # 60 s without enumerating (limit 30)
    appd._detach_unenumerated()
    assert vhci.detached == [0]
    assert sample(appd, "usbipa_enumeration_timeouts_total") == 1


def test_attached_ports_are_labelled_by_allow_entry_not_address(tmp_path: Path) -> None:
    """An adopted session (no certificate known any more) still finds its entry."""
    other = AllowRule((parse_network("10.0.0.0/8", "t"),))
    lab = AllowRule((parse_network("127.0.0.0/8", "t"),))
    appd, _ = stand_in_appd(tmp_path, AppdConfig(allow=(other, lab)))
    appd.sessions.by_port[0] = session(0, time.time(), "17-1")
    assert sample(appd, "usbipa_attached_ports", allow="1", client="") == 1
    assert "127.0.0.1" not in str(list(appd.metrics.registry.collect()))


def test_relay_bytes_are_counted_both_ways(tmp_path: Path, pki: Pki) -> None:
    appd, _ = stand_in_appd(tmp_path)

    async def main() -> None:
        client, server = await tls_pair(pki)
        kernel_end, relay_end = loopback_pair()
        kernel_end.setblocking(False)
        task = asyncio.create_task(
            relay(Channel(server), relay_end, b"EARLY", appd.metrics.relayed)
        )
        peer = Channel(client)
        try:
            await peer.send(b"URB-1")
            assert await kernel_read(kernel_end, 10) == b"EARLYURB-1"
            big = bytes(range(256)) * 1024
            loop = asyncio.get_running_loop()
            await asyncio.gather(loop.sock_sendall(kernel_end, big), expect(peer, big))
        finally:
            kernel_end.close()
            client.abort()
            await asyncio.gather(task, return_exceptions=True)

    run(main())
    assert sample(appd, "usbipa_relay_bytes_total", direction="from_peer") == 10
    assert sample(appd, "usbipa_relay_bytes_total", direction="to_peer") == 256 * 1024


# --------------------------------------------------------------------------- docs


class StandInStub:
    def table(self) -> list[str]:
        return []

    def leftovers(self) -> list[str]:
        return []


def exposed() -> dict[str, set[str]]:
    """Our families as a scrape names them -> the sample names each has."""
    from hotplug.device.metrics import DeviceMetrics
    from hotplug.device.report import display_state

    appd = Appd(AppdConfig(), StandInVhci({}))  # type: ignore[arg-type]
    device = DeviceMetrics(StandInStub(), display_state)  # type: ignore[arg-type]
    found: dict[str, set[str]] = {}
    for registry in (device.registry, appd.metrics.registry):
        for family in registry.collect():
            if not family.name.startswith(("usbip_hotplug_", "usbipa_")):
                continue
            name = family.name + ("_total" if family.type == "counter" else "")
            suffixes = ("_bucket", "_sum", "_count") if family.type == "histogram" else ("",)
            found[name] = {family.name + s for s in suffixes} | {name}
    return found


def test_the_readme_lists_every_metric() -> None:
    """Issue 15, item 3: README's "Metrics" lists each family, and only those."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = set(re.findall(r"^\| `((?:usbip_hotplug|usbipa)_\w+)` \|", text, re.M))
    assert listed == set(exposed())


def test_the_grafana_dashboard_asks_only_for_metrics_that_exist() -> None:
    path = Path(__file__).resolve().parents[2] / "contrib" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    names = {n for samples in exposed().values() for n in samples}
    asked = {m for e in exprs for m in re.findall(r"(?<![$\w])(?:usbip_hotplug|usbipa)_\w+", e)}
    assert asked and asked <= names, sorted(asked - names)
    families = {f for f, samples in exposed().items() if samples & asked}
    assert families == set(exposed()), sorted(set(exposed()) - families)  # one panel each
