"""Shell completion (completion/): issue 15, item 4.

The bash scripts run in a real bash with Debian's bash-completion loaded; the
zsh functions (_usbip-hotplug, _usbipa) in a real interactive zsh with its
completion system, typed into through a pseudo-terminal (zsh's zpty module) and
TAB, with compadd wrapped to write down the words it was given that match what
was typed. Busids and remotes come from `usbip-hotplug _complete` against a fake
sysfs tree and a policy file. The options each script offers are checked
against argparse, so a new flag cannot be forgotten there either.
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
# Sourced by the interactive zsh: the completion system with completion/ first
# in $fpath, and compadd writing down the matches it adds (the calls that only
# ask, -O/-A/-D, pass through). The shell exits after the first completion.
ZSH_INIT = """\
PS1='' RPS1=''
fpath=($ZSH_COMPLETIONS $fpath)
autoload -Uz compinit && compinit -u -D
compadd() {
  if (( ${@[(I)-[OAD]]} )); then
    builtin compadd "$@"
    return
  fi
  local -a found
  builtin compadd -O found "$@"
  (( $#found )) && print -rl -- $found >> $ZSH_MATCHES
  builtin compadd "$@"
}
comppostfuncs=(exit)
print '<<ready>>'
"""
# Runs that zsh on a pseudo-terminal, types the line ($1) and TAB, and reads
# until the shell is gone (the caller's timeout bounds it).
ZSH_DRIVER = """\
zmodload zsh/zpty || exit 3
zpty shell 'zsh -f -i'
zpty -w shell "source ${(q)ZSH_INIT}"
zpty -r -m shell out '*<<ready>>*' || exit 4
zpty -w -n shell "$1"$'\\t'
while zpty -r shell out; do :; done
"""
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
    # The scripts ask for the installed policy's remotes (no -c); this one is the
    # test's: the real program, with -c added to `_complete remotes` only.
    real = Path(sys.executable).parent / "usbip-hotplug"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "usbip-hotplug").write_text(
        f"#!/bin/sh\nif [ \"$1 $2\" = '_complete remotes' ]; then\n"
        f'    exec {shlex.quote(str(real))} "$@" -c {shlex.quote(str(policy))}\nfi\n'
        f'exec {shlex.quote(str(real))} "$@"\n'
    )
    (bindir / "usbip-hotplug").chmod(0o755)
    return {
        **os.environ,
        **tree.env(),
        "PATH": f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
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


def complete_zsh(env: dict[str, str], tmp: Path, line: str) -> list[str]:
    """What zsh offers for `line` (the cursor at its end), first word the program."""
    if shutil.which("zsh") is None:
        pytest.fail("zsh is not installed: scripts/bootstrap installs it")
    (tmp / "init.zsh").write_text(ZSH_INIT)
    (tmp / "driver.zsh").write_text(ZSH_DRIVER)
    matches = tmp / "matches"
    matches.unlink(missing_ok=True)
    done = subprocess.run(
        ["zsh", "-f", str(tmp / "driver.zsh"), line],
        env={
            **env,
            "ZSH_COMPLETIONS": str(ROOT / "completion"),
            "ZSH_INIT": str(tmp / "init.zsh"),
            "ZSH_MATCHES": str(matches),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return matches.read_text().splitlines() if matches.exists() else []


def test_connect_busid_offers_the_plugged_devices(env: dict[str, str]) -> None:
    assert complete(env, "usbip-hotplug", "connect -b ") == ["1-1", "1-2.3"]
    assert complete(env, "usbip-hotplug", "disconnect --busid 1-2") == ["1-2.3"]


def test_remote_offers_the_policy_targets(env: dict[str, str]) -> None:
    assert complete(env, "usbip-hotplug", "connect -r tls") == ["tls://secure.example.net:3300"]
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


def test_zsh_busids_remotes_commands_and_values(env: dict[str, str], tmp_path: Path) -> None:
    assert complete_zsh(env, tmp_path, "usbip-hotplug connect -b ") == ["1-1", "1-2.3"]
    assert complete_zsh(env, tmp_path, "usbip-hotplug disconnect --busid 1-2") == ["1-2.3"]
    assert complete_zsh(env, tmp_path, "usbip-hotplug connect -r ") == [
        "apps.example.net:3240",
        "tls://secure.example.net:3300",
    ]
    assert complete_zsh(env, tmp_path, "usbip-hotplug c") == [
        "connect",
        "cert-fingerprint",
        "check",
    ]
    assert complete_zsh(env, tmp_path, "usbip-hotplug run --on-stop ") == ["unexport", "keep"]
    assert complete_zsh(env, tmp_path, "usbipa st") == ["status"]


def test_zsh_usbip_hotplug_offers_exactly_the_parsers_options(
    env: dict[str, str], tmp_path: Path
) -> None:
    parser = cli.build_parser()
    commands = {n: p for n, p in subcommands(parser).items() if n != "demo"}
    assert sorted(complete_zsh(env, tmp_path, "usbip-hotplug ")) == sorted(commands)
    assert set(complete_zsh(env, tmp_path, "usbip-hotplug -")) == visible_options(parser)
    for name, sub in commands.items():
        offered = set(complete_zsh(env, tmp_path, f"usbip-hotplug {name} -"))
        assert offered == visible_options(sub), name


def test_zsh_usbipa_offers_exactly_the_parsers_options(env: dict[str, str], tmp_path: Path) -> None:
    run = visible_options(app_cli.run_parser())
    assert set(complete_zsh(env, tmp_path, "usbipa -")) == run
    assert set(complete_zsh(env, tmp_path, "usbipa run --listen ::1 -")) == run
    status = visible_options(app_cli.status_parser())
    assert set(complete_zsh(env, tmp_path, "usbipa status -")) == status
