"""The reconciler as a table: (wanted, observed, slot) -> (actions, slot), plus backoff,
and re-adoption as a table: (record, what the kernel says) -> (slot, or drop)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from hotplug.device.policy.merge import parse_policy
from hotplug.device.policy.model import RetryPolicy, Target
from hotplug.device.reconcile import (
    LINK_SETTLE,
    Abort,
    Action,
    Export,
    Following,
    Observed,
    Probe,
    Release,
    Slot,
    Trail,
    Unexport,
    Wanted,
    adopt,
    desire,
    export_failed,
    export_succeeded,
    follow_on_arrival,
    probe_finished,
    reconcile,
    release_finished,
    retry_now,
    same_place,
    status_line,
    target_from_record,
    trail_after,
    unexport_finished,
)
from hotplug.device.records import ExportRecord
from hotplug.usb import Device, Interface, Speed

LAB = Target(
    name="lab",
    host="10.0.0.1",
    port=3240,
    fallback=("backup",),
    retry=RetryPolicy(initial=1.0, max=8.0, factor=2.0, jitter=0.5),
)
BACKUP = Target(name="backup", host="10.0.0.2", port=3240)
OTHER = Target(name="other", host="10.0.0.3", port=3240)

EXPORT = Wanted("export", "r", "rule 'r' matched vendor 1d6b", (LAB, BACKUP))
TO_OTHER = Wanted("export", "r2", "rule 'r2' matched", (OTHER,))
IGNORE = Wanted("ignore", "keep-hid", "rule 'keep-hid' matched interface_class 03 (hid)")
NONE = Wanted("none", None, "no rule matched")

FREE = Observed()
BOUND = Observed(bound=True)
USED = Observed(bound=True, used=True)
WAITING = Observed(waiting=True)  # held back from its drivers (settings.claim: before-probe)

EXPORTED = Slot(phase="exported", owned=True, target=LAB, exported_to=LAB, since=1.0)

NOW = 5.0
B = "1-1"

# id, wanted (None = unplugged), observed, slot (None = new), actions, phase (None = forgotten)
TABLE: list[tuple[str, Wanted | None, Observed, Slot | None, list[Action], str | None]] = [
    ("plugged in, wanted", EXPORT, FREE, None, [Export(B, LAB, adopt=False)], "exporting"),
    ("plugged in, no rule", NONE, FREE, None, [], "idle"),
    ("plugged in, ignored", IGNORE, FREE, None, [], "idle"),
    ("bound by another tool", EXPORT, BOUND, None, [], "foreign"),
    ("in use by another tool", EXPORT, USED, None, [], "foreign"),
    (
        "another tool let go",
        EXPORT,
        FREE,
        Slot(phase="foreign"),
        [Export(B, LAB, False)],
        "exporting",
    ),
    ("exported, link up", EXPORT, USED, EXPORTED, [], "exported"),
    # A lost link waits LINK_SETTLE first: an unplug looks like one for a moment.
    ("link lost, still bound", EXPORT, BOUND, EXPORTED, [], "backoff"),
    ("link lost, unbound by hand", EXPORT, FREE, EXPORTED, [], "backoff"),
    (
        "link lost, settled, still bound: exported again",
        EXPORT,
        BOUND,
        Slot(phase="backoff", owned=True, target=LAB, exported_to=LAB, next_at=NOW),
        [Export(B, LAB, adopt=True)],
        "exporting",
    ),
    (
        "link lost, unplugged while settling: tell the far side",
        None,
        FREE,
        Slot(phase="backoff", owned=True, target=LAB, exported_to=LAB, next_at=NOW + 1),
        [Unexport(B, LAB, True)],
        "unexporting",
    ),
    ("unplugged while exported", None, FREE, EXPORTED, [Unexport(B, LAB, True)], "unexporting"),
    ("unplugged, nothing of ours", None, FREE, Slot(), [], None),
    (
        "unplugged while bound by us in backoff",
        None,
        BOUND,
        Slot(phase="backoff", owned=True, target=LAB, next_at=99.0),
        [Release(B)],
        "releasing",
    ),
    (
        "unplugged mid-handshake",
        None,
        FREE,
        Slot(phase="exporting", owned=True, target=LAB),
        [Abort(B)],
        "exporting",
    ),
    (
        "abort is sent once",
        None,
        FREE,
        Slot(phase="exporting", target=LAB, aborting=True),
        [],
        "exporting",
    ),
    (
        "policy moved away mid-handshake",
        TO_OTHER,
        BOUND,
        Slot(phase="exporting", owned=True, target=LAB),
        [Abort(B)],
        "exporting",
    ),
    (
        "busy unexporting",
        EXPORT,
        USED,
        Slot(phase="unexporting", owned=True, exported_to=LAB),
        [],
        "unexporting",
    ),
    ("no longer matched", NONE, USED, EXPORTED, [Unexport(B, LAB, release=True)], "unexporting"),
    ("now ignored", IGNORE, USED, EXPORTED, [Unexport(B, LAB, release=True)], "unexporting"),
    ("moved to another target", TO_OTHER, USED, EXPORTED, [Unexport(B, LAB, False)], "unexporting"),
    (
        "stays on a working fallback",
        EXPORT,
        USED,
        replace(EXPORTED, target=BACKUP, exported_to=BACKUP),
        [],
        "exported",
    ),
    (
        "backoff not due",
        EXPORT,
        FREE,
        Slot(phase="backoff", target=LAB, round=1, next_at=10.0),
        [],
        "backoff",
    ),
    (
        "backoff due: a new round from the top",
        EXPORT,
        FREE,
        Slot(phase="backoff", target=BACKUP, round=1, position=1, next_at=NOW),
        [Export(B, LAB, False)],
        "exporting",
    ),
    (
        "primary failed: the fallback next",
        EXPORT,
        FREE,
        Slot(phase="idle", target=LAB, position=1),
        [Export(B, BACKUP, False)],
        "exporting",
    ),
    (
        "chain shrank under the position",
        TO_OTHER,
        FREE,
        Slot(phase="idle", position=3),
        [Export(B, OTHER, False)],
        "exporting",
    ),
    (
        "ours, still in use while the old link winds down",
        EXPORT,
        USED,
        Slot(phase="idle", owned=True),
        [],
        "idle",
    ),
    (
        "owned but released by someone: nothing to give back",
        NONE,
        FREE,
        Slot(phase="idle", owned=True),
        [],
        "idle",
    ),
    (
        "owned, bound, unwanted: give it back",
        NONE,
        BOUND,
        Slot(owned=True),
        [Release(B)],
        "releasing",
    ),
    # settings.claim: before-probe: a device no driver has seen yet.
    (
        "held back, exported: to usbip-host as it is",
        EXPORT,
        WAITING,
        None,
        [Export(B, LAB, False)],
        "exporting",
    ),
    ("held back, no rule: to its drivers", NONE, WAITING, None, [Probe(B)], "probing"),
    (
        "held back, ignored (a hub, a keyboard): to its drivers",
        IGNORE,
        WAITING,
        None,
        [Probe(B)],
        "probing",
    ),
    ("handed over once: never again", NONE, WAITING, Slot(probed=True), [], "idle"),
    (
        "held back, export refused: waits for the next round",
        EXPORT,
        WAITING,
        Slot(phase="backoff", target=LAB, next_at=10.0),
        [],
        "backoff",
    ),
    (
        "held back, export refused, then unwanted: to its drivers",
        NONE,
        WAITING,
        Slot(phase="backoff", target=LAB, next_at=10.0),
        [Probe(B)],
        "probing",
    ),
    ("being handed over", NONE, WAITING, Slot(phase="probing", probed=True), [], "probing"),
    (
        "link lost, then policy dropped it: tell the far side",
        NONE,
        BOUND,
        EXPORTED,
        [Unexport(B, LAB, True)],
        "unexporting",
    ),
]


@pytest.mark.parametrize(
    ("wanted", "observed", "slot", "actions", "phase"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_reconcile_table(
    wanted: Wanted | None,
    observed: Observed,
    slot: Slot | None,
    actions: list[Action],
    phase: str | None,
) -> None:
    plan = reconcile(
        {B: wanted} if wanted is not None else {},
        {B: observed},
        {B: slot} if slot is not None else {},
        NOW,
    )
    assert plan.actions == actions
    if phase is None:
        assert B not in plan.slots
    else:
        assert plan.slots[B].phase == phase


def test_a_device_handed_over_is_idle_and_stays_probed() -> None:
    done = probe_finished(Slot(phase="probing", probed=True), None, NOW)
    assert (done.phase, done.probed, done.last_error) == ("idle", True, None)
    plan = reconcile({B: NONE}, {B: WAITING}, {B: done}, NOW + 1)  # it found no driver
    assert plan.actions == [] and plan.notes == []


def test_link_loss_is_logged_but_unplugging_is_not_link_loss() -> None:
    lost = reconcile({B: EXPORT}, {B: BOUND}, {B: EXPORTED}, NOW)
    assert [n.event for n in lost.notes] == ["link-lost"]
    assert lost.slots[B].last_error == "link to lab lost"
    assert lost.actions == [] and lost.wake_at == NOW + LINK_SETTLE
    unplugged = reconcile({}, {B: FREE}, {B: EXPORTED}, NOW)
    assert [n.event for n in unplugged.notes] == ["unexport"]


def test_foreign_device_is_reported_once() -> None:
    first = reconcile({B: EXPORT}, {B: BOUND}, {}, NOW)
    assert [n.event for n in first.notes] == ["foreign"]
    again = reconcile({B: EXPORT}, {B: BOUND}, first.slots, NOW + 1)
    assert again.notes == [] and again.actions == []


def test_devices_are_independent() -> None:
    """One device's backoff or busy op does not hold back another's export."""
    slots = {
        "1-1": Slot(phase="exporting", target=LAB),
        "1-2": Slot(phase="backoff", target=LAB, next_at=50.0),
    }
    wanted = {"1-1": EXPORT, "1-2": EXPORT, "1-3": EXPORT}
    plan = reconcile(wanted, {}, slots, NOW)
    assert plan.actions == [Export("1-3", LAB, adopt=False)]
    assert plan.wake_at == 50.0


def test_wake_at_is_the_earliest_backoff() -> None:
    slots = {
        "1-1": Slot(phase="backoff", next_at=30.0),
        "1-2": Slot(phase="backoff", next_at=20.0),
    }
    plan = reconcile({"1-1": EXPORT, "1-2": EXPORT}, {}, slots, NOW)
    assert plan.wake_at == 20.0
    assert reconcile({"1-1": EXPORT}, {"1-1": USED}, {"1-1": EXPORTED}, NOW).wake_at is None


# --------------------------------------------------------------------------- results, backoff


def test_failed_primary_goes_to_fallback_at_once() -> None:
    trying = Slot(phase="exporting", target=LAB, position=0)
    slot = export_failed(trying, EXPORT.chain, "refused", still_bound=False, now=NOW, rand=0.3)
    assert (slot.phase, slot.position, slot.next_at, slot.round) == ("idle", 1, None, 0)
    assert slot.last_error == "refused" and slot.owned is False


def test_failed_round_backs_off_with_the_primary_retry_policy() -> None:
    trying = Slot(phase="exporting", target=BACKUP, position=1)
    slow = export_failed(trying, EXPORT.chain, "refused", still_bound=False, now=NOW, rand=0.0)
    assert (slow.phase, slow.round, slow.position) == ("backoff", 1, 0)
    assert slow.next_at == pytest.approx(NOW + 1.0)  # initial, no jitter
    fast = export_failed(trying, EXPORT.chain, "refused", still_bound=False, now=NOW, rand=1.0)
    assert fast.next_at == pytest.approx(NOW + 0.5)  # jitter 0.5 shortens by half


def test_backoff_grows_exponentially_up_to_max() -> None:
    slot = Slot(phase="exporting", target=BACKUP, position=1)
    delays = []
    for _ in range(6):
        slot = export_failed(slot, EXPORT.chain, "down", still_bound=False, now=0.0, rand=0.0)
        assert slot.next_at is not None
        delays.append(slot.next_at)
        slot = replace(slot, phase="exporting", position=1)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_failure_with_device_left_bound_keeps_it_ours() -> None:
    slot = export_failed(Slot(phase="exporting"), (LAB,), "refused", True, NOW, 0.0)
    assert slot.owned is True


def test_failure_of_an_unwanted_device_just_idles() -> None:
    slot = export_failed(Slot(phase="exporting", round=3), (), "cut", False, NOW, 0.0)
    assert slot.phase == "idle" and slot.next_at is None


def test_success_resets_the_backoff() -> None:
    failing = Slot(phase="exporting", round=4, position=1, last_error="x", aborting=True)
    slot = export_succeeded(failing, BACKUP, NOW)
    assert slot == Slot(phase="exported", owned=True, target=BACKUP, exported_to=BACKUP, since=NOW)


def test_unexport_and_release_results() -> None:
    slot = unexport_finished(replace(EXPORTED, phase="unexporting"), False, None, NOW)
    assert (slot.phase, slot.owned, slot.exported_to) == ("idle", False, None)
    moving = unexport_finished(replace(EXPORTED, phase="unexporting"), True, "timeout", NOW)
    assert moving.owned is True and moving.last_error == "timeout"
    released = release_finished(Slot(phase="releasing", owned=True), False, None, NOW)
    assert (released.phase, released.owned) == ("idle", False)


def test_retry_now_after_reload() -> None:
    slots = {"1-1": Slot(phase="backoff", round=3, next_at=99.0), "1-2": EXPORTED}
    fresh = retry_now(slots, NOW)
    assert (fresh["1-1"].next_at, fresh["1-1"].round) == (NOW, 0)
    assert fresh["1-2"] is EXPORTED


def test_target_down_then_fallback_then_up_as_a_sequence() -> None:
    """A whole story through reconcile and the result functions."""
    slots: dict[str, Slot] = {}
    now = 0.0
    plan = reconcile({B: EXPORT}, {}, slots, now)
    assert plan.actions == [Export(B, LAB, False)]
    slots = {B: export_failed(plan.slots[B], EXPORT.chain, "refused", False, now, 0.0)}
    plan = reconcile({B: EXPORT}, {}, slots, now)
    assert plan.actions == [Export(B, BACKUP, False)]
    slots = {B: export_failed(plan.slots[B], EXPORT.chain, "refused", False, now, 0.0)}
    plan = reconcile({B: EXPORT}, {}, slots, now)
    assert plan.actions == [] and plan.wake_at == 1.0
    plan = reconcile({B: EXPORT}, {}, plan.slots, 1.0)
    assert plan.actions == [Export(B, LAB, False)]
    slots = {B: export_succeeded(plan.slots[B], LAB, 1.0)}
    plan = reconcile({B: EXPORT}, {B: USED}, slots, 2.0)
    assert plan.actions == [] and plan.slots[B].phase == "exported"


# --------------------------------------------------------------------------- policy -> wanted

POLICY = parse_policy(
    [
        (
            "policy.yaml",
            """
version: 1
targets:
  lab: {address: "10.0.0.1", fallback: [backup]}
  backup: {address: "10.0.0.2:3300"}
rules:
  - name: keep-hid
    match: {interface_class: hid}
    action: ignore
  - name: gadgets
    match: {vendor: "1d6b"}
    export: lab
""",
        )
    ]
)


def _device(vendor: int = 0x1D6B, klass: int = 0, ifaces: tuple[int, ...] = (8,)) -> Device:
    return Device(
        busid="1-1",
        path="/sys/devices/x/1-1",
        busnum=1,
        devnum=2,
        speed=Speed.HIGH,
        vendor=vendor,
        product=0x0104,
        device_class=klass,
        interfaces=tuple(Interface(k, 0, 0) for k in ifaces),
    )


def test_desire_export_with_fallbacks() -> None:
    wanted = desire(POLICY, _device())
    assert wanted.exports and wanted.rule == "gadgets"
    assert [t.name for t in wanted.chain] == ["lab", "backup"]
    assert wanted.chain[1].port == 3300


def test_desire_ignore_none_hub_and_held_back() -> None:
    assert desire(POLICY, _device(ifaces=(3,))).action == "ignore"
    assert desire(POLICY, _device(vendor=0x046D)).action == "none"
    hub = desire(POLICY, _device(klass=9))
    assert hub.action == "ignore" and not hub.exports
    held = desire(POLICY, _device(), held_back=True)
    assert held.action == "none" and "coldplug" in held.reason and held.rule == "gadgets"


def test_same_place_ignores_timeouts() -> None:
    assert same_place(LAB, replace(LAB, connect_timeout=1.0, retry=RetryPolicy()))
    assert not same_place(LAB, replace(LAB, port=3241))
    assert not same_place(LAB, None)


# --------------------------------------------------------------------------- following


FOLLOWING_POLICY = parse_policy(
    [
        (
            "p.yaml",
            """\
version: 1
targets:
  lab: {address: "10.0.0.1", fallback: [backup]}
  backup: {address: "10.0.0.2:3300"}
rules:
  - name: keep-hid
    match: {interface_class: hid}
    action: ignore
  - name: fw
    match: {id: "1d6b:0104"}
    export: lab
    follow: 10
""",
        )
    ]
)
FOLLOWED = replace(EXPORTED, rule="fw", follow=10.0)
TRAIL = Trail("fw", "lab", 10.0, "1d6b:0104", until=NOW + 10.0)

# id, slot of the device that leaves (None: no slot), the trail it leaves (None: none)
TRAILS: list[tuple[str, Slot | None, Trail | None]] = [
    ("exported by a following rule", FOLLOWED, TRAIL),
    ("exported, link already lost", replace(FOLLOWED, phase="idle"), TRAIL),
    (
        "exported to its fallback",
        replace(FOLLOWED, exported_to=BACKUP),
        replace(TRAIL, target="backup"),
    ),
    ("exported by a rule without follow", EXPORTED, None),
    (
        "left while its export was under way",
        Slot(phase="exporting", target=LAB, rule="fw", follow=10.0),
        TRAIL,
    ),
    (
        "left between export attempts",
        Slot(phase="backoff", target=LAB, rule="fw", follow=10.0),
        TRAIL,
    ),
    (
        "withdrawn before it left",
        replace(FOLLOWED, phase="idle", exported_to=None, follow=None),
        None,
    ),
    ("never tried", Slot(phase="idle", follow=10.0), None),
    ("not ours", None, None),
]


@pytest.mark.parametrize(("slot", "trail"), [r[1:] for r in TRAILS], ids=[r[0] for r in TRAILS])
def test_trail_after_table(slot: Slot | None, trail: Trail | None) -> None:
    assert trail_after(slot, "1d6b:0104", NOW) == trail


# id, seconds after leaving that a device appears, follows?
ARRIVALS: list[tuple[str, float, bool]] = [
    ("at once", 0.0, True),
    ("within the window", 9.9, True),
    ("at the window's end", 10.0, False),
    ("after the window", 30.0, False),
]


@pytest.mark.parametrize(
    ("after", "follows"), [r[1:] for r in ARRIVALS], ids=[r[0] for r in ARRIVALS]
)
def test_follow_on_arrival_table(after: float, follows: bool) -> None:
    following = follow_on_arrival(TRAIL, "1d6b:0105", NOW + after)
    assert (following is not None) == follows
    if following is not None:
        assert following.after == pytest.approx(after) and following.came == "1d6b:0105"
        assert following.reason == (
            f"follows 1d6b:0104, exported by rule 'fw' (follow: 10), which left {after:.1f} s "
            "before; came back as 1d6b:0105"
        )
    assert follow_on_arrival(None, "1d6b:0105", NOW) is None


def test_a_following_device_goes_to_the_trails_target_whatever_its_ids() -> None:
    """A bootloader (other ids, even a class a rule ignores) goes where its device went."""
    following = Following(TRAIL, "1d6b:0105", 0.8)
    for device in (_device(vendor=0x1234), _device(ifaces=(3,)), _device()):
        wanted = desire(FOLLOWING_POLICY, device, following=following)
        assert wanted.exports and wanted.rule == "fw" and wanted.follow == 10.0
        assert [t.name for t in wanted.chain] == ["lab", "backup"]
        assert "came back as 1d6b:0105" in wanted.reason
    # Hubs and devices imported through vhci never follow.
    assert not desire(FOLLOWING_POLICY, _device(klass=9), following=following).exports
    vhci = replace(_device(), path="/sys/devices/platform/vhci_hcd.0/usb3/3-1")
    assert not desire(FOLLOWING_POLICY, vhci, following=following).exports
    # The target went from the policy since: nothing to follow to.
    gone = desire(
        FOLLOWING_POLICY, _device(), following=Following(replace(TRAIL, target="x"), "a", 1)
    )
    assert gone.action == "none" and "unknown target 'x'" in gone.reason
    # Without a trail, the rules decide by themselves.
    assert desire(FOLLOWING_POLICY, _device(vendor=0x1234)).action == "none"
    assert desire(FOLLOWING_POLICY, _device()).follow == 10.0


def test_the_export_carries_the_rules_follow_into_the_slot() -> None:
    """What trail_after reads is what reconcile put there when it started the export,
    and an export that succeeded keeps it."""
    wanted = desire(FOLLOWING_POLICY, _device())
    plan = reconcile({B: wanted}, {B: FREE}, {}, NOW)
    assert plan.slots[B].rule == "fw" and plan.slots[B].follow == 10.0
    done = export_succeeded(plan.slots[B], LAB, NOW + 1)
    assert trail_after(done, "1d6b:0104", NOW + 2) == replace(TRAIL, until=NOW + 12)
    # Unplugged: the unexport goes out as for any device (the kernel dropped the link).
    gone = reconcile({}, {B: FREE}, {B: done}, NOW + 2)
    assert gone.actions == [Unexport(B, LAB, release=True)]
    # No longer wanted there (a policy edit): that rule no longer follows it.
    dropped = reconcile({B: NONE}, {B: USED}, {B: done}, NOW + 2)
    assert dropped.actions == [Unexport(B, LAB, release=True)]
    assert dropped.slots[B].follow is None
    assert trail_after(dropped.slots[B], "1d6b:0104", NOW + 3) is None


# --------------------------------------------------------------------------- status line


def test_status_line() -> None:
    slots = {
        "1-1": EXPORTED,
        "1-2": EXPORTED,
        "1-3": Slot(phase="backoff", target=LAB, last_error="10.0.0.1:3240: Connection refused"),
        "1-4": Slot(phase="exporting", target=LAB),
        "1-5": Slot(phase="foreign"),
    }
    assert status_line(slots) == (
        "2 exported, 1 exporting, 1 retrying (lab: Connection refused), 1 bound by another tool"
    )
    assert status_line({}) == "0 exported"


# --------------------------------------------------------------------------- re-adoption


def test_an_export_carries_the_rule_that_wants_it() -> None:
    plan = reconcile({B: EXPORT}, {B: FREE}, {}, NOW)
    assert plan.actions == [Export(B, LAB, adopt=False)]
    assert isinstance(plan.actions[0], Export) and plan.actions[0].rule == "r"


def record(target: str = "10.0.0.1:3240", **fields: Any) -> ExportRecord:
    base: dict[str, Any] = {"by": "daemon", "state": "exported", "target": target, "pid": 7}
    base.update({"target_name": "lab", "since": 100.0, "rule": "r"}, **fields)
    return ExportRecord.from_json(base)


WALL = 130.0  # time.time() at start: the records are 30 s old
GONE = "link lost while the daemon was not running"

# id, record, present, bound, used, (slot phase or None = dropped, exported_to, since, error,
# release, message starts with)
ADOPTION: list[tuple[str, ExportRecord, bool, bool, bool, tuple[Any, ...]]] = [
    (
        "still exported: adopted as it is, its age kept",
        record(),
        True,
        True,
        True,
        ("exported", LAB, NOW - 30.0, None, False, "adopted 1-1: still exported to lab"),
    ),
    (
        "bound, link lost meanwhile: exported again",
        record(),
        True,
        True,
        False,
        ("idle", LAB, NOW, GONE, False, "adopted 1-1: bound by us but not exported"),
    ),
    (
        "moving when we stopped: its old port may still be there",
        record(state="moving"),
        True,
        True,
        False,
        ("idle", LAB, NOW, GONE, False, "adopted 1-1: bound by us"),
    ),
    (
        "still exporting when we stopped: no port over there",
        record(state="exporting"),
        True,
        True,
        False,
        ("idle", None, NOW, None, False, "adopted 1-1: bound by us"),
    ),
    (
        "unplugged while we were down: dropped, the table entry released",
        record(),
        False,
        False,
        False,
        (None, None, None, None, True, "dropping the record of 1-1: it is gone"),
    ),
    (
        "given back by hand: dropped",
        record(),
        True,
        False,
        False,
        (None, None, None, None, False, "dropping the record of 1-1: it is no longer bound"),
    ),
    (
        "a target we cannot read: dropped without a word",
        record(target="not an address"),
        True,
        True,
        True,
        (None, None, None, None, False, None),
    ),
    (
        "another version's tls keys: not ours to act on",
        record(target="tls://10.0.0.9:3240", target_name="old", tls={"pin": "x"}),
        True,
        True,
        True,
        (None, None, None, None, False, None),
    ),
]


@pytest.mark.parametrize(
    ("rec", "present", "bound", "used", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in ADOPTION],
)
def test_adopt_table(
    rec: ExportRecord, present: bool, bound: bool, used: bool, expected: tuple[Any, ...]
) -> None:
    phase, exported_to, since, error, release, message = expected
    [a] = adopt(
        [(B, rec)],
        {B} if present else set(),
        {B: bound} if present else {},
        {B: used} if bound else {},
        {"lab": LAB},
        NOW,
        WALL,
    )
    assert a.busid == B and a.release == release
    if message is None:
        assert a.message is None
    else:
        assert a.message is not None and a.message.startswith(message)
    if phase is None:
        assert a.slot is None
        return
    assert a.slot is not None and a.slot.owned and a.slot.target == LAB
    assert (a.slot.phase, a.slot.exported_to, a.slot.since, a.slot.last_error) == (
        phase,
        exported_to,
        since,
        error,
    )
    assert a.rule == "r"


def test_a_record_for_a_target_the_policy_moved_keeps_its_own_far_end() -> None:
    """The policy changed while we were down: the record's address and certificate
    files still reach the device's port; the policy's name is kept for the logs."""
    moved = Target(name="lab", host="10.9.9.9", port=3240)
    rec = record(target="tls://10.0.0.1:3241", tls={"cert": "/c", "key": "/k", "ca": None})
    target = target_from_record(rec, {"lab": moved})
    assert target is not None and target != moved
    assert (target.name, target.scheme, target.host, target.port) == (
        "lab",
        "tls",
        "10.0.0.1",
        3241,
    )
    assert target.tls is not None and target.tls.cert == "/c"
    assert target_from_record(record(), {"lab": LAB}) is LAB
