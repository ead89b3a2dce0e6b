"""What starting a program costs in imports: `python -X importtime`, summed.

    python -m bench.importtime [--runs 9] [--tree DIR=LABEL ...]

For each start-up below, runs `python -X importtime` on it `--runs` times in
a fresh interpreter and prints the median of the total import time (the
top-level imports' cumulative times added up), how many of our modules it
loaded, and whether it loaded PyYAML, ssl or prometheus_client. The bare
interpreter's own start-up (what `python -c pass` imports) is left out:

- usbipa: the console script's import (`hotplug.app.cli`; before the layout
  of issue 13, `hotplug.appd_cli`).
- relay: the device side's relay process (`hotplug.device.tunnel`; before,
  `hotplug.tunnel`).
- status: `usbip-hotplug status` run to its end against no daemon (it exits
  at once saying so): what a user waits for.

--tree runs the same against other checkouts (e.g. a `git archive main`
unpacked in /tmp), with their own module names, runs interleaved so that a
busy machine weighs on both alike. Figures are in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import machine

ROOT = Path(__file__).resolve().parent.parent
# The layout of issue 13, and the flat one before it.
NEW = {
    "usbipa": ["-c", "import hotplug.app.cli"],
    "relay": ["-c", "import hotplug.device.tunnel"],
    "status": ["-m", "hotplug.device.cli", "status"],
}
OLD = {
    "usbipa": ["-c", "import hotplug.appd_cli"],
    "relay": ["-c", "import hotplug.tunnel"],
    "status": ["-m", "hotplug.cli", "status"],
}
MARKERS = ("yaml", "ssl", "prometheus_client")


def one_run(
    tree: Path, argv: list[str], state: str, startup: frozenset[str] = frozenset()
) -> tuple[int, int, set[str]]:
    """(total import µs, our modules, markers loaded) of one start-up; the
    top-level imports in `startup` (the bare interpreter's own) are not counted."""
    env = {**os.environ, "USBIP_HOTPLUG_STATE_DIR": state, "PYTHONPATH": str(tree)}
    env.pop("PYTHONSTARTUP", None)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    total = ours = 0
    markers: set[str] = set()
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        module = name.strip()
        top = not name.startswith("   ")
        if top and module not in startup and cumulative.strip().isdigit():
            total += int(cumulative)
        if module == "hotplug" or module.startswith("hotplug."):
            ours += 1
        if module in MARKERS:
            markers.add(module)
    return total, ours, markers


def bare_startup(tree: Path, state: str) -> frozenset[str]:
    """The top-level imports of `python -c pass`: the interpreter's own start-up
    (site, encodings, a development install's path hook), the same for all."""
    env = {**os.environ, "USBIP_HOTPLUG_STATE_DIR": state, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            name = line.split("|")[2]
            if not name.startswith("   "):
                names.add(name.strip())
    return frozenset(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.importtime", description=__doc__)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="DIR=LABEL",
        help="also measure another checkout (flat layout: append :old to LABEL)",
    )
    args = parser.parse_args(argv)
    trees = [(ROOT, "this tree", NEW)]
    for item in args.tree:
        path, _, label = item.partition("=")
        names = OLD if label.endswith(":old") else NEW
        trees.append((Path(path), label.removesuffix(":old") or path, names))
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-importtime-") as state:
        startup = bare_startup(ROOT, state)
        results: dict[tuple[str, str], list[tuple[int, int, set[str]]]] = {}
        for _ in range(args.runs):
            for tree, label, names in trees:
                for what, command in names.items():
                    results.setdefault((label, what), []).append(
                        one_run(tree, command, state, startup)
                    )
    print(f"{'start-up':<8} {'tree':<12} {'imports ms (median)':>20} {'our modules':>12}  loads")
    for (label, what), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        median = statistics.median(r[0] for r in runs) / 1000
        ours = max(r[1] for r in runs)
        loads = ", ".join(sorted(set().union(*(r[2] for r in runs)))) or "-"
        print(f"{what:<8} {label:<12} {median:>20.1f} {ours:>12}  {loads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
