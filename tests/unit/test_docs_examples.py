"""README's examples are true: issue 15, item 5.

Every YAML policy in README.md parses; every `usbip-hotplug` and `usbipa`
command line in it is accepted by the program's own parser; the certificate
recipe really makes certificates that `cert-fingerprint --key` accepts.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from hotplug.app import cli as app_cli
from hotplug.device import cli
from hotplug.device.policy.merge import parse_policy
from tests.rig import command

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```$", README, re.M | re.S)


def shell_lines(block: str) -> list[str]:
    """Command lines of a sh block: continuations joined, comments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def commands(program: str) -> list[list[str]]:
    found = []
    for block in blocks("sh"):
        for line in shell_lines(block):
            for part in re.split(r"\s*&&\s*", line):
                words = shlex.split(part)
                if words and Path(words[0]).name == program:
                    found.append(words[1:])
    return found


def test_readme_policies_parse() -> None:
    found = blocks("yaml")
    assert found, "README has no policy example"
    for n, text in enumerate(found, 1):
        assert parse_policy([(f"README example {n}", text)]).rules


def test_readme_usbip_hotplug_commands_parse() -> None:
    found = commands("usbip-hotplug")
    assert len(found) >= 8, found
    for argv in found:
        cli.build_parser().parse_args(argv)


def test_readme_usbipa_commands_parse() -> None:
    found = commands("usbipa")
    assert len(found) >= 3, found
    for argv in found:
        if argv[:1] == ["status"]:
            app_cli.status_parser().parse_args(argv[1:])
        else:
            app_cli.run_parser().parse_args(argv)


def test_readme_certificate_recipe_makes_certificates_we_accept(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed")
    recipe = next(b for b in blocks("sh") if b.startswith("openssl"))
    done = subprocess.run(
        ["sh", "-e", "-c", recipe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    check = subprocess.run(
        [
            *command("usbip-hotplug"),
            "cert-fingerprint",
            "lab-1.crt",
            "--key",
            "lab-1.key",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert "CN=lab-1" in check.stdout, check.stdout
