"""device/records.py: the export records' one writer and one reader keep the file
format both writers always wrote (readers of older records included)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

from hotplug.device.policy.model import Target, TlsOptions
from hotplug.device.records import BY_CONNECT, BY_DAEMON, DaemonRecords, ExportRecord, ExportRecords
from hotplug.state import RecordDir

TLS = TlsOptions("/c.pem", "/c.key", None)


def test_connect_writes_what_disconnect_needs_and_no_more() -> None:
    plain = ExportRecord(by=BY_CONNECT, state="exporting", target="h:3240", pid=7, since=1.0)
    assert plain.to_json() == {
        "by": "connect",
        "pid": 7,
        "state": "exporting",
        "target": "h:3240",
        "since": 1.0,
    }
    secure = ExportRecord(
        by=BY_CONNECT,
        state="exported",
        target="tls://h:3240",
        pid=7,
        since=2.0,
        tls=TLS,
        proxy="http://p:3128",
        vid_pid="1d6b:0104",
        devid=(1 << 16) | 5,
    )
    assert secure.to_json() == {
        "by": "connect",
        "pid": 7,
        "state": "exported",
        "target": "tls://h:3240",
        "since": 2.0,
        "tls": {"cert": "/c.pem", "key": "/c.key", "ca": None},
        "proxy": "http://p:3128",
        "vid_pid": "1d6b:0104",
        "devid": 65541,
    }


def test_the_daemon_writes_every_key_of_its_own() -> None:
    record = ExportRecord(by=BY_DAEMON, state="retrying", target="h:3240", pid=8, since=3.0)
    assert list(record.to_json()) == [
        "by",
        "pid",
        "target",
        "tls",
        "target_name",
        "state",
        "since",
        "vid_pid",
        "devid",
        "rule",
    ]


def test_reading_is_lenient_and_putting_back_is_exact() -> None:
    odd = {"by": "usbip", "pid": "12", "since": "x", "tls": {"pin": "y"}, "extra": [1]}
    record = ExportRecord.from_json(odd)
    assert (record.by, record.pid, record.since, record.tls) == ("usbip", None, None, None)
    assert record.foreign_tls and record.target == "" and record.state == ""
    assert record.as_written() == odd  # an undone export restores it as it was
    assert not record.writer_alive  # no pid: its writer is taken to be gone


def test_the_daemon_carries_over_what_it_is_not_told(tmp_path: Path) -> None:
    records = DaemonRecords(ExportRecords(RecordDir(tmp_path)))
    lab = Target(name="lab", host="2001:db8::7", port=3240, scheme="tls", tls=TLS)
    first = records.make("1-1", lab, "exporting", vid_pid="1d6b:0104", devid=65541, rule="disks")
    assert records.write("1-1", first)
    assert first.target == "tls://[2001:db8::7]:3240" and first.target_name == "lab"
    later = records.make("1-1", lab, "exported", since=50.0)
    assert (later.vid_pid, later.devid, later.rule, later.since) == (
        "1d6b:0104",
        65541,
        "disks",
        50.0,
    )
    again = records.make("1-1", lab, "retrying")
    assert again.since == first.since
    assert records.claim("1-1", again, owned=False) is None  # ours: replaced
    alive = ExportRecord(by=BY_CONNECT, state="exporting", target="h:3240", pid=os.getppid())
    assert records.records.claim("1-2", alive) == (True, None)
    assert (
        records.claim("1-2", first, owned=False) == f"connect (pid {os.getppid()}) is exporting it"
    )
    ended = subprocess.Popen(["true"])
    ended.wait()
    gone = replace(alive, pid=ended.pid)
    records.records.put("1-3", gone)
    assert records.claim("1-3", first, owned=False) is None  # its writer is gone: ours now
    assert records.get("1-3") == first
