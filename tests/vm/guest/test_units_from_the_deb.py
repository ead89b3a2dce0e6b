"""The Debian package, installed and run as an admin would (issue 15, item 1).

The host builds usbip-hotplug_*.deb with scripts/build-deb (tests/vm/conftest.py,
cached by source hash) and hands it to the guest as $USBIP_VM_DEB. Here, inside
the namespace systemd of test_systemd_units.py (so the package's maintainer
scripts see a running systemd), `apt install ./the.deb` installs it on Debian's
own dependencies (python3-websockets 10.4 and friends, which the host has: the
guest has no network, and needs none). Then the examples it shipped, adapted
to the guest, become the admin's policy.yaml and usbipa.yaml, and
`systemctl enable --now` runs the packaged units: a gadget is exported over
wss:// (Debian's websockets carries it) and attached, `systemctl reload`
keeps it, unplugging frees the port; `apt purge` leaves nothing behind.

That namespace's /usr, dpkg's database and man-db's index are the host's,
read through the harness's cached 9p share (hotplug.testing.vm.guest,
HOSTFS_MOUNT) with a tmpfs above each for what the install writes, instead of
virtme's uncached root, whose /var/cache is an empty tmpfs besides: there, the
maintainer scripts' python3 and perl and man-db's trigger (an index rebuilt
from nothing, all of /usr/share/man read) took 6 to over 10 minutes. The files
are the same; only their reads are cached.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hotplug.testing.vm import gadget as gd
from hotplug.testing.vm.guest import HOSTFS_MOUNT
from tests.tlscerts import make_pki
from tests.vm.guest.systemd_rig import CONF, ENUM, MASKED, UNITS, Systemd

PACKAGE = "usbip-hotplug"
HOTPLUG = "usbip-hotplug.service"
USBIPA = "usbipa.service"
TLS_PORT = 3264  # 3262 test_systemd_units
WSS_PORT = 3265
WSS_PATH = "/usbip"
SERIAL_PREFIX = "DEB"
# As the README says; apt warns that its command line is not for scripts, which is
# the admin's command line here.
APT = ("env", "DEBIAN_FRONTEND=noninteractive", "apt")
# The host's directories, through the cached 9p share, a tmpfs above each.
CACHED = ("usr", "var/lib/dpkg", "var/cache/man")
LAYERS = Path("/tmp/usbip-deb-layers")
# What the module's steps took, for the host's summary (record_property).
SECONDS: dict[str, float] = {}
CERTS = Path("/etc/usbip-deb-test")  # the admin's, outside the package's directory
# What the package installs, and what its services make; none of it may outlive a purge.
INSTALLED = (
    "/usr/bin/usbip-hotplug",
    "/usr/bin/usbipa",
    "/lib/systemd/system/usbip-hotplug.service",
    "/lib/systemd/system/usbipa.service",
    "/lib/udev/rules.d/90-usbip-hotplug.rules",
    "/etc/usbip-hotplug/policy.yaml.example",
    "/etc/usbip-hotplug/usbipa.yaml.example",
    "/usr/share/man/man5/usbip-hotplug-policy.5.gz",
    "/usr/share/bash-completion/completions/usbip-hotplug",
    "/usr/share/zsh/vendor-completions/_usbip-hotplug",
)
LEFT_BEHIND = (
    "/etc/usbip-hotplug",
    "/run/usbip-hotplug",
    "/run/usbipa",
    "/run/vhci_hcd",
    "/etc/systemd/system/multi-user.target.wants/usbip-hotplug.service",
    "/etc/systemd/system/multi-user.target.wants/usbipa.service",
    "/usr/lib/python3/dist-packages/hotplug",
    *INSTALLED,
)


def adapted_policy(example: dict[str, Any]) -> dict[str, Any]:
    """The shipped example's wss target and settings, pointed at this guest's usbipa."""
    target = dict(example["targets"]["cloud"])
    target.update(
        address=f"wss://127.0.0.1:{WSS_PORT}{WSS_PATH}",
        ca=str(CERTS / "ca.crt"),
        cert=str(CERTS / "client.crt"),
        key=str(CERTS / "client.key"),
        retry={"initial": 0.5, "max": 2},
    )
    rule = {"name": "packaged-disks", "match": {"vendor": "1d6b", "serial": f"{SERIAL_PREFIX}*"}}
    return {
        "version": 1,
        "targets": {"lab": target},
        "rules": [{**rule, "export": "lab"}],
        "settings": example["settings"],
    }


def adapted_usbipa(example: dict[str, Any]) -> dict[str, Any]:
    """The shipped example's limits, state_dir, tls and wss, on loopback."""
    config = {key: example[key] for key in ("limits", "state_dir")}
    config.update(
        listen="127.0.0.1",
        port=TLS_PORT,
        allow=[{"from": "127.0.0.0/8"}],
        tls={
            "cert": str(CERTS / "server.crt"),
            "key": str(CERTS / "server.key"),
            "client_ca": str(CERTS / "ca.crt"),
        },
        wss={**example["wss"], "port": WSS_PORT, "path": WSS_PATH},
    )
    return config


def cached_root() -> str:
    """The namespace's mounts, as shell commands: the CACHED directories of the host
    root read through the cached share, each with a tmpfs layer that takes the
    writes; the guest's kernel modules (a mount below /usr) stay where they are."""
    if not os.path.ismount(HOSTFS_MOUNT):
        pytest.fail(f"the harness's cached share {HOSTFS_MOUNT} is not mounted (boot log)")
    q = shlex.quote
    modules = LAYERS / "modules"
    steps = [
        f"mkdir -p {q(str(LAYERS))}",
        f"mount -t tmpfs -o mode=700 tmpfs {q(str(LAYERS))}",
        f"mkdir {q(str(modules))}",
        f"mount --bind /usr/lib/modules {q(str(modules))}",
    ]
    for top in CACHED:
        layer = LAYERS / top.replace("/", "_")
        lower = f"{HOSTFS_MOUNT}/{top}"
        upper, work = q(str(layer / "upper")), q(str(layer / "work"))
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        steps += [
            f"mkdir -p {upper} {work}",
            # The mount's top directory is the upper one: owned as the host's is
            # (man-db's trigger writes /var/cache/man as the user man).
            f"chown --reference={lower} {upper}",
            f"chmod --reference={lower} {upper}",
            f"mount -t overlay overlay -o {options} /{top}",
        ]
    steps += ["mkdir -p /usr/lib/modules", f"mount --move {q(str(modules))} /usr/lib/modules"]
    # man-db's own switch for its index (debconf man-db/auto-update, as container
    # images set it): without /var/lib/man-db/auto-update its trigger returns at
    # once instead of scanning every manual page over 9p on install and purge
    # (95 s and 153 s of a CI run under load). `man -w` finds pages by path.
    steps += ["mount -t tmpfs -o mode=755 tmpfs /var/lib/man-db"]
    return " && ".join(steps)


def _deb() -> Path:
    error = os.environ.get("USBIP_VM_DEB_ERROR")
    if error:
        pytest.fail(f"the host could not build the package:\n{error}", pytrace=False)
    deb = os.environ.get("USBIP_VM_DEB")
    if not deb or not Path(deb).is_file():
        pytest.fail("no package from the host ($USBIP_VM_DEB): run this through tests/vm/")
    return Path(deb)


@pytest.fixture(scope="module")
def systemd(usbip_modules: None, gadget_modules: list[str]) -> Iterator[Systemd]:
    deb = _deb()
    for unit in MASKED:
        (UNITS / unit).unlink(missing_ok=True)
        (UNITS / unit).symlink_to("/dev/null")
    (UNITS / "usbip-test.target").write_text("[Unit]\nDescription=usbip-hotplug tests\n")
    sd: Systemd | None = None
    try:
        t0 = time.monotonic()
        sd = Systemd(Path("/tmp/usbip-systemd-deb.log"), setup=cached_root())
        SECONDS["s_systemd_up"] = time.monotonic() - t0
        t0 = time.monotonic()
        installed = sd.run(*APT, "install", "-y", str(deb), check=False, timeout=450)
        SECONDS["s_apt_install"] = time.monotonic() - t0
        print(f"----- apt install {deb}\n{installed.stdout}{installed.stderr}")
        assert installed.returncode == 0, (
            "apt install of the package failed (its dependencies must be installed on the"
            f" host, see scripts/bootstrap):\n{installed.stdout}\n{installed.stderr}"
        )
        yield sd
    finally:
        if sd is not None:
            with contextlib.suppress(Exception):
                sd.run(*APT, "purge", "-y", PACKAGE, check=False, timeout=450)
            sd.close()
        for unit in (*MASKED, "usbip-test.target"):
            (UNITS / unit).unlink(missing_ok=True)
        shutil.rmtree(CERTS, ignore_errors=True)
        shutil.rmtree(CONF, ignore_errors=True)


@pytest.fixture
def journal_on_failure(systemd: Systemd) -> Iterator[None]:
    yield
    for unit in (HOTPLUG, USBIPA):
        text = systemd.run("journalctl", "-u", unit, "--no-pager", check=False).stdout
        print(f"----- journal of {unit}\n{text}")


def _admin_writes_the_configuration() -> None:
    """What the README tells an admin: copy the examples, adapt them, add certificates."""
    CERTS.mkdir(parents=True, exist_ok=True)
    make_pki(CERTS)
    policy = yaml.safe_load((CONF / "policy.yaml.example").read_text())
    usbipa = yaml.safe_load((CONF / "usbipa.yaml.example").read_text())
    (CONF / "policy.yaml").write_text(yaml.safe_dump(adapted_policy(policy)))
    (CONF / "usbipa.yaml").write_text(yaml.safe_dump(adapted_usbipa(usbipa)))


# Its setup starts systemd and installs the package. Seen: 80-90 s with the
# guest alone, 336-385 s with two guests on a loaded 2-core host (apt's reads
# of dpkg's database through 9p are what stretches); bounds with room for a
# slower machine.
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("journal_on_failure")
def test_installed_package_exports_over_wss_reloads_and_purges_clean(
    systemd: Systemd,
    make_gadget: Callable[..., gd.MassStorageGadget],
    record_property: Callable[[str, object], None],
) -> None:
    """Issue 15, item 1: the .deb on a Debian 12 root: install, enable, plug, reload,
    unplug, purge."""
    for path in INSTALLED:
        assert systemd.path(path).exists(), f"{path} not installed"
    page = systemd.run("man", "-w", "usbip-hotplug-policy").stdout.strip()
    assert page == "/usr/share/man/man5/usbip-hotplug-policy.5.gz", page
    # Installed disabled and not started: nothing is exported before the admin says so.
    for unit in (HOTPLUG, USBIPA):
        enabled = systemd.run("systemctl", "is-enabled", unit, check=False).stdout.strip()
        assert enabled == "disabled", (unit, enabled)
        assert systemd.show(unit, "ActiveState") == "inactive", unit
    assert not (CONF / "policy.yaml").exists() and not (CONF / "usbipa.yaml").exists()
    assert systemd.show(HOTPLUG, "FragmentPath") == "/lib/systemd/system/usbip-hotplug.service"

    _admin_writes_the_configuration()
    systemd.run("/usr/bin/usbip-hotplug", "check")
    systemd.run("systemctl", "enable", "--now", USBIPA, HOTPLUG)
    for unit in (HOTPLUG, USBIPA):
        assert systemd.show(unit, "ActiveState") == "active", unit
    head = systemd.run("head", "-n1", "/usr/bin/usbip-hotplug").stdout
    assert head.startswith("#!/usr/bin/python3"), head  # Debian's interpreter, Debian's modules

    g = make_gadget(size=1 << 20, serial=f"{SERIAL_PREFIX}1")
    t0 = time.monotonic()
    g.plug()
    busid = g.wait_busid(timeout=ENUM)
    port = gd.wait_until(lambda: gd.exported_port(busid), timeout=ENUM, what=f"{busid} exported")
    gd.wait_until(g.vhci_devices, timeout=ENUM, what=f"{g.serial} behind vhci_hcd")
    record_property("s_plug_to_attached", round(time.monotonic() - t0, 1))
    exported = [e for e in systemd.journal(HOTPLUG) if e.get("USBIP_EVENT") == "exported"]
    assert exported and exported[-1].get("USBIP_BUSID") == busid, exported
    assert exported[-1].get("USBIP_ADDRESS", "").startswith("wss://127.0.0.1:"), exported[-1]

    pid = systemd.show(HOTPLUG, "MainPID")
    systemd.run("systemctl", "reload", HOTPLUG)
    assert systemd.show(HOTPLUG, "MainPID") == pid
    assert systemd.show(HOTPLUG, "ActiveState") == "active"
    assert gd.exported_port(busid) == port

    g.unplug(timeout=ENUM)
    gd.wait_until(
        lambda: not any(not p.free for p in gd.vhci_ports()), timeout=ENUM, what="port freed"
    )

    t0 = time.monotonic()
    purged = systemd.run(*APT, "purge", "-y", PACKAGE, timeout=450)
    SECONDS["s_apt_purge"] = time.monotonic() - t0
    for step, seconds in SECONDS.items():
        record_property(step, round(seconds, 1))
    print(f"----- apt purge\n{purged.stdout}")
    status = systemd.run("dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE, check=False)
    assert status.stdout.strip() in ("", "not-installed"), status.stdout
    for unit in (HOTPLUG, USBIPA):
        assert systemd.show(unit, "LoadState") == "not-found", unit
    # Looked at from the namespace: its /run is the one the services had.
    check = 'for p in "$@"; do if [ -e "$p" ] || [ -L "$p" ]; then echo "$p"; fi; done'
    left = systemd.run("sh", "-c", check, "sh", *LEFT_BEHIND).stdout.split()
    assert not left, f"left behind after purge: {left}"
    assert (CERTS / "ca.crt").exists()  # the admin's own files stay
