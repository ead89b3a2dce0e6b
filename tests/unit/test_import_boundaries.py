"""The layout's import rules (docs/ARCHITECTURE.md), checked on the source with `ast`.

- The two programs never import each other: hotplug.app (usbipa) and
  hotplug.device (usbip-hotplug) build on the rest, never on one another.
- hotplug.wire (what both speak on the network) imports no policy, no kernel
  edge and neither program.
- Nothing points up: the shared modules and hotplug.kernel import neither
  program.
- hotplug.testing (the doubles shipped on purpose, the test VM) is imported
  by the product at its documented seams only.
- The pure modules import no I/O module (DESIGN.md): usb, wire.protocol,
  wire.address, device.policy.model, device.reconcile.
- Benchmarks and tests import helpers, never a test module (`test_*.py`):
  what two test modules share lives in a helper module (tests/rig.py,
  tests/integration/daemon_rig.py, tests/vm/guest/daemon_rig.py, ...), and
  the fixtures they share in a conftest.py. The one exception reruns another
  module's tests on purpose (RERUNS).

Every import counts, at the top of a file or inside a function (a lazy
import is an import all the same); imports under `if TYPE_CHECKING:` count
for the sides but not for purity (they never run).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hotplug"
# Test modules whose tests another module collects again, elsewhere: the kTLS
# module runs the TLS channel's unit tests in the guest, where the kernel has TLS.
RERUNS = {"tests.vm.guest.test_relay_ktls": {"tests.unit.test_tls_channel"}}

# The product's way into hotplug.testing, each chosen by the caller, never by default.
TESTING_SEAMS = {
    # USBIP_HOTPLUG_FAKE_KERNEL: the fake kernel's writers.
    "hotplug.kernel": {"hotplug.testing.fake_kernel"},
    # `run --events FIFO` (hidden): the tests' event source instead of udev.
    "hotplug.device.daemon_cli": {"hotplug.testing.fifo_events"},
}
# What the pure modules may import of ours (at run time); the standard library
# parts they use are pure too (no socket, file, clock or subprocess module).
PURE = {
    "hotplug.usb": set(),
    "hotplug.wire.address": {"hotplug.errors"},
    "hotplug.wire.protocol": {"hotplug.errors", "hotplug.usb", "hotplug.wire.address"},
    "hotplug.device.policy.model": {"hotplug.errors", "hotplug.usb", "hotplug.wire.address"},
    "hotplug.device.reconcile": {
        "hotplug.device.policy.model",
        "hotplug.usb",
        "hotplug.wire.address",
    },
}
IO_STDLIB = {"os", "socket", "subprocess", "time", "threading", "asyncio", "select", "io", "random"}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    module: str  # what it imports (for `from hotplug import x`: hotplug.x)
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`

    def __str__(self) -> str:
        return f"{self.importer} (line {self.line}) imports {self.module}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, importer: str) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.body:
                    visit_stmt(stmt, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, type_only)
                continue
            visit_stmt(child, type_only)

    def visit_stmt(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(importer, alias.name, node.lineno, type_only))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "hotplug":
                for alias in node.names:
                    found.append(Import(importer, f"hotplug.{alias.name}", node.lineno, type_only))
            else:
                found.append(Import(importer, node.module, node.lineno, type_only))
                # `from tests.integration import test_daemon` imports a test module too.
                if within(node.module, "tests") and not is_test_module(node.module):
                    for alias in node.names:
                        if is_test_module(alias.name):
                            module = f"{node.module}.{alias.name}"
                            found.append(Import(importer, module, node.lineno, type_only))
        visit(node, type_only)

    visit(ast.parse(source), False)
    return found


def all_imports() -> list[Import]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += imports_of(path.read_text(), module_name(path))
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def side_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        src, dst = imp.importer, imp.module
        if not within(dst, "hotplug"):
            continue
        if within(src, "hotplug.app") and within(dst, "hotplug.device"):
            bad.append(f"{imp}: the application side must not import the device side")
        if within(src, "hotplug.device") and within(dst, "hotplug.app"):
            bad.append(f"{imp}: the device side must not import the application side")
        if within(src, "hotplug.wire") and any(
            within(dst, p) for p in ("hotplug.kernel", "hotplug.device", "hotplug.app")
        ):
            bad.append(f"{imp}: wire/ imports no policy, no kernel and neither program")
        shared = not any(
            within(src, p) for p in ("hotplug.app", "hotplug.device", "hotplug.testing")
        )
        if shared and (within(dst, "hotplug.app") or within(dst, "hotplug.device")):
            bad.append(f"{imp}: a shared module must not import either program (never up)")
        if (
            within(dst, "hotplug.testing")
            and not within(src, "hotplug.testing")
            and dst not in TESTING_SEAMS.get(src, set())
        ):
            bad.append(f"{imp}: hotplug.testing is reached only at its documented seams")
    return bad


def purity_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if imp.importer not in PURE or imp.type_only:
            continue
        top = imp.module.split(".")[0]
        if within(imp.module, "hotplug") and imp.module not in PURE[imp.importer]:
            bad.append(f"{imp}: a pure module imports only {sorted(PURE[imp.importer])}")
        elif top in IO_STDLIB:
            bad.append(f"{imp}: a pure module does no I/O")
    return bad


def is_test_module(module: str) -> bool:
    return module.rsplit(".", 1)[-1].startswith("test_")


def imported_test_modules(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if not within(imp.module, "tests") or not is_test_module(imp.module):
            continue
        if imp.module not in RERUNS.get(imp.importer, set()):
            bad.append(f"{imp}: a test module is not a library; share through a helper module")
    return bad


def test_tests_and_benchmarks_import_no_test_module() -> None:
    imports = []
    for folder in ("bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            imports += imports_of(path.read_text(), module_name(path))
    assert len({i.importer for i in imports}) > 100  # the walk found them
    assert imported_test_modules(imports) == []
    for importer, source in [
        ("bench.x", "from tests.vm.guest.test_daemon_real import Rig"),
        ("tests.integration.test_x", "from tests.integration.test_daemon import Daemon"),
        ("tests.integration.test_x", "from tests.integration import test_daemon"),
        ("tests.unit.test_x", "def f():\n    import tests.unit.test_protocol"),
    ]:
        assert imported_test_modules(imports_of(source, importer)), f"the rule misses {source!r}"
    assert imported_test_modules(imports_of("from tests.integration import daemon_rig", "t")) == []


def test_the_layout_keeps_its_import_rules() -> None:
    imports = all_imports()
    assert len({i.importer for i in imports}) > 50  # the walk found the package
    assert side_violations(imports) == []
    assert purity_violations(imports) == []


@pytest.mark.parametrize(
    ("importer", "source", "broken"),
    [
        ("hotplug.app.server", "from hotplug.device.export import export", "application side"),
        ("hotplug.device.cli", "import hotplug.app.cli", "device side"),
        ("hotplug.wire.channel", "from hotplug.kernel import make_vhci", "wire/"),
        ("hotplug.wire.tls", "from hotplug.device.policy.model import TlsOptions", "wire/"),
        ("hotplug.state", "from hotplug.device.records import exports_dir", "shared module"),
        ("hotplug.device.daemon", "from hotplug.testing.fake_kernel import FakeTree", "seams"),
        ("hotplug.app.cli", "def f():\n    from hotplug.testing import fifo_events", "seams"),
        ("hotplug.device.reconcile", "import time", "no I/O"),
        ("hotplug.device.policy.model", "from hotplug import yamlnodes", "pure module"),
    ],
)
def test_each_rule_catches_its_break(importer: str, source: str, broken: str) -> None:
    imports = imports_of(source, importer)
    found = side_violations(imports) + purity_violations(imports)
    assert found and all(broken in f for f in found[:1]), found


def test_type_only_imports_are_not_io() -> None:
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hotplug.state import X\n"
    )
    assert purity_violations(imports_of(source, "hotplug.device.reconcile")) == []
