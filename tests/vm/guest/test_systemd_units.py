"""The shipped systemd units, sandbox and all, run by a real systemd on the real kernel.

virtme-ng boots the guest without systemd, so this module starts one: systemd
as PID 1 of a new PID, mount and cgroup namespace inside the guest, the way a
container runs it, with its own /run (only udev's database is shared, for
pyudev). `contrib/install.sh` installs the units from systemd/ unchanged except
for the program paths it writes into ExecStart, as it does on any machine. Then
the hardening (ProtectSystem=strict, ReadWritePaths, an empty
CapabilityBoundingSet, SystemCallFilter, ...) is what systemd applies, and the
tests check that the daemons still do their sysfs writes under it: a gadget
gets exported and attached, `systemctl reload` checks the policy first,
`systemctl stop` withdraws the device. The verdicts come from sysfs and from
journald.

The programs run on Debian's /usr/bin/python3 with the checkout's virtualenv
on their path: the virtualenv's own interpreter may live under /root, which
ProtectHome=yes hides, as it should.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hotplug.testing.vm import gadget as gd
from tests.vm.guest.systemd_rig import (
    BIN,
    CONF,
    ENUM,
    HOTPLUG,
    MASKED,
    PORT,
    SERIAL_PREFIX,
    SYSTEM_PYTHON,
    SYSTEMD,
    UNITS,
    USBIPA,
    Systemd,
    policy,
)


def _install_programs() -> None:
    """usbip-hotplug and usbipa as a system install would have them, on Debian's python3."""
    if not SYSTEM_PYTHON.exists():
        pytest.fail("/usr/bin/python3 is missing: install the Debian package python3")
    wanted = f"{sys.version_info.major}.{sys.version_info.minor}"
    have = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if have != wanted:
        pytest.skip(f"/usr/bin/python3 is {have}, the virtualenv's packages are for {wanted}")
    site = sysconfig.get_paths()["purelib"]
    BIN.mkdir(parents=True, exist_ok=True)
    for program, module in (("usbip-hotplug", "hotplug.device.cli"), ("usbipa", "hotplug.app.cli")):
        path = BIN / program
        path.write_text(
            f"#!{SYSTEM_PYTHON}\nimport site, sys\nsite.addsitedir({site!r})\n"
            f"from {module} import main\nsys.exit(main())\n"
        )
        path.chmod(0o755)


@pytest.fixture(scope="module")
def systemd(usbip_modules: None, gadget_modules: list[str]) -> Iterator[Systemd]:
    root = Path(__file__).resolve().parents[3]
    hidden = {
        "/root": "ProtectHome=yes",
        "/home": "ProtectHome=yes",
        "/tmp": "PrivateTmp=yes",
        "/var/tmp": "PrivateTmp=yes",
    }
    for top, why in hidden.items():
        if root.is_relative_to(top):
            pytest.skip(f"the checkout {root} is under {top}, which {why} hides from the units")
    if not SYSTEMD.exists():
        pytest.fail(f"{SYSTEMD} is missing: install the Debian package systemd")
    _install_programs()
    subprocess.run(
        [str(root / "contrib/install.sh"), "--bindir", str(BIN), "--no-reload"],
        check=True,
        capture_output=True,
    )
    for unit in MASKED:
        (UNITS / unit).unlink(missing_ok=True)
        (UNITS / unit).symlink_to("/dev/null")
    (UNITS / "usbip-test.target").write_text("[Unit]\nDescription=usbip-hotplug tests\n")
    (CONF / "policy.yaml").write_text(policy())
    (CONF / "usbipa.yaml").write_text(
        f"listen: 127.0.0.1\nport: {PORT}\nallow:\n  - from: 127.0.0.0/8\n"
    )
    sd = Systemd(Path("/tmp/usbip-systemd.log"))
    try:
        sd.run("systemctl", "start", USBIPA)
        sd.run("systemctl", "start", HOTPLUG)
        yield sd
    finally:
        sd.close()
        for unit in (*MASKED, "usbip-test.target"):
            (UNITS / unit).unlink(missing_ok=True)
        for path in (CONF / "policy.yaml", CONF / "usbipa.yaml"):
            path.unlink(missing_ok=True)
        shutil.rmtree(BIN.parent, ignore_errors=True)


@pytest.fixture
def journal_on_failure(systemd: Systemd) -> Iterator[None]:
    yield
    for unit in (HOTPLUG, USBIPA):
        text = systemd.run("journalctl", "-u", unit, "--no-pager", check=False).stdout
        print(f"----- journal of {unit}\n{text}")


def given_back(busid: str) -> bool:
    return gd.busid_driver(busid) == "usb" and not any(not p.free for p in gd.vhci_ports())


_serials = iter(range(1, 1000))


def plug_and_export(
    make_gadget: Callable[..., gd.MassStorageGadget],
) -> tuple[gd.MassStorageGadget, str, gd.VhciPort]:
    """A new matching gadget, plugged; its busid and the port the kernel exported it on."""
    g = make_gadget(size=1 << 20, serial=f"{SERIAL_PREFIX}{next(_serials)}")
    g.plug()
    busid = g.wait_busid(timeout=ENUM)
    port = gd.wait_until(lambda: gd.exported_port(busid), timeout=ENUM, what=f"{busid} exported")
    return g, busid, port


@pytest.mark.usefixtures("journal_on_failure")
def test_both_units_run_sandboxed_and_report_to_systemd(systemd: Systemd) -> None:
    for unit in (HOTPLUG, USBIPA):
        assert systemd.show(unit, "ActiveState") == "active", unit
        status = systemd.proc_status(unit)
        assert status["NoNewPrivs"].strip() == "1", (unit, status)
        assert status["Seccomp"].strip() == "2", (unit, status)  # SystemCallFilter applied
    # CapabilityBoundingSet= (empty) for the device side; bind below 1024 only for usbipa.
    assert int(systemd.proc_status(HOTPLUG)["CapBnd"], 16) == 0
    assert int(systemd.proc_status(USBIPA)["CapBnd"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE
    # ProtectSystem=strict: / is read-only for the daemon, except ReadWritePaths.
    pid = systemd.show(HOTPLUG, "MainPID")
    mounts = systemd.run("cat", f"/proc/{pid}/mountinfo").stdout.splitlines()
    options = {line.split()[4]: line.split()[5].split(",")[0] for line in mounts}
    assert options["/"] == "ro" and options["/sys"] == "ro", options  # + ProtectKernelTunables
    for path in ("/sys/bus/usb", "/sys/devices", "/run/usbip-hotplug"):
        assert options[path] == "rw", (path, options)
    assert options["/root"] == "ro" and options["/home"] == "ro"  # ProtectHome: emptied
    pid = systemd.show(USBIPA, "MainPID")
    mounts = systemd.run("cat", f"/proc/{pid}/mountinfo").stdout.splitlines()
    options = {line.split()[4]: line.split()[5].split(",")[0] for line in mounts}
    assert options["/sys"] == "ro" and options["/sys/devices/platform"] == "rw", options
    # Type=notify and the watchdog: READY came (active), STATUS= is shown, pings arrive.
    assert systemd.show(HOTPLUG, "StatusText") == "0 exported"
    assert systemd.show(USBIPA, "StatusText").startswith("0 attached")
    assert systemd.show(HOTPLUG, "WatchdogUSec") == "30s"
    first = systemd.show(HOTPLUG, "WatchdogTimestampMonotonic")
    gd.wait_until(
        lambda: systemd.show(HOTPLUG, "WatchdogTimestampMonotonic") != first,
        timeout=45,
        what="a watchdog ping from the daemon (every 15 s)",
    )


@pytest.mark.usefixtures("journal_on_failure")
def test_plug_exports_through_the_sandbox_and_the_journal_has_the_fields(
    systemd: Systemd, make_gadget: Callable[..., gd.MassStorageGadget]
) -> None:
    g, busid, port = plug_and_export(make_gadget)
    gd.wait_until(g.vhci_devices, timeout=ENUM, what=f"{g.serial} behind vhci_hcd")
    assert port.hub == "hs"
    gd.wait_until(
        lambda: systemd.show(HOTPLUG, "StatusText") == "1 exported",
        timeout=30,
        what="STATUS=1 exported",
    )
    entries = systemd.journal(HOTPLUG)
    exported = [e for e in entries if e.get("USBIP_EVENT") == "exported"]
    assert exported and exported[-1].get("USBIP_BUSID") == busid, entries[-5:]
    assert exported[-1].get("USBIP_TARGET") == "lab", exported[-1]
    assert exported[-1].get("USBIP_ADDRESS") == f"127.0.0.1:{PORT}", exported[-1]
    attached = [e for e in systemd.journal(USBIPA) if e.get("USBIP_EVENT") == "attached"]
    assert attached and attached[-1].get("USBIP_BUSID") == busid

    # Restart=on-failure: a crash is restarted and the export adopted, not redone.
    before = systemd.show(HOTPLUG, "MainPID")
    systemd.run("kill", "-SEGV", before)
    gd.wait_until(
        lambda: (
            systemd.show(HOTPLUG, "MainPID") not in ("0", before)
            and systemd.show(HOTPLUG, "ActiveState") == "active"
        ),
        timeout=ENUM,
        what="the daemon restarted by systemd",
    )
    assert gd.exported_port(busid) == port
    messages = [e.get("MESSAGE", "") for e in systemd.journal(HOTPLUG)]
    assert any(m.startswith(f"adopted {busid}: still exported to lab") for m in messages)

    g.unplug(timeout=ENUM)
    gd.wait_until(
        lambda: not any(not p.free for p in gd.vhci_ports()), timeout=ENUM, what="port freed"
    )


@pytest.mark.usefixtures("journal_on_failure")
def test_reload_checks_the_policy_first_and_stop_gives_the_device_back(
    systemd: Systemd, make_gadget: Callable[..., gd.MassStorageGadget]
) -> None:
    _, busid, _ = plug_and_export(make_gadget)
    pid = systemd.show(HOTPLUG, "MainPID")

    # ExecReload= runs `usbip-hotplug check` first: a broken policy fails the reload,
    # names file:line, and the daemon keeps running with the old one.
    (CONF / "policy.yaml").write_text(policy(broken=True))
    try:
        r = systemd.run("systemctl", "reload", HOTPLUG, check=False)
        assert r.returncode != 0
        assert systemd.show(HOTPLUG, "ActiveState") == "active"
        assert systemd.show(HOTPLUG, "MainPID") == pid
        text = systemd.run("journalctl", "-u", HOTPLUG, "--no-pager").stdout
        assert "/etc/usbip-hotplug/policy.yaml:" in text and "rules[1].match.vendor" in text
        assert gd.exported_port(busid) is not None
    finally:
        (CONF / "policy.yaml").write_text(policy())
    systemd.run("systemctl", "reload", HOTPLUG)
    assert systemd.show(HOTPLUG, "MainPID") == pid

    # systemctl stop: on_stop unexport (the default) withdraws the device, cleanly.
    systemd.run("systemctl", "stop", HOTPLUG)
    assert systemd.show(HOTPLUG, "Result") == "success"
    assert given_back(busid), (gd.busid_driver(busid), gd.vhci_ports())
    detached = [e.get("MESSAGE", "") for e in systemd.journal(USBIPA)]
    assert any("(unexported by the device side)" in m and busid in m for m in detached)
