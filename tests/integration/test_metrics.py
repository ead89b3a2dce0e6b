"""Issue 15, item 3: both daemons' Prometheus metrics, scraped over HTTP during plug/unplug.

The real `usbip-hotplug run` and the real usbipa on the fake kernel, their
/metrics fetched over loopback and parsed with prometheus_client's own text
parser. Every value is waited for (the loop publishes after its next step),
never slept for.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice
from tests.helpers import wait_for
from tests.integration.daemon_rig import (
    exported,
    policy_text,
    rule,
    target,
    used_ports,
)
from tests.integration.tls_support import cli, client_flags, secure_usbipa
from tests.rig import command, env_for, stop, usbipa_process
from tests.tlscerts import Pki

DISK = FakeUsbDevice("1-1", 0x1D6B, 0x0104, serial="DISK01", product_name="Disk")
KEY = FakeUsbDevice("1-2", 0x2222, 0x0001, serial="KEY01", product_name="Key")
ROOT = Path(__file__).resolve().parents[2]
LOOPBACK_ANY_PORT = ("--listen", "127.0.0.1", "-t", "0")
URL = re.compile(r"serving metrics on (http://\S+/metrics)")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def eventually(url: str, check: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until `check` holds (bounded); the last scrape."""
    last: list[Samples] = []

    def ok() -> bool:
        last[:] = [scrape(url)]
        return check(last[0])

    try:
        wait_for(ok, 10, what)
    except AssertionError:
        raise AssertionError(f"{what}; last scrape: {last[0] if last else None}") from None
    return last[0]


@contextmanager
def usbipa(tree: FakeTree, state: Path, *args: str) -> Iterator[tuple[int, str]]:
    """usbipa with metrics on; yields (its USB/IP port, its metrics URL)."""
    log = state / "usbipa.log"
    with usbipa_process(env_for(tree, state), state, *args, log=log) as (_, ports):
        match = URL.search(log.read_text())  # logged before READY
        assert match, log.read_text()
        yield ports["tcp"], match.group(1)


def test_metrics_of_both_daemons_during_plug_link_loss_and_unplug(
    tree: FakeTree, state: Path, daemons: Any, tmp_path: Path
) -> None:
    """Device states by rule, export/unexport counters by target and result, the
    plug-to-exported histogram, link losses, retries and backoff, usbip-host's
    table; usbipa's attached ports by allow entry, refusals by reason, the
    control-phase histogram. Metrics come from the config keys here:
    `settings.metrics.listen` and usbipa.yaml's `metrics.listen`."""
    config = tmp_path / "usbipa.yaml"
    config.write_text(
        "allow:\n  - from: 127.0.0.0/8\n    devices: ['1d6b:*']\nmetrics:\n  listen: 127.0.0.1:0\n"
    )
    with usbipa(tree, state, "-c", str(config)) as (port, app_url):
        # Keys go to "slow": one failed round, then a 27-30 s wait, unplugged in it.
        slow = target(port, retry="retry: {initial: 30, max: 30, jitter: 0.1}")
        policy = policy_text(
            {"lab": target(port), "slow": slow},
            [rule("disks", "1d6b", "lab"), rule("keys", "2222", "slow")],
            settings="metrics: {listen: '127.0.0.1:0'}",
        )
        daemon = daemons(policy).start()
        match = URL.search(daemon.text())
        assert match, daemon.text()
        dev_url = match.group(1)
        idle = scrape(dev_url)
        assert value(idle, "usbip_hotplug_busid_table_slots") == 16
        assert value(idle, "usbip_hotplug_busid_table_slots_used") == 0
        assert not [k for k in idle if k[0] == "usbip_hotplug_devices"]
        assert value(scrape(app_url), "usbipa_refusals_total", reason="device_not_allowed") == 0

        daemon.plug(DISK, devnum=3)
        wait_for(lambda: exported(tree, "1-1"), 5, "1-1 exported")
        dev = eventually(
            dev_url,
            lambda s: value(s, "usbip_hotplug_devices", state="exported", rule="disks") == 1,
            "the disk counted as exported",
        )
        assert value(dev, "usbip_hotplug_exports_total", target="lab", result="ok") == 1
        assert value(dev, "usbip_hotplug_export_latency_seconds_count", target="lab") == 1
        latency = value(dev, "usbip_hotplug_export_latency_seconds_sum", target="lab")
        assert latency is not None and 0 < latency < 5
        assert value(dev, "usbip_hotplug_busid_table_slots_used") == 1
        app = scrape(app_url)
        assert value(app, "usbipa_attached_ports", allow="0", client="") == 1
        assert value(app, "usbipa_control_phase_seconds_count", request="export") == 1

        # The key is not admitted by usbipa's entry: refused, to be retried after a backoff.
        daemon.plug(KEY, devnum=4)
        dev = eventually(
            dev_url,
            lambda s: value(s, "usbip_hotplug_devices", state="retrying", rule="keys") == 1,
            "the key's failed round backed off",
        )
        assert value(dev, "usbip_hotplug_exports_total", target="slow", result="error") == 1
        assert value(dev, "usbip_hotplug_export_retries_total", target="slow") == 1
        assert value(dev, "usbip_hotplug_backoff_seconds_count", target="slow") == 1
        wait = value(dev, "usbip_hotplug_backoff_seconds_sum", target="slow")
        assert wait is not None and 26 < wait <= 30
        assert value(dev, "usbip_hotplug_busid_table_slots_used") == 1  # given back to wait
        app = scrape(app_url)
        assert value(app, "usbipa_refusals_total", reason="device_not_allowed") == 1
        assert value(app, "usbipa_refusals_total", reason="other") == 0
        daemon.unplug("1-2")

        # The link dies on the application side: counted, and the disk exported again.
        first = exported(tree, "1-1")
        assert first is not None
        tree.vhci().detach(first.port)
        dev = eventually(
            dev_url,
            lambda s: value(s, "usbip_hotplug_exports_total", target="lab", result="ok") == 2,
            "the disk exported again after the link loss",
        )
        assert value(dev, "usbip_hotplug_link_losses_total", target="lab") == 1
        # Only the plug event starts the plug-to-exported clock, not a re-export.
        assert value(dev, "usbip_hotplug_export_latency_seconds_count", target="lab") == 1

        daemon.unplug("1-1")
        wait_for(lambda: not used_ports(tree), 5, "the port of 1-1 freed")
        dev = eventually(
            dev_url,
            lambda s: (
                value(s, "usbip_hotplug_unexports_total", target="lab", result="ok") == 1
                and not [k for k in s if k[0] == "usbip_hotplug_devices"]
            ),
            "the disk unexported and gone",
        )
        # The fake kernel, like Debian's 6.1, keeps an unplugged device's table entry.
        assert value(dev, "usbip_hotplug_busid_table_slots_used") == 1
        assert value(dev, "usbip_hotplug_busid_table_slots_leaked") == 1
        app = eventually(
            app_url,
            lambda s: not [k for k in s if k[0] == "usbipa_attached_ports"],
            "no port attached any more",
        )
        assert value(app, "usbipa_control_phase_seconds_count", request="unexport") == 1


# --------------------------------------------------------------------------- a real Prometheus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed: scripts/bootstrap installs it (Debian package)")
    return path


@contextmanager
def prometheus(tmp_path: Path, jobs: dict[str, str]) -> Iterator[Callable[[str], list[Any]]]:
    """Debian's Prometheus on loopback, scraping each job's URL every second;
    yields query(PromQL) -> the result vector of /api/v1/query."""
    tmp_path.mkdir()
    config = tmp_path / "prometheus.yml"
    scrapes = [
        {
            "job_name": job,
            "metrics_path": urllib.parse.urlsplit(url).path,
            "static_configs": [{"targets": [urllib.parse.urlsplit(url).netloc]}],
        }
        for job, url in jobs.items()
    ]
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": scrapes,
            }
        )
    )
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={address}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as reply:
            return json.loads(reply.read()) if path.startswith("/api/") else reply.status

    def ready() -> bool:
        assert proc.poll() is None, f"prometheus exited: {log.read_text()}"
        try:
            return bool(get("/-/ready") == 200)
        except OSError:
            return False

    def query(promql: str) -> list[Any]:
        answer = get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert answer["status"] == "success", answer
        result: list[Any] = answer["data"]["result"]
        return result

    try:
        wait_for(ready, 30, "prometheus ready")
        yield query
    finally:
        stop(proc)


def scalar(result: list[Any]) -> float | None:
    """The value of a one-element vector (None: empty)."""
    if not result:
        return None
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_a_real_prometheus_scrapes_both_daemons_during_plug_and_unplug(
    tree: FakeTree, state: Path, daemons: Any, tmp_path: Path
) -> None:
    """Issue 15, item 3: Debian's Prometheus scrapes both daemons (enabled here with
    --metrics-listen) every second; PromQL through its HTTP API sees the plug and
    the unplug."""
    metrics = ("--metrics-listen", "127.0.0.1:0")
    with usbipa(tree, state, "--allow", "127.0.0.0/8", *metrics) as (port, app_url):
        policy = policy_text({"lab": target(port)}, [rule("disks", "1d6b", "lab")])
        daemon = daemons(policy).start(*metrics)
        match = URL.search(daemon.text())
        assert match, daemon.text()
        jobs = {"usbip-hotplug": match.group(1), "usbipa": app_url}
        with prometheus(tmp_path / "prom", jobs) as query:
            seen: dict[str, float | None] = {}

            def holds(expected: dict[str, float | None]) -> bool:
                seen.update({q: scalar(query(q)) for q in expected})
                return all(seen[q] == v for q, v in expected.items())

            def expect(expected: dict[str, float | None], what: str) -> None:
                try:
                    wait_for(lambda: holds(expected), 20, what)
                except AssertionError:
                    raise AssertionError(f"{what}: PromQL gave {seen}") from None
                print(f"{what}:", {q: seen[q] for q in expected})

            expect({'sum(up{job=~"usbip-hotplug|usbipa"})': 2}, "both daemons up")
            daemon.plug(DISK, devnum=3)
            wait_for(lambda: exported(tree, "1-1"), 5, "1-1 exported")
            expect(
                {
                    'usbip_hotplug_devices{job="usbip-hotplug",state="exported",rule="disks"}': 1,
                    'usbip_hotplug_exports_total{target="lab",result="ok"}': 1,
                    'usbip_hotplug_export_latency_seconds_count{target="lab"}': 1,
                    "usbip_hotplug_busid_table_slots_used": 1,
                    'sum(usbipa_attached_ports{job="usbipa"})': 1,
                    'usbipa_control_phase_seconds_count{request="export"}': 1,
                },
                "plugged",
            )
            daemon.unplug("1-1")
            wait_for(lambda: not used_ports(tree), 5, "the port of 1-1 freed")
            expect(
                {
                    'usbip_hotplug_devices{state="exported"}': None,  # stale: gone
                    'usbip_hotplug_unexports_total{target="lab",result="ok"}': 1,
                    "usbip_hotplug_busid_table_slots_leaked": 1,
                    "sum(usbipa_attached_ports)": None,
                    'usbipa_control_phase_seconds_count{request="unexport"}': 1,
                    "sum(usbipa_refusals_total)": 0,
                    "histogram_quantile(1, usbip_hotplug_export_latency_seconds_bucket)"
                    " <= bool 5": 1,
                },
                "unplugged",
            )
            # The Grafana dashboard's queries are PromQL this Prometheus accepts.
            dashboard = json.loads((ROOT / "contrib" / "grafana-dashboard.json").read_text())
            for panel in dashboard["panels"]:
                for query_target in panel.get("targets", []):
                    expr = query_target["expr"].replace("$__rate_interval", "5s")
                    query(re.sub(r"\$\w+", ".*", expr))  # asserts status "success"


# --------------------------------------------------------------------------- edges


def test_a_metrics_port_in_use_stops_the_start_with_the_reason(
    tree: FakeTree, state: Path, tmp_path: Path
) -> None:
    """Both programs refuse to start (exit 1, one line saying where and why)
    rather than run without the metrics the admin asked for; nothing is left."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        metrics = ("--metrics-listen", busy)
        policy = tmp_path / "policy.yaml"
        policy.write_text(policy_text({"lab": target(9)}, [rule("d", "1d6b", "lab")]))
        env = env_for(tree, state)
        device = subprocess.run(
            [*command("usbip-hotplug"), "run", "-c", str(policy), *metrics],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        app = subprocess.run(
            [*command("usbipa"), *LOOPBACK_ANY_PORT, *metrics],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    why = f"cannot serve metrics on {busy}: Address already in use"
    assert (device.returncode, device.stderr.strip()) == (1, f"usbip-hotplug: {why}")
    assert (app.returncode, app.stderr.strip()) == (1, f"usbipa: {why}")
    assert not list((state / "device").glob("*.sock"))  # no control socket left behind


def test_a_reload_moves_the_metrics_endpoint(
    tree: FakeTree, state: Path, daemons: Any, tmp_path: Path
) -> None:
    """settings.metrics.listen follows `systemctl reload`: off, on, elsewhere."""
    rules = [rule("disks", "1d6b", "lab")]
    daemon = daemons(policy_text({"lab": target(9)}, rules))
    daemon.start()
    assert not URL.search(daemon.text())  # off by default

    def reload(settings: str) -> str:
        daemon.policy.write_text(policy_text({"lab": target(9)}, rules, settings=settings))
        before = len(URL.findall(daemon.text()))
        daemon.signal(signal.SIGHUP)
        urls = wait_for(
            lambda: (found := URL.findall(daemon.text()))[before:] and found,
            10,
            "the metrics endpoint announced",
        )
        return str(urls[-1])

    first = reload("metrics: {listen: '127.0.0.1:0'}")
    assert value(scrape(first), "usbip_hotplug_busid_table_slots") == 16
    elsewhere = "[::1]:0" if socket.has_ipv6 else "localhost:0"
    second = reload(f"metrics: {{listen: '{elsewhere}'}}")
    assert value(scrape(second), "usbip_hotplug_busid_table_slots") == 16
    try:
        scrape(first)
    except OSError:
        pass
    else:
        raise AssertionError(f"{first} still served after the move")


def test_tls_sessions_are_labelled_by_allow_entry_and_fingerprint(
    tree: FakeTree, state: Path, pki: Pki
) -> None:
    """Not by address; and a client without a certificate counts as a tls refusal."""
    tree.add_device(DISK, devnum=5)
    args = ("--metrics-listen", "127.0.0.1:0", "--allow-client", "CN=lab-*")
    with secure_usbipa(tree, state, pki, *args, allow=None) as (proc, ports):
        assert proc.stderr is not None
        url = wait_for(lambda: URL.search(proc.stderr.readline()), 10, "the metrics URL")[1]
        remote = f"tls://127.0.0.1:{ports['tls']}"
        no_cert = ["--ca", str(pki.ca)]
        assert cli(tree, state, "connect", "-r", remote, "-b", "1-1", *no_cert).returncode == 1
        eventually(
            url,
            lambda s: value(s, "usbipa_refusals_total", reason="tls") == 1,
            "the handshake without a certificate counted",
        )
        result = cli(tree, state, "connect", "-r", remote, "-b", "1-1", *client_flags(pki))
        assert result.returncode == 0, result.stderr
        der = ssl.PEM_cert_to_DER_cert(pki.client.cert.read_text())
        prefix = hashlib.sha256(der).hexdigest()[:16]
        samples = scrape(url)
        assert value(samples, "usbipa_attached_ports", allow="0", client=prefix) == 1
        assert not [k for k in samples if "127.0.0.1" in str(k)]
