"""QEMU's own USB devices, hot-plugged over QMP, exported by the daemon (issue 14 item 1,
issue 16 item 5).

A real host controller and device models we did not write: the guest boots with a
`qemu-xhci` controller (hotplug.testing.vm.qemu_usb); each test plugs a device
into it over QMP while `usbip-hotplug run` is running (the channel of
hotplug.testing.vm.qmp carries the command to the host's QEMU), the daemon exports
it to usbipa on loopback, and the test shows the copy behind vhci_hcd *working*:

* usb-storage on a USB 3 root port: SuperSpeed, so it lands on vhci's SuperSpeed
  hub (`ss`) at 5000 Mb/s; O_DIRECT data through the copy is what QEMU wrote in
  the disk image on the host (read back through the exchange directory);
* usb-kbd behind QEMU's usb-hub: QMP `input-send-event` keys arrive as evdev key
  events from the copy;
* usb-serial behind the hub (an FTDI FT232BM model): bytes both ways between the
  copy's /dev/ttyUSB* and the far end of the device's character device, a virtio
  port in the guest;
* usb-audio behind the hub (isochronous endpoints): 2 s played with aplay on the
  copy, no underrun, and the samples are in the file QEMU's `wav` backend wrote.

Then the device is unplugged over QMP and nothing is left: no vhci port used,
nothing bound to usbip-host, the daemon's record gone. One usbipa and one daemon
serve the module (test_daemon_real's Rig, on a port of its own).
"""

from __future__ import annotations

import array
import itertools
import math
import os
import re
import select
import shutil
import subprocess
import sys
import termios
import time
import tty
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hotplug.testing.vm import gadget as gd
from hotplug.testing.vm.evdev import KEY_A, KEY_B, read_keys
from hotplug.testing.vm.qemu_usb import QemuDevice, QemuUsb, wait_below
from hotplug.testing.vm.qmp import QmpError, qmp
from tests.vm.guest.daemon_rig import ENUM, Rig, rig_in, unexport_seen, used_ports

USBIPA_PORT = 3256  # 3240 usbipd, 3250/3251 export, 3252 daemon, 3253 matrix, 3254 hid, 3255 repeat
TARGET = f"127.0.0.1:{USBIPA_PORT}"
WORK = Path("/run/uhq")
USBIP_HOST = Path("/sys/bus/usb/drivers/usbip-host")
HUB_PORT = "1"  # QEMU's usb-hub on root port 1; devices behind it on 1.1, 1.2, ...
STORAGE_PORT = "2"  # a root port of its own: behind the (full-speed) hub it would be 12 Mb/s
KiB, MiB = 1 << 10, 1 << 20

# QEMU's ids: usb-kbd 0627:0001, usb-storage 46f4:0001, usb-audio 46f4:0002 (46f4 is
# QEMU's "vendor" for its own models), usb-serial 0403:6001 (the FTDI chip it models).
POLICY = f"""\
version: 1
targets:
  lab:
    address: "{TARGET}"
    connect_timeout: 2
    handshake_timeout: 10
    retry: {{initial: 0.5, max: 2}}
rules:
  - name: qemu-devices
    match:
      id: ["0627:0001", "46f4:0001", "46f4:0002", "0403:6001"]
      serial: "QMP*"
    export: lab
"""

# struct input_event on 64-bit Linux: struct timeval (two longs), type, code, value.


class QemuRig(Rig):
    """test_daemon_real's rig on a port and a policy of its own."""

    def usbipa_args(self, port: int = USBIPA_PORT) -> list[str]:
        return super().usbipa_args(port)


@pytest.fixture(scope="module")
def class_drivers() -> None:
    """The drivers of both copies (udev would load them on demand; loaded here so
    that no wait depends on udev's timing)."""
    for module in ("usb_storage", "usbhid", "hid_generic", "evdev", "ftdi_sio", "snd_usb_audio"):
        gd.modprobe(module)


@pytest.fixture(scope="module")
def qemu(class_drivers: None) -> Iterator[QemuUsb]:
    """The module's QEMU devices; the hub plugged once. All of it taken away at the end."""
    q = QemuUsb()
    q.plug_hub(HUB_PORT)
    try:
        yield q
    finally:
        errors = q.close()
        assert not errors, errors


@pytest.fixture(scope="module")
def rig(usbip_modules: None, qemu: QemuUsb) -> Iterator[QemuRig]:
    with rig_in(WORK, QemuRig) as r:
        r.write_policy(POLICY)
        r.ensure(usbipa=True)
        yield r


@pytest.fixture
def show_logs(rig: QemuRig) -> Iterator[None]:
    """The daemon's and usbipa's logs of this test in its captured output."""
    rig.settle()
    yield
    text = rig.daemon_text()
    print(f"----- daemon (this test)\n{text}\n----- usbipa (this test)\n{rig.usbipa_text()}")


# --------------------------------------------------------------------------- steps


def plug_and_export(
    qemu: QemuUsb, driver: str, port: str, **properties: object
) -> tuple[QemuDevice, str, gd.VhciPort, gd.UsbDevice, float]:
    """device_add while the daemon runs; wait for the export and the copy behind
    vhci_hcd. Returns the device, its busid, its vhci port, the copy, and the
    seconds from device_add to the copy."""
    t0 = time.monotonic()
    dev = qemu.plug(driver, port, **properties)
    busid = dev.wait_busid(timeout=ENUM)
    vport = gd.wait_until(
        lambda: gd.exported_port(busid), timeout=ENUM, what=f"{driver} {busid} exported"
    )
    remote = gd.wait_until(dev.vhci_devices, timeout=ENUM, what=f"{driver} behind vhci_hcd")[0]
    assert remote.busid == vport.local_busid
    return dev, busid, vport, remote, time.monotonic() - t0


def bound_to_usbip_host() -> list[str]:
    """Devices usbip-host holds (its driver directory's device links)."""
    return sorted(p.name for p in USBIP_HOST.iterdir() if p.is_symlink() and "-" in p.name)


def unplug_and_check_gone(rig: QemuRig, qemu: QemuUsb, dev: QemuDevice, busid: str) -> float:
    """device_del while exported: unexported and nothing left behind. Seconds taken."""
    t0 = time.monotonic()
    qemu.unplug(dev, timeout=ENUM)
    gd.wait_until(lambda: not used_ports(), timeout=ENUM, what=f"the vhci port of {busid} freed")
    gd.wait_until(lambda: not dev.vhci_devices(), timeout=ENUM, what="the vhci copy gone")
    gd.wait_until(lambda: not rig.record(busid).exists(), timeout=30, what="the record dropped")
    gd.wait_until(lambda: not usbipa_sessions(rig), timeout=30, what="usbipa's session dropped")
    took = time.monotonic() - t0
    assert bound_to_usbip_host() == [], bound_to_usbip_host()
    assert f"{busid} unplugged" in rig.daemon_text()
    assert unexport_seen(rig.usbipa_text(), busid), rig.usbipa_text()
    return took


def usbipa_sessions(rig: QemuRig) -> list[str]:
    """usbipa's session records (read directly: `usbipa status` is a Python start,
    seconds in the emulated guest)."""
    ports = rig.usbipa_state / "ports"
    return sorted(p.name for p in ports.glob("*.json")) if ports.is_dir() else []


# --------------------------------------------------------------------------- the channel


def test_qmp_channel_from_the_guest(record_property: Callable[[str, object], None]) -> None:
    """An in-guest test runs QMP commands on the host's QEMU: answers come back as
    QMP gave them, refusals as QmpError with QEMU's class and text. The requests
    are in the kernel's log, and the kernel judge does not take the words of one
    for a kernel fault."""
    t0 = time.monotonic()
    status = qmp("query-status")
    record_property("s_round_trip", f"{time.monotonic() - t0:.2f}")
    assert status["status"] == "running" and status["running"] is True
    assert "type" in qmp("qom-list", {"path": "/machine/peripheral/usbipvm-xhci"})[0]
    with pytest.raises(QmpError, match="no-such-model") as refused:
        qmp("device_add", {"driver": "no-such-model", "id": "never"})
    assert refused.value.error_class == "GenericError"
    with pytest.raises(QmpError) as unknown:
        qmp("no-such-command")
    assert unknown.value.error_class == "CommandNotFound"
    with pytest.raises(QmpError, match="WARNING: in a request, not a kernel fault"):
        qmp("qom-list", {"path": "/machine/WARNING: in a request, not a kernel fault"})


# --------------------------------------------------------------------------- the devices


@pytest.mark.usefixtures("show_logs")
def test_qemu_storage_superspeed_over_vhci(
    rig: QemuRig, qemu: QemuUsb, record_property: Callable[[str, object], None]
) -> None:
    """usb-storage on a USB 3 port of qemu-xhci is SuperSpeed: the export lands on a
    port of vhci's SuperSpeed hub at 5000 Mb/s, and what is written through the copy
    with O_DIRECT is read back intact and is in QEMU's disk image on the host."""
    drive = qemu.add_drive()
    dev, busid, vport, remote, took = plug_and_export(
        qemu, "usb-storage", STORAGE_PORT, drive=drive
    )
    record_property("s_plug_to_vhci_copy", f"{took:.2f}")
    assert gd.usb_attr(busid, "speed") == "5000"
    assert vport.hub == "ss", vport
    assert remote.attr("speed") == "5000"
    disk = gd.wait_block_device(remote.busid, timeout=ENUM)
    data = os.urandom(1 * MiB)
    offset = 8 * MiB
    t0 = time.monotonic()
    assert gd.odirect_write_read(disk.dev, offset, data) == data
    record_property("s_1mib_odirect_write_read", f"{time.monotonic() - t0:.2f}")
    with open(qemu.host_file(str(qemu.manifest["disk_file"])), "rb") as image:
        image.seek(offset)
        assert image.read(len(data)) == data, "QEMU's disk image on the host differs"
    record_property("s_unplug_to_gone", f"{unplug_and_check_gone(rig, qemu, dev, busid):.2f}")


def key_events(*keys: tuple[str, bool]) -> list[dict[str, object]]:
    """QMP input events: (QEMU's key name, pressed)."""
    return [
        {"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": name}}}
        for name, down in keys
    ]


@pytest.mark.usefixtures("show_logs")
def test_qemu_keyboard_keys_arrive_over_vhci(
    rig: QemuRig, qemu: QemuUsb, record_property: Callable[[str, object], None]
) -> None:
    """usb-kbd behind QEMU's usb-hub: keys given to QEMU with QMP input-send-event
    arrive as evdev key events from the copy behind vhci_hcd."""
    dev, busid, vport, remote, took = plug_and_export(qemu, "usb-kbd", f"{HUB_PORT}.1")
    record_property("s_plug_to_vhci_copy", f"{took:.2f}")
    assert vport.hub == "hs" and remote.attr("speed") == "12"
    event = wait_below(remote, "*:*/*/input/input*/event*", timeout=ENUM)
    node = Path("/dev/input") / event.name
    gd.wait_until(node.exists, timeout=30, what=str(node))
    fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
    try:
        t0 = time.monotonic()
        # No `device`: QMP names only display-bound devices there; QEMU gives keys
        # to the keyboard activated last, which is this one (the guest's PS/2
        # keyboard came first).
        qmp("input-send-event", {"events": key_events(("a", True), ("a", False))})
        qmp("input-send-event", {"events": key_events(("b", True), ("b", False))})
        keys = read_keys(fd, timeout=30, until=(KEY_B, 0))
        record_property("s_keys_to_events", f"{time.monotonic() - t0:.2f}")
    finally:
        os.close(fd)
    assert keys == [(KEY_A, 1), (KEY_A, 0), (KEY_B, 1), (KEY_B, 0)], keys
    record_property("s_unplug_to_gone", f"{unplug_and_check_gone(rig, qemu, dev, busid):.2f}")


def pump(src: int, dst: int, data: bytes, timeout: float) -> bytes:
    """Write `data` to fd `src` and read what arrives on fd `dst` until as many bytes
    came or `timeout` seconds passed (both non-blocking; bounded)."""
    got = bytearray()
    sent = 0
    deadline = time.monotonic() + timeout
    while len(got) < len(data) and (left := deadline - time.monotonic()) > 0:
        wants = [src] if sent < len(data) else []
        readable, writable, _ = select.select([dst], wants, [], left)
        if writable:
            sent += os.write(src, data[sent : sent + 512])
        if readable:
            got += os.read(dst, 4096)
    return bytes(got)


@pytest.mark.usefixtures("show_logs")
def test_qemu_serial_bytes_both_ways_over_vhci(
    rig: QemuRig, qemu: QemuUsb, record_property: Callable[[str, object], None]
) -> None:
    """usb-serial (QEMU's FTDI model) behind the hub: bytes written to the copy's
    /dev/ttyUSB* come out of the device's character device, and bytes put into it
    arrive at the tty. The character device's far end is a virtio port in this guest."""
    chardev, far_end = qemu.add_serial_line()
    dev, busid, vport, remote, took = plug_and_export(
        qemu, "usb-serial", f"{HUB_PORT}.2", chardev=chardev, **{"always-plugged": True}
    )
    record_property("s_plug_to_vhci_copy", f"{took:.2f}")
    assert vport.hub == "hs" and remote.attr("speed") == "12"
    tty_dir = wait_below(remote, "*:*/ttyUSB*", timeout=ENUM)
    tty_node = Path("/dev") / tty_dir.name
    gd.wait_until(tty_node.exists, timeout=30, what=str(tty_node))
    ser = os.open(tty_node, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    peer = os.open(far_end, os.O_RDWR | os.O_NONBLOCK)
    try:
        tty.setraw(ser)  # no echo, no line discipline: bytes as they are
        termios.tcflush(ser, termios.TCIOFLUSH)
        t0 = time.monotonic()
        out = os.urandom(4 * KiB)
        assert pump(ser, peer, out, timeout=60) == out, "tty -> device lost or changed bytes"
        back = os.urandom(4 * KiB)
        assert pump(peer, ser, back, timeout=60) == back, "device -> tty lost or changed bytes"
        record_property("s_8kib_both_ways", f"{time.monotonic() - t0:.2f}")
    finally:
        os.close(ser)
        os.close(peer)
    record_property("s_unplug_to_gone", f"{unplug_and_check_gone(rig, qemu, dev, busid):.2f}")


AUDIO_SECONDS = 2
TONE_HZ = 1000
TONE_AMPLITUDE = 12000


def tone(rate: int, channels: int) -> bytes:
    """AUDIO_SECONDS of a TONE_HZ sine, interleaved S16LE."""
    samples = array.array("h")
    for i in range(rate * AUDIO_SECONDS):
        value = int(TONE_AMPLITUDE * math.sin(2 * math.pi * TONE_HZ * i / rate))
        samples.extend([value] * channels)
    if sys.byteorder != "little":
        samples.byteswap()
    return samples.tobytes()


def wav_frames(path: Path) -> int:
    """Frames in a WAV file's header (0 until QEMU closes it and writes the sizes)."""
    try:
        with wave.open(str(path)) as w:
            return w.getnframes()
    except (OSError, EOFError, wave.Error):
        return 0


def analyse(path: Path, rate: int, channels: int) -> tuple[float, float, float]:
    """The tone in a WAV file: (seconds from its first to its last loud sample, its
    frequency from zero crossings, the longest quiet stretch within it in ms)."""
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (rate, channels, 2)
        samples = array.array("h", w.readframes(w.getnframes()))
    if sys.byteorder != "little":
        samples.byteswap()
    left = samples[::channels]
    loud = [i for i, s in enumerate(left) if abs(s) > TONE_AMPLITUDE // 8]
    if len(loud) < 2:
        return 0.0, 0.0, 0.0
    start, end = loud[0], loud[-1]
    crossings = sum(1 for a, b in itertools.pairwise(left[start : end + 1]) if a < 0 <= b)
    seconds = (end - start) / rate
    gap = max(b - a for a, b in itertools.pairwise(loud))
    return seconds, crossings / seconds, 1000 * gap / rate


@pytest.mark.usefixtures("show_logs")
def test_qemu_audio_isochronous_over_vhci(
    rig: QemuRig, qemu: QemuUsb, record_property: Callable[[str, object], None]
) -> None:
    """usb-audio behind the hub (isochronous OUT): 2 s played with aplay on the copy's
    sound card, no underrun, and QEMU's wav backend on the host got the tone."""
    if shutil.which("aplay") is None:
        pytest.fail(
            "aplay is missing: install Debian's alsa-utils on the host (tests/vm/setup-host.sh)"
        )
    rate, channels = int(qemu.manifest["audio_rate"]), int(qemu.manifest["audio_channels"])
    dev, busid, vport, remote, took = plug_and_export(
        qemu, "usb-audio", f"{HUB_PORT}.3", audiodev=qemu.manifest["audiodev"]
    )
    record_property("s_plug_to_vhci_copy", f"{took:.2f}")
    assert vport.hub == "hs" and remote.attr("speed") == "12"
    card_dir = wait_below(remote, "*:*/sound/card*", timeout=ENUM)
    card = card_dir.name.removeprefix("card")
    pcm = Path(f"/dev/snd/pcmC{card}D0p")
    gd.wait_until(pcm.exists, timeout=30, what=str(pcm))
    sound = WORK / "tone.raw"
    sound.write_bytes(tone(rate, channels))
    t0 = time.monotonic()
    play = subprocess.run(
        [
            *("aplay", "--fatal-errors", "-D", f"hw:{card},0", "-t", "raw", "-f", "S16_LE"),
            *("-r", str(rate), "-c", str(channels), str(sound)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    record_property("s_aplay", f"{time.monotonic() - t0:.2f}")
    said = play.stdout + play.stderr
    assert play.returncode == 0, said
    assert not re.search(r"underrun|xrun", said, re.IGNORECASE), said
    record_property("s_unplug_to_gone", f"{unplug_and_check_gone(rig, qemu, dev, busid):.2f}")
    # QEMU closes the file (and writes the WAV header's sizes) when the device goes.
    wav = qemu.host_file(str(qemu.manifest["audio_file"]))
    gd.wait_until(lambda: wav_frames(wav) > 0, timeout=30, what=f"{wav} closed by QEMU")
    seconds, hz, gap_ms = analyse(wav, rate, channels)
    record_property("tone_seconds_on_host", f"{seconds:.2f}")
    record_property("tone_hz_on_host", f"{hz:.0f}")
    record_property("tone_longest_gap_ms", f"{gap_ms:.1f}")
    assert seconds >= 0.95 * AUDIO_SECONDS, f"only {seconds:.2f} s of the tone reached QEMU"
    assert abs(hz - TONE_HZ) < 0.05 * TONE_HZ, f"the tone arrived at {hz:.0f} Hz, not {TONE_HZ}"
    assert gap_ms < 5, f"a gap of {gap_ms:.1f} ms in the tone QEMU got"
