"""The man pages (man/*.scd): they build, lint clean, and name every flag and key.

Issue 15, item 2: a flag that argparse knows but the page does not, or a policy
or usbipa.yaml key that the parser takes but the page does not document, fails
here; so does an example in a page that does not parse.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotplug.app import cli as app_cli
from hotplug.app import config as app_config
from hotplug.device import cli
from hotplug.device.policy import parse as policy_keys
from hotplug.device.policy.merge import parse_policy

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man"
PAGES = sorted(MAN.glob("*.scd"))


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/bootstrap installs it (Debian package)")
    return path


def source(page: str) -> str:
    return (MAN / f"{page}.scd").read_text()


def roff(scd: Path) -> str:
    done = subprocess.run(
        [tool("scdoc")], stdin=scd.open("rb"), capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"{scd.name}: scdoc: {done.stderr.decode()}"
    return done.stdout.decode()


def test_the_four_pages_exist() -> None:
    assert [p.name for p in PAGES] == [
        "usbip-hotplug-policy.5.scd",
        "usbip-hotplug.8.scd",
        "usbipa.8.scd",
        "usbipa.yaml.5.scd",
    ]


@pytest.mark.parametrize("scd", PAGES, ids=lambda p: p.stem)
def test_page_builds_and_lints_clean(scd: Path, tmp_path: Path) -> None:
    """groff with all warnings on, and mandoc's lint at error level, say nothing.

    (mandoc's style warnings about empty paragraph macros are what scdoc emits
    for every section; groff, which man-db renders with, has no complaint.)"""
    page = tmp_path / scd.stem
    page.write_text(roff(scd))
    groff = subprocess.run(
        [tool("groff"), "-man", "-Tutf8", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (groff.returncode, groff.stderr) == (0, ""), groff.stderr
    lint = subprocess.run(
        [tool("mandoc"), "-T", "lint", "-W", "error", str(page)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), lint.stdout + lint.stderr


def terms(text: str) -> set[str]:
    """Every word set in bold (*...*) in a scdoc source, split at commas."""
    out: set[str] = set()
    for bold in re.findall(r"(?<![\\\w])\*([^*\n]+)\*", text):
        for part in bold.split(","):
            out.add(part.strip().replace("\\_", "_"))
    return out


def options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str]]:
    """(command, option string) for every visible option, through subcommands."""
    prog = parser.prog
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name.startswith("_"):
                    continue  # for the completion scripts, not for people
                yield ("command", name)
                for _, opt in options(sub):
                    yield (name, opt)
            continue
        if action.help == argparse.SUPPRESS:
            continue
        for opt in action.option_strings:
            yield (prog, opt)


def usbip_hotplug_parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def test_every_usbip_hotplug_command_and_flag_is_in_its_page() -> None:
    text = source("usbip-hotplug.8")
    documented = terms(text)
    sections = set(re.findall(r"^## (\S+)$", text, re.M))
    missing = []
    for where, opt in options(usbip_hotplug_parser()):
        if where == "command":
            if opt not in sections:
                missing.append(f"command {opt}")
        elif opt not in documented:
            missing.append(f"{where} {opt}")
    assert not missing, f"not in man/usbip-hotplug.8.scd: {missing}"


def test_every_usbipa_flag_is_in_its_page() -> None:
    documented = terms(source("usbipa.8"))
    found = [opt for _, opt in options(app_cli.run_parser())]
    found += [opt for _, opt in options(app_cli.status_parser())]
    assert found, "no flags found: the walk over argparse is broken"
    missing = sorted(set(found) - documented)
    assert not missing, f"not in man/usbipa.8.scd: {missing}"


def key_terms(text: str) -> set[str]:
    """Keys as the pages define them: a bold term alone at the start of a line."""
    out: set[str] = set()
    for line in re.findall(r"^\t*\*([^*\n]+)\*(?:, \*[^*\n]+\*)*$", text, re.M):
        out.add(line.replace("\\_", "_"))
    for line in re.findall(r"^\t*(\*[^\n]+\*)$", text, re.M):
        out |= {t.replace("\\_", "_") for t in re.findall(r"\*([^*]+)\*", line)}
    return out


def test_every_policy_key_is_in_the_policy_page() -> None:
    keys = {
        *policy_keys.TOP_KEYS,
        *policy_keys.TARGET_KEYS,
        *policy_keys.RETRY_KEYS,
        *policy_keys.SETTINGS_KEYS,
        *policy_keys.METRICS_KEYS,
        *policy_keys.RULE_KEYS,
        *policy_keys.MATCH_KEYS,
    }
    missing = sorted(keys - key_terms(source("usbip-hotplug-policy.5")))
    assert not missing, f"policy keys not in man/usbip-hotplug-policy.5.scd: {missing}"


def test_every_usbipa_config_key_is_in_its_page() -> None:
    keys = {
        *app_config._TOP_KEYS,
        *app_config._ALLOW_KEYS,
        *app_config._TLS_KEYS,
        *app_config._WSS_KEYS,
        *app_config._LIMIT_KEYS,
        *app_config._METRICS_KEYS,
    }
    missing = sorted(keys - key_terms(source("usbipa.yaml.5")))
    assert not missing, f"usbipa.yaml keys not in man/usbipa.yaml.5.scd: {missing}"


def examples(text: str) -> list[str]:
    return re.findall(r"^```\n(.*?)^```$", text, re.M | re.S)


def test_policy_page_examples_parse() -> None:
    found = [e for e in examples(source("usbip-hotplug-policy.5")) if e.startswith("version:")]
    assert len(found) >= 5
    for n, text in enumerate(found, 1):
        parsed = parse_policy([(f"example {n}", text)])
        assert parsed.rules, f"example {n} has no rules"


def test_usbipa_config_page_examples_parse() -> None:
    found = examples(source("usbipa.yaml.5"))
    assert len(found) >= 2
    for n, text in enumerate(found, 1):
        config = app_config.parse_config(text, f"example {n}")
        assert config.allow, f"example {n} allows nobody"


def command_lines(text: str, program: str) -> list[list[str]]:
    out = []
    for block in examples(text):
        for line in block.replace("\\\\\n", " ").splitlines():
            words = shlex.split(line.split("&&")[0])
            if words and words[0] == program:
                out.append(words[1:])
    return out


def test_page_command_examples_are_accepted_by_the_parsers() -> None:
    hotplug_examples = command_lines(source("usbip-hotplug.8"), "usbip-hotplug")
    usbipa_examples = command_lines(source("usbipa.8"), "usbipa")
    assert len(hotplug_examples) >= 4 and len(usbipa_examples) >= 2
    for argv in hotplug_examples:
        usbip_hotplug_parser().parse_args(argv)
    for argv in usbipa_examples:
        app_cli.run_parser().parse_args(argv)


def test_the_units_point_at_the_man_pages() -> None:
    """Issue 15, item 5: Documentation= named a repository address that does not exist."""
    for unit, page in (
        ("usbip-hotplug.service", "usbip-hotplug(8)"),
        ("usbipa.service", "usbipa(8)"),
    ):
        text = (ROOT / "systemd" / unit).read_text()
        docs = re.findall(r"^Documentation=(.*)$", text, re.M)
        assert docs and all(d.startswith("man:") for d in " ".join(docs).split()), (unit, docs)
        assert f"man:{page}" in docs[0].split(), (unit, docs)
