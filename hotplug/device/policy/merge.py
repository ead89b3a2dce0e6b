"""The policy files together: targets merged by name, rules in file order. Pure.

Targets are merged by name (a name may be defined once across all files),
rules are concatenated in file order (first match wins), `settings` may
appear in one file only; fallback names must exist and form no cycle.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType

from hotplug.device.policy.model import Policy, PolicyError, PolicyErrors, Rule, Settings, Target
from hotplug.device.policy.parse import FileParser, Ref
from hotplug.yamlnodes import (
    join_key,
    suggest,
)

# --------------------------------------------------------------------------
# Merging files


def parse_policy(sources: Sequence[tuple[str, str]]) -> Policy:
    """Build a policy from (display file name, text) pairs, in merge order.

    Pure. Raises PolicyError for one problem, PolicyErrors for several.
    No sources (or only empty files) give the empty policy, which exports
    nothing.
    """
    errors: list[PolicyError] = []
    results = [FileParser(name, errors).parse(text) for name, text in sources]

    declared: dict[str, str] = {}  # target name -> "file:line", including broken ones
    targets: dict[str, Target] = {}
    settings: tuple[Settings, str] | None = None
    for (name, _), result in zip(sources, results, strict=True):
        for tdef in result.targets:
            here = f"{tdef.file}:{tdef.line}"
            if tdef.name in declared:
                errors.append(
                    PolicyError(
                        tdef.file,
                        tdef.line,
                        join_key("targets", tdef.name),
                        f"target '{tdef.name}' is already defined at {declared[tdef.name]}; "
                        "target names must be unique across all policy files",
                    )
                )
                continue
            declared[tdef.name] = here
            if tdef.target is not None:
                targets[tdef.name] = tdef.target
        if result.settings is not None:
            value, line = result.settings
            if settings is not None:
                errors.append(
                    PolicyError(
                        name,
                        line,
                        "settings",
                        f"already given at {settings[1]}; settings may appear in one file only",
                    )
                )
            else:
                settings = (value, f"{name}:{line}")

    for result in results:
        for ref in result.refs:
            if ref.name not in declared:
                known = sorted(declared)
                listing = (
                    f"defined targets: {', '.join(known)}" if known else "no targets are defined"
                )
                errors.append(
                    PolicyError(
                        ref.file,
                        ref.line,
                        ref.key,
                        f"unknown target '{ref.name}'{suggest(ref.name, known)} ({listing})",
                    )
                )
    errors.extend(_cycle_errors(targets, [r for res in results for r in res.refs if r.owner]))

    rules: list[Rule] = []
    rule_names: dict[str, str] = {}
    for rdef in (r for res in results for r in res.rules):
        number = len(rules) + 1
        name = rdef.name if rdef.name is not None else f"rule {number}"
        where = f"{rdef.file}:{rdef.name_line or rdef.line}"
        if name in rule_names:
            errors.append(
                PolicyError(
                    rdef.file,
                    rdef.name_line or rdef.line,
                    join_key(rdef.key, "name"),
                    f"rule name '{name}' is already used at {rule_names[name]}; "
                    "give each rule its own name",
                )
            )
        rule_names.setdefault(name, where)
        if rdef.rule is not None:
            rules.append(replace(rdef.rule, name=name))
        else:
            rules.append(Rule(name, (), "ignore", None))  # placeholder keeps numbering

    if errors:
        order = {name: i for i, (name, _) in reversed(list(enumerate(sources)))}
        errors.sort(key=lambda e: (order.get(e.file, len(order)), e.line or 0))
        raise errors[0] if len(errors) == 1 else PolicyErrors(errors)
    return Policy(
        targets=MappingProxyType(targets),
        rules=tuple(rules),
        settings=settings[0] if settings else Settings(),
        sources=tuple(name for name, _ in sources),
    )


def _cycle_errors(targets: Mapping[str, Target], refs: Sequence[Ref]) -> list[PolicyError]:
    """One error per fallback cycle, at the fallback entry that closes it."""
    graph = {name: [f for f in t.fallback if f in targets] for name, t in targets.items()}
    where = {(r.owner, r.name): r for r in refs}
    errors: list[PolicyError] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in graph:
        if start in state:
            continue
        path: list[str] = [start]
        state[start] = 1
        stack: list[Iterator[str]] = [iter(graph[start])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                state[path.pop()] = 2
            elif state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                ref = where.get((path[-1], nxt))
                if ref is not None:
                    errors.append(
                        PolicyError(
                            ref.file, ref.line, ref.key, "fallback cycle: " + " -> ".join(cycle)
                        )
                    )
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(graph[nxt]))
    return errors
