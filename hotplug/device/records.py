"""The device side's export records under /run: to whom each device is exported,
since when, by whom, so that a restart, or the other writer, knows.

Two writers share the directory: `connect` (one-shot, by hand) and the
daemon. Each record is an `ExportRecord`, written by `to_json` and read by
`from_json` here and nowhere else, so that every reader (the daemon's
re-adoption, `disconnect`, `list`, `check`) sees the same fields the same
way. The kernel stays the authority on whether a device is exported; a
record only adds what it cannot know. The file format is the one both
writers always wrote (each its own set of keys, below).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from hotplug import log
from hotplug.device.policy.model import Target, TlsOptions
from hotplug.state import RecordDir, RecordTaken, StateError, default_dir, writer_alive

# The daemon's lines about its records are the daemon's.
logger = log.get("hotplug.daemon")

__all__ = [
    "BY_CONNECT",
    "BY_DAEMON",
    "DaemonRecords",
    "ExportRecord",
    "ExportRecords",
    "exports_dir",
]

BY_CONNECT = "connect"
BY_DAEMON = "daemon"


@dataclass(frozen=True)
class ExportRecord:
    """One device's record. `state`: "exporting" (written before the device is
    bound), "exported", "retrying" (bound by us, not exported now) or "moving"
    (being withdrawn to go elsewhere)."""

    by: str  # BY_CONNECT, BY_DAEMON, or whatever another writer put there
    state: str
    target: str  # where, as str(Remote): host:port, or the tls:// or wss:// URL
    pid: int | None = None  # the writer's process
    since: float | None = None  # time.time() of the last change of state
    tls: TlsOptions | None = None  # the certificate files that reach `target`
    proxy: str | None = None  # connect's --proxy (the daemon resolves its own)
    target_name: str | None = None  # the policy's name of the target (daemon)
    vid_pid: str | None = None
    # Which device (busnum << 16 | devnum): giving it back must never touch a
    # device plugged in at the same busid after it was unplugged.
    devid: int | None = None
    rule: str | None = None  # the policy rule that exported it (daemon)
    # A "tls" that is not ours to read (keys of another version): not a record
    # the daemon may act on.
    foreign_tls: bool = field(default=False, compare=False)
    # The mapping as read: put back as it was when an export is undone.
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The keys each writer has always written."""
        tls = (
            None
            if self.tls is None
            else {"cert": self.tls.cert, "key": self.tls.key, "ca": self.tls.ca}
        )
        if self.by == BY_DAEMON:
            return {
                "by": self.by,
                "pid": self.pid,
                "target": self.target,
                "tls": tls,
                "target_name": self.target_name,
                "state": self.state,
                "since": self.since,
                "vid_pid": self.vid_pid,
                "devid": self.devid,
                "rule": self.rule,
            }
        data: dict[str, Any] = {
            "by": self.by,
            "pid": self.pid,
            "state": self.state,
            "target": self.target,
            "since": self.since,
        }
        if self.tls is not None:  # a secure remote: what disconnect needs to reach it again
            data.update(tls=tls, proxy=self.proxy)
        if self.vid_pid is not None:
            data["vid_pid"] = self.vid_pid
        if self.devid is not None:
            data["devid"] = self.devid
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportRecord:
        """Any mapping found on disk: missing or odd values read as absent."""
        tls_data = data.get("tls")
        tls = None
        foreign_tls = False
        if isinstance(tls_data, dict):
            try:
                tls = TlsOptions(**tls_data)
            except TypeError:
                foreign_tls = True
        pid = data.get("pid")
        devid = data.get("devid")  # records of older versions have none
        return cls(
            by=str(data.get("by", "")),
            state=str(data.get("state", "")),
            target=str(data.get("target", "")),
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            since=_number(data.get("since")),
            tls=tls,
            proxy=_text(data.get("proxy")),
            target_name=_text(data.get("target_name")),
            vid_pid=_text(data.get("vid_pid")),
            devid=devid if isinstance(devid, int) and not isinstance(devid, bool) else None,
            rule=_text(data.get("rule")),
            foreign_tls=foreign_tls,
            raw=dict(data),
        )

    @property
    def writer_alive(self) -> bool:
        """Whether the process that wrote it still runs (see state.writer_alive)."""
        return writer_alive(dict(self.raw) if self.raw else self.to_json())

    def as_written(self) -> dict[str, Any]:
        """What to put back: the record exactly as it was read, or as made."""
        return dict(self.raw) if self.raw else self.to_json()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


class ExportRecords:
    """The directory of records, one per busid, typed on the way in and out."""

    def __init__(self, directory: RecordDir) -> None:
        self.dir = directory

    def get(self, busid: str) -> ExportRecord | None:
        data = self.dir.get(busid)
        return None if data is None else ExportRecord.from_json(data)

    def put(self, busid: str, record: ExportRecord) -> None:
        """StateError if it cannot be written."""
        self.dir.put(busid, record.as_written())

    def claim(self, busid: str, record: ExportRecord) -> tuple[bool, ExportRecord | None]:
        """Write `record` only if there is none: (True, None). Else write nothing and
        return (False, the record there), None when it cannot be read (a damaged
        file, a directory in the way). StateError if it cannot be written."""
        try:
            self.dir.claim(busid, record.as_written())
        except RecordTaken as taken:
            existing = taken.existing
            return False, ExportRecord.from_json(existing) if existing is not None else None
        return True, None

    def remove(self, busid: str) -> None:
        self.dir.remove(busid)

    def items(self) -> Iterator[tuple[str, ExportRecord]]:
        """StateError if the directory cannot be read."""
        for busid, data in self.dir.items():
            yield busid, ExportRecord.from_json(data)


def exports_dir() -> ExportRecords:
    """One record per device exported by `connect` or the daemon: to whom, since when."""
    return ExportRecords(RecordDir(default_dir("device") / "exports"))


class DaemonRecords:
    """The daemon's own records: written before a device is bound, kept in step
    with what it does, and retried from every loop step when a write fails
    (/run full, a file in the way), so that a restart can adopt its exports."""

    def __init__(self, records: ExportRecords) -> None:
        self.records = records
        self.unsaved: dict[str, ExportRecord] = {}  # writes that failed, to try again
        self.unremoved: set[str] = set()  # removals that failed, to try again

    def get(self, busid: str) -> ExportRecord | None:
        return self.records.get(busid)

    def items(self) -> Iterator[tuple[str, ExportRecord]]:
        return self.records.items()

    def make(
        self,
        busid: str,
        target: Target,
        state: str,
        *,
        since: float | None = None,
        vid_pid: str | None = None,
        devid: int | None = None,
        rule: str | None = None,
    ) -> ExportRecord:
        """Our record of `busid` in `state`; what is not given is carried over
        from our previous record of it (since, vid_pid, devid, rule)."""
        old = self.records.get(busid)
        if old is not None and old.by != BY_DAEMON:
            old = None  # another tool's: nothing of it is ours to carry over
        return ExportRecord(
            by=BY_DAEMON,
            pid=os.getpid(),
            # As `connect` records it (str(Remote)), so `disconnect -b` and `list` read it too.
            target=target.address,
            tls=target.tls,
            target_name=target.name,
            state=state,
            since=since if since is not None else (old.since if old else None) or time.time(),
            vid_pid=vid_pid if vid_pid is not None else (old.vid_pid if old else None),
            devid=devid if devid is not None else (old.devid if old else None),
            rule=rule or (old.rule if old else None),
        )

    def write(self, busid: str, record: ExportRecord) -> bool:
        """Write our record of `busid`; on failure, log it and retry from the loop."""
        self.unremoved.discard(busid)
        try:
            self.records.put(busid, record)
        except StateError as exc:
            if busid not in self.unsaved:
                log.event(
                    logger,
                    logging.ERROR,
                    f"{exc}; retrying (until it is written, a restarted daemon would not"
                    f" know {busid} is its own)",
                    busid=busid,
                    event="state-error",
                )
            self.unsaved[busid] = record
            return False
        if self.unsaved.pop(busid, None) is not None:
            log.event(
                logger,
                logging.INFO,
                f"the record of {busid} is written",
                busid=busid,
                event="state-recovered",
            )
        return True

    def forget(self, busid: str) -> None:
        self.unsaved.pop(busid, None)
        try:
            self.records.remove(busid)
        except (StateError, OSError) as exc:
            if busid not in self.unremoved:
                log.event(
                    logger,
                    logging.ERROR,
                    f"cannot remove the record of {busid}: {exc}; retrying",
                    busid=busid,
                    event="state-error",
                )
            self.unremoved.add(busid)
        else:
            self.unremoved.discard(busid)

    def retry(self) -> None:
        for busid, record in list(self.unsaved.items()):
            self.write(busid, record)
        for busid in list(self.unremoved):
            self.forget(busid)

    def claim(self, busid: str, record: ExportRecord, owned: bool) -> str | None:
        """Our "exporting" record of `busid`, written before the export binds it.

        Returns why not, if it cannot be had: a device whose export cannot be
        recorded is not exported (issue 12, finding 5), and a `connect` that
        recorded the device first has it (finding 10). A record whose writer is
        gone, or our own, is replaced.
        """
        try:
            if owned:
                self.records.put(busid, record)
            else:
                claimed, other = self.records.claim(busid, record)
                if not claimed:
                    if (
                        other is not None
                        and other.by != BY_DAEMON
                        and other.state == "exporting"
                        and other.writer_alive
                    ):
                        who = other.raw.get("by", "another tool")
                        return f"{who} (pid {other.raw.get('pid')}) is exporting it"
                    self.records.put(busid, record)
        except StateError as exc:
            return (
                f"cannot record the export ({exc}), so nothing is bound: a restarted daemon"
                " would not know the device is its own; make the state directory writable"
            )
        self.unsaved.pop(busid, None)
        self.unremoved.discard(busid)
        return None
