"""Our two programs in the guest, as processes forked from the test process.

Starting a new Python and importing the CLI costs seconds per command in the
emulated guest (more when the host is busy): the guest session started
usbipa, the daemon and `status --json` some fifty times. A forked child runs
the program's own `main(argv)` with its own environment, stdout/stderr (files)
and process: its pid, exit status, signals, file descriptors and the kernel's
view of "the process that wrote the socket" are real; only the imports are
inherited. It ends with `os._exit`, so nothing of the test process (buffers,
atexit, pytest's state) runs twice.

The systemd unit tests start the programs through systemd, as installed, and
the package test from the .deb: there the start-up itself is what is tested.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from hotplug import faultpoints
from hotplug.testing.vm import gadget as gd

HOTPLUG = "hotplug.device.cli"  # usbip-hotplug
USBIPA = "hotplug.app.cli"  # usbipa
_serial = itertools.count(1)


class Program:
    """`python -m MODULE ARGS` as a child forked from this process; Popen-like
    (pid, returncode, poll, wait, send_signal, terminate, kill)."""

    def __init__(
        self,
        module: str,
        args: Sequence[str],
        env: Mapping[str, str],
        stdout: Path,
        stderr: Path | None = None,
    ) -> None:
        self.module = module
        self.args = list(args)
        self.stdout_path = stdout
        self.stderr_path = stderr  # None: with stdout
        self.returncode: int | None = None
        main = importlib.import_module(module).main  # imported here, once, not in the child
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            self._child(main, dict(env))
        self.pid = pid

    def _child(self, main: object, env: dict[str, str]) -> None:
        code = 3
        try:
            out = os.open(self.stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            err = out
            if self.stderr_path is not None:
                err = os.open(self.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(err, 2)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            # Nothing of the test process stays open in the program: a socket the
            # test holds must close when the test closes it.
            os.closerange(3, 65536)
            sys.stdin = open(0)  # noqa: SIM115
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            root = logging.getLogger()
            for handler in list(root.handlers):  # pytest's capture handlers
                root.removeHandler(handler)
            for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.environ.clear()
            os.environ.update(env)
            # Read once at import in a new process; this one imported it unarmed.
            faultpoints._DIR = env.get(faultpoints.ENV) or None
            code = main(self.args)  # type: ignore[operator]
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)

    def __repr__(self) -> str:
        return f"<{self.module} {' '.join(self.args)} pid {self.pid}>"

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def alive(self) -> bool:
        return self.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; subprocess.TimeoutExpired after `timeout` s, as Popen."""
        try:
            gd.wait_until(
                lambda: not self.alive(), timeout=timeout or 3600.0, what=f"{self!r} to exit"
            )
        except gd.WaitTimeout:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0) from None
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.returncode = -signal.SIGKILL

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def errors(self) -> str:
        path = self.stderr_path or self.stdout_path
        return path.read_text(errors="replace")

    def result(self) -> subprocess.CompletedProcess[str]:
        assert self.returncode is not None
        return subprocess.CompletedProcess(
            [self.module, *self.args], self.returncode, self.output(), self.errors()
        )


def run(
    module: str,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 90,
    work: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one command of ours to the end, like subprocess.run(capture_output=True)."""
    folder = Path(work or tempfile.gettempdir())
    n = next(_serial)
    program = Program(
        module,
        args,
        dict(os.environ) if env is None else env,
        folder / f"run-{os.getpid()}-{n}.out",
        folder / f"run-{os.getpid()}-{n}.err",
    )
    try:
        program.wait(timeout)
    except subprocess.TimeoutExpired:
        program.kill()
        raise
    try:
        return program.result()
    finally:
        for path in (program.stdout_path, program.stderr_path):
            if path is not None:
                path.unlink(missing_ok=True)
