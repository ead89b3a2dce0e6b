"""How the guest tests are shared out among the session's guests
(tests/vm/conftest.py, split_modules): whole modules, balanced, in suite order."""

from __future__ import annotations

from tests.vm.conftest import DEFAULT_TEST_SECONDS, MODULE_SECONDS, split_modules

G = "tests/vm/guest/"


def ids(module: str, n: int) -> list[str]:
    return [f"{G}{module}::test_{i}" for i in range(n)]


def test_a_module_never_spans_two_guests_and_order_is_kept() -> None:
    nodeids = ids("test_a.py", 3) + ids("test_b.py", 2) + ids("test_c.py", 4)
    groups = split_modules(nodeids, 2)
    assert sorted(n for g in groups for n in g) == sorted(nodeids)
    for group in groups:
        modules = [n.split("::")[0] for n in group]
        assert modules == sorted(modules, key=lambda m: nodeids.index(f"{m}::test_0"))
        for m in set(modules):  # all of a module's tests, in one guest
            assert modules.count(m) == len([n for n in nodeids if n.startswith(m + "::")])


def test_the_heavy_modules_are_balanced_by_their_usual_seconds() -> None:
    heavy = sorted(MODULE_SECONDS, key=MODULE_SECONDS.__getitem__, reverse=True)[:2]
    nodeids = ids(heavy[0], 2) + ids(heavy[1], 2) + ids("test_small.py", 1)
    first, second = split_modules(nodeids, 2)
    assert {n.split("::")[0] for n in first}.isdisjoint({n.split("::")[0] for n in second})
    assert any(heavy[0] in n for n in first + second)
    assert not (any(heavy[0] in n for n in first) and any(heavy[1] in n for n in first))
    assert DEFAULT_TEST_SECONDS > 0


def test_one_guest_or_one_module_gives_one_group() -> None:
    assert split_modules(ids("test_a.py", 3), 2) == [ids("test_a.py", 3)]
    nodeids = ids("test_a.py", 1) + ids("test_b.py", 1)
    assert split_modules(nodeids, 1) == [nodeids]
    assert split_modules([], 2) == []
