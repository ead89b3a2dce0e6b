"""The Debian package built from this checkout: what it holds, and both programs
run from it on Debian's python3 (issue 15, item 1).

The package is unpacked into a scratch root (`dpkg -x`) and its programs run
from there, with only its dist-packages on the path: a module left out of the
package, or a dependency Debian's python3 lacks, fails here in seconds. The
install itself (maintainer scripts, units, purge) is the VM test's,
tests/vm/guest/test_units_from_the_deb.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotplug.kernel.vhci import PortState
from hotplug.testing.fake_kernel import FakeTree
from tests.debpackage import ROOT, DebBuildError, build_deb
from tests.integration.conftest import DISK
from tests.rig import env_for, listener_ports, start_ready, stop

DIST = "usr/lib/python3/dist-packages"
# What an admin gets besides the Python package.
ADMIN_FILES = {
    "usr/bin/usbip-hotplug",
    "usr/bin/usbipa",
    "lib/systemd/system/usbip-hotplug.service",
    "lib/systemd/system/usbipa.service",
    "lib/udev/rules.d/90-usbip-hotplug.rules",
    "etc/usbip-hotplug/policy.yaml.example",
    "etc/usbip-hotplug/usbipa.yaml.example",
    "usr/share/man/man8/usbip-hotplug.8.gz",
    "usr/share/man/man8/usbipa.8.gz",
    "usr/share/man/man5/usbip-hotplug-policy.5.gz",
    "usr/share/man/man5/usbipa.yaml.5.gz",
    "usr/share/bash-completion/completions/usbip-hotplug",
    "usr/share/bash-completion/completions/usbipa",
    "usr/share/zsh/vendor-completions/_usbip-hotplug",
    "usr/share/zsh/vendor-completions/_usbipa",
}


@pytest.fixture(scope="module")
def deb() -> Path:
    try:
        return build_deb().path
    except DebBuildError as e:
        pytest.fail(f"the package does not build:\n{e}", pytrace=False)


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deb-root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=60)
    return root


def package_files(deb: Path) -> set[str]:
    listing = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True, timeout=60
    ).stdout
    names = subprocess.run(
        ["tar", "-t"], input=listing, capture_output=True, check=True, timeout=60
    ).stdout.decode()
    return {n.removeprefix("./") for n in names.splitlines() if not n.endswith("/")}


def test_package_holds_every_module_and_the_admins_files(deb: Path) -> None:
    files = package_files(deb)
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "hotplug").rglob("*.py")}
    assert {m.split("/")[1] for m in modules if m.count("/") > 1} >= {
        "wire",
        "kernel",
        "device",
        "app",
        "testing",
    }
    packaged = {f.removeprefix(f"{DIST}/") for f in files if f.startswith(f"{DIST}/hotplug/")}
    assert packaged == modules
    assert files >= ADMIN_FILES, sorted(ADMIN_FILES - files)
    # Nothing of the checkout's tests or tools rides along.
    stray = {f for f in files if f.startswith(f"{DIST}/") and not f.startswith(f"{DIST}/hotplug/")}
    assert all(f.startswith(f"{DIST}/usbip_hotplug-") for f in stray), sorted(stray)


@pytest.fixture
def packaged_env(unpacked: Path, tree: FakeTree, state: Path) -> Iterator[dict[str, str]]:
    """The fake machine's environment, with the unpacked package as the only
    place `hotplug` can come from (the checkout is neither on the path nor the
    working directory of a script)."""
    env = env_for(tree, state, PYTHONPATH=str(unpacked / DIST))
    env["PATH"] = f"{unpacked / 'usr/bin'}:/usr/sbin:/usr/bin:/sbin:/bin"
    env.pop("VIRTUAL_ENV", None)
    yield env


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_every_module_imports_from_the_package_on_debians_python(
    unpacked: Path, packaged_env: dict[str, str], tmp_path: Path
) -> None:
    script = (
        "import importlib, pkgutil, hotplug\n"
        "for m in pkgutil.walk_packages(hotplug.__path__, 'hotplug.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(hotplug.__file__)\n"
    )
    done = run(["/usr/bin/python3", "-c", script], packaged_env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(unpacked / DIST / "hotplug/__init__.py")


def test_both_programs_from_the_package_export_and_withdraw_a_device(
    unpacked: Path, packaged_env: dict[str, str], tree: FakeTree, tmp_path: Path
) -> None:
    """The packaged usbipa and usbip-hotplug, on the fake kernel: connect, then disconnect."""
    bindir = unpacked / "usr/bin"
    for program in ("usbip-hotplug", "usbipa"):
        head = (bindir / program).read_text().splitlines()[0]
        assert head == "#!/usr/bin/python3", (program, head)
    tree.add_device(DISK, devnum=5)
    example = unpacked / "etc/usbip-hotplug/policy.yaml.example"
    checked = run(
        [str(bindir / "usbip-hotplug"), "check", "-c", str(example)], packaged_env, tmp_path
    )
    assert checked.returncode == 0, checked.stderr
    assert "policy OK" in checked.stdout and "1-1" in checked.stdout

    argv = [str(bindir / "usbipa"), "--listen", "127.0.0.1", "-t", "0", "--allow", "127.0.0.0/8"]
    proc, ready = start_ready(argv, packaged_env, tmp_path, stderr=subprocess.PIPE)
    try:
        port = listener_ports(ready["STATUS"])["tcp"]
        remote = f"127.0.0.1:{port}"
        connect = [str(bindir / "usbip-hotplug"), "connect", "-r", remote, "-b", "1-1"]
        done = run(connect, packaged_env, tmp_path)
        assert done.returncode == 0, done.stderr
        used = [p for p in tree.vhci().ports() if p.state == PortState.USED]
        assert [p.devid for p in used] == [(1 << 16) | 5]
        done = run(
            [str(bindir / "usbip-hotplug"), "disconnect", "-b", "1-1"], packaged_env, tmp_path
        )
        assert done.returncode == 0, done.stderr
        assert not [p for p in tree.vhci().ports() if p.state == PortState.USED]
    finally:
        stop(proc)
