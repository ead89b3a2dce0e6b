"""The shipped operations files: systemd units, udev rule, example configs, install script."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hotplug.app import config as app_config
from hotplug.app.config import parse_config
from hotplug.device.policy.files import load_policy

REPO = Path(__file__).resolve().parents[2]


def unit(name: str) -> dict[str, list[str]]:
    """Key -> values (in order) of a unit file; comments and sections dropped."""
    values: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_hotplug_unit() -> None:
    u = unit("usbip-hotplug.service")
    assert u["Type"] == ["notify"] and u["Restart"] == ["on-failure"]
    assert u["WatchdogSec"] and u["ExecStart"][0].endswith("usbip-hotplug run")
    # Check first, then signal: a broken policy fails the reload before any HUP.
    assert [v.split()[0].rsplit("/", 1)[-1] for v in u["ExecReload"]] == ["usbip-hotplug", "kill"]
    assert u["ExecReload"][0].split()[1] == "check"
    assert u["ExecReload"][1].endswith("-HUP $MAINPID")
    assert any("modprobe usbip-host" in v and v.startswith("-") for v in u["ExecStartPre"])
    # settings.claim: before-probe is undone however the daemon ends (issue 14, item 3).
    assert [v.split()[1] for v in u["ExecStopPost"]] == ["restore-autoprobe"]
    assert u["ProtectSystem"] == ["strict"]
    assert set(u["ReadWritePaths"][0].split()) >= {
        "/sys/bus/usb",
        "/sys/devices",
        "/run/usbip-hotplug",
    }
    assert set(u["RestrictAddressFamilies"][0].split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_NETLINK",
    }
    for key in ("ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert u[key] == ["yes"], key
    assert u["RuntimeDirectory"] == ["usbip-hotplug"]
    assert u["RuntimeDirectoryPreserve"] == ["yes"]  # records survive for re-adoption
    # /sys read-only but for ReadWritePaths: seen working in tests/vm/guest/test_systemd_units.py
    assert u["ProtectKernelTunables"] == ["yes"]
    assert u["CapabilityBoundingSet"] == [""]  # root's own sysfs files need no capability
    assert u["KillMode"] == ["process"]  # relay processes of tls/wss exports survive restarts


def test_usbipa_unit() -> None:
    u = unit("usbipa.service")
    assert u["Type"] == ["notify"] and u["Restart"] == ["on-failure"] and u["WatchdogSec"]
    assert any("modprobe vhci-hcd" in v for v in u["ExecStartPre"])
    assert u["ProtectSystem"] == ["strict"]
    assert set(u["ReadWritePaths"][0].split()) >= {"/sys/devices/platform", "/run/usbipa"}
    assert set(u["RuntimeDirectory"][0].split()) == {"usbipa", "vhci_hcd"}
    assert u["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]  # wss on port 443


def test_udev_rule_loads_the_module_and_runs_nothing_long() -> None:
    lines = [
        line
        for line in (REPO / "rules/90-usbip-hotplug.rules").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == 1
    keys = [part.strip() for part in lines[0].split(",")]
    assert 'ACTION=="add"' in keys and 'SUBSYSTEM=="usb"' in keys
    assert 'ENV{DEVTYPE}=="usb_device"' in keys
    assert 'RUN{builtin}+="kmod load usbip-host"' in keys
    assert not re.search(r"\bRUN\+=", lines[0])  # no external program


def test_usbipa_example_documents_every_key_and_parses() -> None:
    text = (REPO / "config/usbipa.yaml").read_text()
    config = parse_config(text, "usbipa.yaml")
    assert config.allow and config.allow[0].max_devices == 4
    keys = app_config._TOP_KEYS | app_config._ALLOW_KEYS | app_config._LIMIT_KEYS
    for key in sorted(keys):
        assert re.search(rf"^\s*(- )?{key}:", text, re.MULTILINE), f"{key} is not in the example"


def test_policy_example_parses() -> None:
    policy = load_policy(REPO / "config/policy.yaml")
    assert policy.rules and policy.targets


def _install(prefix: Path, bindir: Path) -> subprocess.CompletedProcess[str]:
    script = str(REPO / "contrib/install.sh")
    return subprocess.run(
        ["sh", script, "--prefix", str(prefix), "--bindir", str(bindir), "--no-reload"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_install_script(tmp_path: Path) -> None:
    prefix, bindir = tmp_path / "root", tmp_path / "opt/bin"
    bindir.mkdir(parents=True)
    for name in ("usbip-hotplug", "usbipa"):
        (bindir / name).write_text("#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    result = _install(prefix, bindir)
    assert result.returncode == 0, result.stderr
    units = prefix / "usr/local/lib/systemd/system"
    hotplug = (units / "usbip-hotplug.service").read_text()
    assert f"ExecStart={bindir}/usbip-hotplug run" in hotplug
    assert f"ExecReload={bindir}/usbip-hotplug check" in hotplug
    assert f"ExecStopPost={bindir}/usbip-hotplug restore-autoprobe" in hotplug
    assert f"ExecStart={bindir}/usbipa" in (units / "usbipa.service").read_text()
    assert (prefix / "etc/udev/rules.d/90-usbip-hotplug.rules").exists()
    conf = prefix / "etc/usbip-hotplug"
    assert (conf / "policy.yaml.example").read_text() == (REPO / "config/policy.yaml").read_text()
    assert (conf / "usbipa.yaml.example").exists()
    # The examples are never installed as live configuration...
    assert not (conf / "policy.yaml").exists() and not (conf / "usbipa.yaml").exists()
    # ...and existing configuration survives a second run.
    (conf / "policy.yaml").write_text("version: 1\n# mine\n")
    (conf / "usbipa.yaml").write_text("port: 4000\n")
    again = _install(prefix, bindir)
    assert again.returncode == 0, again.stderr
    assert (conf / "policy.yaml").read_text() == "version: 1\n# mine\n"
    assert (conf / "usbipa.yaml").read_text() == "port: 4000\n"
    assert "kept your" in again.stdout
    man = prefix / "usr/local/share/man"
    assert sorted(p.name for p in man.glob("man*/*")) == [
        "usbip-hotplug-policy.5",
        "usbip-hotplug.8",
        "usbipa.8",
        "usbipa.yaml.5",
    ]
    share = prefix / "usr/local/share"
    for program in ("usbip-hotplug", "usbipa"):
        bash = share / "bash-completion/completions" / program
        zsh = share / "zsh/site-functions" / f"_{program}"
        assert bash.read_text() == (REPO / "completion" / program).read_text()
        assert zsh.read_text() == (REPO / "completion" / f"_{program}").read_text()

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: units not verified")
    verify = subprocess.run(
        [analyze, "verify", str(units / "usbip-hotplug.service"), str(units / "usbipa.service")],
        capture_output=True,
        text=True,
        timeout=60,
        # verify runs `man` for every Documentation= page: find the installed ones.
        env={**os.environ, "MANPATH": str(man)},
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
