"""Desired state vs actual state -> actions, and the backoff bookkeeping. Pure.

Rules of this file:
- No I/O, no clock, no randomness: `now` and `rand` come from the caller, so
  every decision is a function of its arguments and can be tested as a table.
- The kernel wins. `Observed` (what usbip-host says about a busid right now)
  overrides what a `Slot` remembers: a slot that says "exported" while the
  stub is no longer "used" means the link was lost.
- One operation per busid at a time. While a slot is busy (exporting,
  unexporting, releasing) the only action it can get is `Abort`.
- A device bound to usbip-host that we did not bind is someone else's
  (`usbip bind`, `usbip-hotplug connect`): it is never taken over.

Fallbacks and backoff work in rounds, as the policy documents them: a round
tries the rule's target and then each fallback once, in `target_chain` order,
one right after the other; when the whole round failed, the next round starts
after `retry.delay(round, rand)` of the rule's own (first) target.

Following (a rule's `follow:`): a device that was exported by a rule with
`follow: N` and leaves lays a `Trail` at its busid (`trail_after`); whatever
appears there within N seconds follows it (`follow_on_arrival`), and `desire`
sends it to the same target whatever its ids, as the rule's own export would.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from hotplug.device.policy.model import Policy, Target
from hotplug.usb import Device
from hotplug.wire.address import parse_address

if TYPE_CHECKING:  # read, never written or imported at run time: records.py does I/O
    from hotplug.device.records import ExportRecord

Phase = Literal[
    "idle", "exporting", "exported", "backoff", "unexporting", "releasing", "probing", "foreign"
]
BUSY: frozenset[str] = frozenset({"exporting", "unexporting", "releasing", "probing"})
# A lost link is exported again only after this many seconds. An unplug looks
# like a lost link for a moment: usb_disconnect marks the device "not attached"
# before it removes it, the next URB the far side sends fails to submit, and
# usbip-host drops the link at once while the device is still in sysfs and
# bound to it (seen on 6.1 with keyboards and disks unplugged while exported:
# the daemon exported again, and that export found no device). By then an
# unplug has removed the device, and the daemon unexports instead.
LINK_SETTLE = 2.0


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Wanted:
    """What the policy wants for one device that is plugged in."""

    action: Literal["export", "ignore", "none"]
    rule: str | None
    reason: str
    chain: tuple[Target, ...] = ()  # the rule's target, then its fallbacks
    follow: float | None = None  # the rule's `follow:`, carried into the slot by Export

    @property
    def exports(self) -> bool:
        return self.action == "export" and bool(self.chain)


@dataclass(frozen=True)
class Observed:
    """What the kernel says about one busid: bound to usbip-host, and in use."""

    bound: bool = False
    used: bool = False  # usbip_status == 2: a live link
    # No driver at all while the daemon holds new devices back (settings.claim:
    # before-probe): it waits for us to bind it to usbip-host or hand it over.
    waiting: bool = False


@dataclass(frozen=True)
class Slot:
    """The daemon's memory of one busid, between two reconcile calls."""

    phase: Phase = "idle"
    # We bound this device to usbip-host (or adopted our own record of it).
    # Only then may we touch it while it is bound.
    owned: bool = False
    target: Target | None = None  # being tried, or exported to
    exported_to: Target | None = None  # where the far side may still hold a port
    position: int = 0  # index in the chain of the next attempt
    round: int = 0  # failed rounds in a row (the backoff exponent)
    next_at: float | None = None  # backoff: when the next round starts
    last_error: str | None = None
    since: float = 0.0  # when the phase began
    aborting: bool = False  # an Abort was sent for the operation in flight
    # The rule of the export started last, and its `follow:`: a device that
    # leaves while exported by it lays a Trail (trail_after).
    rule: str | None = None
    follow: float | None = None
    probed: bool = False  # handed to its usual drivers once (Probe): never again


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Export:
    busid: str
    target: Target
    adopt: bool  # the device is bound to usbip-host by us already
    # The rule that wants it there, for the log and the record: the policy is
    # not asked again while the export runs.
    rule: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Unexport:
    busid: str
    target: Target
    release: bool  # give the device back to its usual driver afterwards


@dataclass(frozen=True)
class Release:
    """Give back a device we bound but which is not exported anywhere."""

    busid: str


@dataclass(frozen=True)
class Abort:
    """Cut short the export in flight (its device is gone or no longer wanted there)."""

    busid: str


@dataclass(frozen=True)
class Probe:
    """Hand a device that waits for us (held back from its drivers) to its usual
    drivers: the policy does not export it."""

    busid: str


Action = Export | Unexport | Release | Abort | Probe


@dataclass(frozen=True)
class Note:
    """Something worth a log line: what was decided and why."""

    level: Literal["info", "warning"]
    event: str
    busid: str
    message: str
    target: str | None = None
    rule: str | None = None


@dataclass
class Plan:
    slots: dict[str, Slot]
    actions: list[Action] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    wake_at: float | None = None  # the earliest backoff deadline, if any


# --------------------------------------------------------------------------- policy -> wanted


@dataclass(frozen=True)
class Trail:
    """A device exported by a rule with `follow:` left its busid: until `until`
    (monotonic), whatever appears there goes to `target` (a name in the policy)."""

    rule: str | None
    target: str
    follow: float  # the rule's `follow:`, seconds
    left: str  # vid:pid of the device that left
    until: float

    def since_leaving(self, now: float) -> float:
        """Seconds from the device's leaving (`until` less the window) to `now`."""
        return max(0.0, now - (self.until - self.follow))


@dataclass(frozen=True)
class Following:
    """A device that appeared on a trail in time: it goes where the trail leads."""

    trail: Trail
    came: str  # its own vid:pid
    after: float  # seconds between the leaving and the arrival

    @property
    def reason(self) -> str:
        t = self.trail
        rule = f"rule '{t.rule}'" if t.rule else "its rule"
        return (
            f"follows {t.left}, exported by {rule} (follow: {t.follow:g}), which left "
            f"{self.after:.1f} s before; came back as {self.came}"
        )


def trail_after(slot: Slot | None, left: str, now: float) -> Trail | None:
    """The trail a device leaves as it goes, if a rule with `follow:` wanted it
    exported: exported (`exported_to`, whatever the link does now: a device that
    re-enumerates drops its link first), being exported, or between attempts. A
    device may re-enumerate the moment it is attached, before its export's result
    is booked here, or as the export fails because it went. `follow` is cleared
    once the policy no longer wants the device exported (reconcile).
    """
    if slot is None or slot.follow is None:
        return None
    target = slot.exported_to or slot.target
    if target is None:
        return None
    return Trail(slot.rule, target.name, slot.follow, left, now + slot.follow)


def follow_on_arrival(trail: Trail | None, came: str, now: float) -> Following | None:
    """A device appears at a busid: does it follow the trail there? Only in time."""
    if trail is None or now >= trail.until:
        return None
    return Following(trail, came, trail.since_leaving(now))


def desire(
    policy: Policy, device: Device, held_back: bool = False, following: Following | None = None
) -> Wanted:
    """The policy's wish for `device`. `held_back`: present at start with coldplug off.
    `following`: it appeared on a trail in time, so it goes where the trail leads,
    whatever its ids (hubs and devices imported through vhci_hcd still never go)."""
    decision = policy.decide(device)
    if following is not None and not (device.is_hub or device.on_vhci):
        name = following.trail.target
        if name not in policy.targets:
            return Wanted("none", following.trail.rule, f"unknown target '{name}' to follow to")
        chain = tuple(policy.target_chain(name))
        trail = following.trail
        return Wanted("export", trail.rule, following.reason, chain, trail.follow)
    if held_back and decision.action == "export":
        return Wanted(
            "none",
            decision.rule,
            "plugged in before the daemon started and settings.coldplug is false",
        )
    if decision.action == "export" and decision.target is not None:
        try:
            chain = tuple(policy.target_chain(decision.target))
        except KeyError:
            return Wanted("none", decision.rule, f"unknown target '{decision.target}'")
        return Wanted("export", decision.rule, decision.reason, chain, decision.follow)
    return Wanted(decision.action, decision.rule, decision.reason)


def same_place(a: Target | None, b: Target | None) -> bool:
    """Same far end: a target whose timeouts or retry changed is still the same place."""
    if a is None or b is None:
        return False
    return (a.name, a.scheme, a.host, a.port, a.path) == (b.name, b.scheme, b.host, b.port, b.path)


def _in_chain(target: Target | None, wanted: Wanted | None) -> bool:
    if wanted is None or not wanted.exports:
        return False
    return any(same_place(target, t) for t in wanted.chain)


# --------------------------------------------------------------------------- the reconciler


def reconcile(
    wanted: Mapping[str, Wanted],
    observed: Mapping[str, Observed],
    slots: Mapping[str, Slot],
    now: float,
) -> Plan:
    """Compare what the policy wants for each plugged-in device (`wanted`; a busid
    missing there is unplugged) with what the kernel says (`observed`) and what
    we remember (`slots`); return the actions to start and the updated slots.
    """
    plan = Plan(slots={})
    for busid in sorted(set(wanted) | set(slots)):
        slot = _one(
            busid, wanted.get(busid), observed.get(busid, Observed()), slots.get(busid), now, plan
        )
        if slot is not None:
            plan.slots[busid] = slot
            if slot.phase == "backoff" and slot.next_at is not None:
                deadlines = [t for t in (plan.wake_at, slot.next_at) if t is not None]
                plan.wake_at = min(deadlines)
    return plan


def _one(
    busid: str, w: Wanted | None, o: Observed, old: Slot | None, now: float, plan: Plan
) -> Slot | None:
    s = old or Slot(since=now)
    rule = w.rule if w is not None else None

    def note(
        level: Literal["info", "warning"], event: str, msg: str, target: Target | None
    ) -> None:
        name = target.name if target is not None else None
        plan.notes.append(Note(level, event, busid, msg, name, rule))

    def phase(slot: Slot, new: Phase, **changes: Any) -> Slot:
        since = now if slot.phase != new else slot.since
        return replace(slot, phase=new, since=since, **changes)

    if s.phase in BUSY:
        if s.phase == "exporting" and not s.aborting and not _in_chain(s.target, w):
            why = "unplugged" if w is None else "no longer wanted there"
            note("info", "abort", f"{busid}: {why}; cutting the export short", s.target)
            plan.actions.append(Abort(busid))
            return replace(s, aborting=True)
        return s

    # The kernel wins: a bound device we own that usbip-host no longer holds
    # was released by someone else; an "exported" stub that is not in use lost its link.
    if s.owned and not o.bound:
        s = replace(s, owned=False)
    if s.phase == "exported" and not o.used:
        if w is None:  # unplugging takes the link down too; that is no news
            s = phase(s, "idle", position=0)
        else:
            note(
                "warning",
                "link-lost",
                f"{busid}: link to {_name(s.target)} lost; exporting again in {LINK_SETTLE:g} s",
                s.target,
            )
            s = phase(
                s,
                "backoff",
                position=0,
                next_at=now + LINK_SETTLE,
                last_error=f"link to {_name(s.target)} lost",
            )

    if w is None or not w.exports:
        if w is not None:
            s = replace(s, follow=None)  # no longer a device that rule follows
        if s.exported_to is not None:
            what = "unplugged" if w is None else f"not wanted any more ({w.reason})"
            note("info", "unexport", f"{busid}: {what}; unexporting", s.exported_to)
            plan.actions.append(Unexport(busid, s.exported_to, release=True))
            return phase(s, "unexporting")
        if s.owned:
            plan.actions.append(Release(busid))
            return phase(s, "releasing")
        if w is None:
            return None  # unplugged and nothing of ours left: forget it
        if o.waiting and not s.probed:
            note("info", "probe", f"{busid}: not exported ({w.reason}); to its usual drivers", None)
            plan.actions.append(Probe(busid))
            return phase(s, "probing", probed=True, next_at=None, position=0, round=0)
        return phase(s, "foreign" if o.bound else "idle", next_at=None, position=0, round=0)

    # The policy wants it exported.
    if o.bound and not s.owned:
        if s.phase != "foreign":
            note(
                "warning",
                "foreign",
                f"not exporting {busid}: another tool bound it to usbip-host "
                "(usbip bind or usbip-hotplug connect); leaving it alone",
                None,
            )
        return phase(s, "foreign", last_error="bound to usbip-host by another tool")
    if s.phase == "foreign":
        s = phase(s, "idle", last_error=None)

    if s.phase == "exported":
        if _in_chain(s.exported_to, w):
            return s
        assert s.exported_to is not None
        note(
            "info",
            "move",
            f"{busid}: the policy now exports it to {w.chain[0].name}; "
            f"unexporting from {s.exported_to.name} first",
            s.exported_to,
        )
        plan.actions.append(Unexport(busid, s.exported_to, release=False))
        return phase(s, "unexporting")

    if o.used:
        # Ours and still in use, but not exported in our books: the kernel is
        # still tearing down a link we closed. Look again on the next poll.
        return s

    if s.phase == "backoff":
        if s.next_at is not None and now < s.next_at:
            return s
        s = replace(s, position=0)
    position = s.position if s.position < len(w.chain) else 0
    target = w.chain[position]
    plan.actions.append(Export(busid, target, adopt=s.owned and o.bound, rule=w.rule))
    return phase(
        s,
        "exporting",
        target=target,
        position=position,
        next_at=None,
        aborting=False,
        rule=w.rule,
        follow=w.follow,
    )


def _name(target: Target | None) -> str:
    return target.name if target is not None else "its target"


# --------------------------------------------------------------------------- results


def export_succeeded(slot: Slot, target: Target, now: float) -> Slot:
    return replace(
        slot,
        phase="exported",
        owned=True,
        target=target,
        exported_to=target,
        position=0,
        round=0,
        next_at=None,
        last_error=None,
        since=now,
        aborting=False,
    )


def export_failed(
    slot: Slot,
    chain: tuple[Target, ...],
    error: str,
    still_bound: bool,
    now: float,
    rand: float,
) -> Slot:
    """Next target of the round right away, or back off when the round is over.

    `still_bound`: the device is bound to usbip-host after the failed attempt.
    Only our own transaction touched it, so then it is ours.
    """
    base = replace(slot, owned=still_bound, last_error=error, aborting=False)
    if not chain:
        return replace(base, phase="idle", position=0, since=now)
    position = slot.position + 1
    if position < len(chain):
        return replace(base, phase="idle", position=position, next_at=None, since=now)
    failed_rounds = slot.round + 1
    delay = chain[0].retry.delay(failed_rounds, rand)
    return replace(
        base,
        phase="backoff",
        position=0,
        round=failed_rounds,
        next_at=now + delay,
        since=now,
    )


def unexport_finished(slot: Slot, still_bound: bool, error: str | None, now: float) -> Slot:
    """The far side was told (or could not be reached; its kernel drops the link anyway)."""
    return replace(
        slot,
        phase="idle",
        owned=still_bound,
        exported_to=None,
        position=0,
        round=0,
        next_at=None,
        last_error=error,
        since=now,
    )


def release_finished(slot: Slot, still_bound: bool, error: str | None, now: float) -> Slot:
    return replace(slot, phase="idle", owned=still_bound, last_error=error, since=now)


def probe_finished(slot: Slot, error: str | None, now: float) -> Slot:
    """Handed to its usual drivers (or that failed: it is not tried again)."""
    return replace(slot, phase="idle", last_error=error, since=now)


def retry_now(slots: Mapping[str, Slot], now: float) -> dict[str, Slot]:
    """After a policy reload: waiting for the next round helps no one, try now."""
    return {
        busid: replace(slot, next_at=now, round=0) if slot.phase == "backoff" else slot
        for busid, slot in slots.items()
    }


# --------------------------------------------------------------------------- summaries


def status_line(slots: Mapping[str, Slot]) -> str:
    """systemd's STATUS=: "4 exported, 1 retrying (lab: connection refused)"."""
    count: dict[str, int] = {}
    for slot in slots.values():
        count[slot.phase] = count.get(slot.phase, 0) + 1
    parts = [f"{count.get('exported', 0)} exported"]
    if count.get("exporting"):
        parts.append(f"{count['exporting']} exporting")
    retrying = [s for _, s in sorted(slots.items()) if s.phase == "backoff"]
    if retrying:
        first = retrying[0]
        detail = _short_error(first)
        parts.append(f"{len(retrying)} retrying" + (f" ({detail})" if detail else ""))
    if count.get("foreign"):
        parts.append(f"{count['foreign']} bound by another tool")
    return ", ".join(parts)


def _short_error(slot: Slot) -> str:
    error = slot.last_error or ""
    target = slot.target
    if target is None:
        return error
    # export.py prefixes its errors with host:port (the URL for tls:// and wss://);
    # the target's name says it shorter.
    for prefix in (f"{target.url}: ", f"{target.display}: "):
        if error.startswith(prefix):
            error = error[len(prefix) :]
            break
    return f"{target.name}: {error}" if error else target.name


# --------------------------------------------------------------------------- re-adoption


@dataclass(frozen=True)
class Adoption:
    """What to do at start with one record a previous run of the daemon left.

    `slot` None: drop the record (and, with `release`, ask usbip-host to forget
    the busid's table entry: the device is gone). `message` is the log line,
    None for a record dropped without a word (not one we can read).
    """

    busid: str
    slot: Slot | None
    message: str | None = None
    release: bool = False
    target: Target | None = None
    rule: str | None = None


def target_from_record(record: ExportRecord, targets: Mapping[str, Target]) -> Target | None:
    """The target a record names: the policy's own if it is still the same far end,
    else one made from the record (the far end is still where the record says,
    and so are the certificate files to reach it). None: not a record we wrote."""
    try:
        scheme, host, port, path = parse_address(record.target)
    except ValueError:
        return None
    name = record.target_name or record.target
    current = targets.get(name)
    if current is not None and (current.scheme, current.host, current.port, current.path) == (
        scheme,
        host,
        port,
        path,
    ):
        return current
    if record.foreign_tls:
        return None
    return Target(name=name, host=host, port=port, scheme=scheme, path=path, tls=record.tls)


def adopt(
    records: Iterable[tuple[str, ExportRecord]],
    present: Collection[str],
    bound: Mapping[str, bool],
    used: Mapping[str, bool],
    targets: Mapping[str, Target],
    now: float,
    wall: float,
) -> list[Adoption]:
    """Take back what a previous run exported, as the kernel and our records say.

    `records`: the daemon's own records (by == "daemon"); `present`: the busids
    plugged in; `bound`: whether each present one is bound to usbip-host;
    `used`: whether its usbip_status is "used" (a live link). `now` is
    time.monotonic(), `wall` time.time() (a record's `since` is wall time).
    Nothing is exported again here: a device still "used" stays exported as
    it is; one bound but not used is ours to export again.
    """
    out = []
    for busid, record in records:
        if busid not in present or not bound.get(busid, False):
            why = "it is gone" if busid not in present else "it is no longer bound to usbip-host"
            message = f"dropping the record of {busid}: {why}"
            out.append(Adoption(busid, None, message, release=busid not in present))
            continue
        target = target_from_record(record, targets)
        if target is None:
            out.append(Adoption(busid, None))
            continue
        age = max(0.0, wall - (record.since or wall))
        if used.get(busid, False):
            slot = Slot(
                phase="exported", owned=True, target=target, exported_to=target, since=now - age
            )
            message = f"adopted {busid}: still exported to {target.name} ({target.address})"
        else:
            # Only an export that had succeeded may have left a port over there.
            was_exported = record.state in ("exported", "moving")
            slot = Slot(
                phase="idle",
                owned=True,
                target=target,
                exported_to=target if was_exported else None,
                since=now,
                last_error="link lost while the daemon was not running" if was_exported else None,
            )
            message = f"adopted {busid}: bound by us but not exported; exporting again"
        out.append(Adoption(busid, slot, message, target=target, rule=record.rule))
    return out
