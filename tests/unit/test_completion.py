"""Bash completion (completion/): issue 15, item 4.

The scripts run in a real bash with Debian's bash-completion loaded; busids and
remotes come from `usbip-hotplug _complete` against a fake sysfs tree and a
policy file. The options each script offers are checked against argparse, so a
new flag cannot be forgotten there either.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hotplug.app import cli as app_cli
from hotplug.device import cli
from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice

ROOT = Path(__file__).resolve().parents[2]
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
POLICY = """\
version: 1
targets:
  lab:
    address: apps.example.net
  secure:
    address: tls://secure.example.net:3300
rules:
  - match: {}
    export: lab
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    if shutil.which("bash") is None or not BASH_COMPLETION.exists():
        pytest.fail("bash-completion is not installed: scripts/bootstrap installs it")
    tree = FakeTree(tmp_path / "root").create()
    tree.add_device(FakeUsbDevice(busid="1-1", vendor=0x1D6B, product=0x0104, serial="A"))
    tree.add_device(FakeUsbDevice(busid="1-2.3", vendor=0x076B, product=0x5321, serial="B"))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    return {
        **os.environ,
        **tree.env(),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "POLICY": str(policy),
    }


def complete(env: dict[str, str], program: str, line: str) -> list[str]:
    """COMPREPLY for `line` (the cursor at its end) typed after `program`."""
    words = [program, *shlex.split(line)] + ([""] if line.endswith(" ") or not line else [])
    script = f"""
source {BASH_COMPLETION}
source {ROOT / "completion" / program}
COMP_WORDS=({" ".join(shlex.quote(w) for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE={shlex.quote(" ".join(words))}
COMP_POINT=${{#COMP_LINE}}
_{program.replace("-", "_")}
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(
        ["bash", "--norc", "-c", script], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return [w for w in done.stdout.splitlines() if w]


def test_connect_busid_offers_the_plugged_devices(env: dict[str, str]) -> None:
    assert complete(env, "usbip-hotplug", "connect -b ") == ["1-1", "1-2.3"]
    assert complete(env, "usbip-hotplug", "disconnect --busid 1-2") == ["1-2.3"]


def test_remote_offers_the_policy_targets(env: dict[str, str]) -> None:
    # The policy the daemon would run: here given through the fake's config dir.
    config = Path(env["POLICY"])
    out = subprocess.run(
        ["usbip-hotplug", "_complete", "remotes", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.split() == ["apps.example.net:3240", "tls://secure.example.net:3300"]


def test_no_policy_and_no_devices_complete_nothing_and_print_no_error(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "USBIP_HOTPLUG_SYSFS_ROOT": str(tmp_path / "nothing"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    for what in (["busids"], ["remotes", "-c", str(tmp_path / "none.yaml")]):
        done = subprocess.run(
            ["usbip-hotplug", "_complete", *what],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), what


def test_commands_and_values(env: dict[str, str]) -> None:
    assert complete(env, "usbip-hotplug", "c") == ["connect", "check", "cert-fingerprint"]
    assert complete(env, "usbip-hotplug", "run --on-stop ") == ["unexport", "keep"]
    assert complete(env, "usbipa", "st") == ["status"]


def visible_options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        opt
        for action in parser._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._SubParsersAction)
        for opt in action.option_strings
    }


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {n: p for n, p in action.choices.items() if not n.startswith("_")}
    raise AssertionError("no subcommands")


def test_usbip_hotplug_script_offers_exactly_the_parsers_options(env: dict[str, str]) -> None:
    parser = cli.build_parser()
    commands = {n: p for n, p in subcommands(parser).items() if n != "demo"}
    assert sorted(complete(env, "usbip-hotplug", "")) == sorted(commands)
    for name, sub in commands.items():
        offered = set(complete(env, "usbip-hotplug", f"{name} -"))
        assert offered == visible_options(sub), name


def test_usbipa_script_offers_exactly_the_parsers_options(env: dict[str, str]) -> None:
    run = visible_options(app_cli.run_parser())
    assert set(complete(env, "usbipa", "-")) == run
    assert set(complete(env, "usbipa", "status -")) == visible_options(app_cli.status_parser())
