"""The test VM's agent: the guest's boot command, talking JSON lines with the host.

`python -S -m hotplug.testing.vm.agent --fast-path=DIR ...` (guest.py's boot
script) reads requests on the guest's stdin and writes frames, marked with
FRAME_MARK, on its stdout (virtio-serial ports wired to virtme-run's stdin
and stdout): run commands (several at once), stream their output line by
line, kill them, read and write files. Standard library only, and nothing
but this package's empty __init__ files on the way: with `-S` (no
site-packages) Python starts faster under emulation.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

# Marks agent frames on the guest's stdout; anything else there is passed on.
FRAME_MARK = "\x1eUSBIPVM "


# ---------------------------------------------------------------------------
# guest side: the agent


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


class _Agent:
    """Runs in the guest: reads requests on stdin, writes frames on stdout."""

    def __init__(self) -> None:
        self._out = sys.stdout.buffer
        self._lock = threading.Lock()
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._plock = threading.Lock()

    def emit(self, msg: Mapping[str, Any]) -> None:
        data = (FRAME_MARK + json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self._out.write(data)
            self._out.flush()

    @staticmethod
    def check_fast_paths(paths: Sequence[str]) -> list[str]:
        """Notes about fast paths the boot script failed to mount."""
        try:
            with open("/proc/self/mountinfo") as f:
                points = {line.split()[4] for line in f}
        except OSError:
            return []
        return [
            f"{p} is not on the cached 9p mount (slow Python start)"
            for p in paths
            if p not in points
        ]

    def serve(self, binds: Sequence[str]) -> int:
        notes = self.check_fast_paths(binds)
        self.emit(
            {
                "op": "hello",
                "release": os.uname().release,
                "pid": os.getpid(),
                "notes": notes,
                "uptime": _uptime(),
                "fast_paths": list(binds),
            }
        )
        for raw in sys.stdin.buffer:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            op = msg.get("op")
            if op == "shutdown":
                break
            if op == "run":
                threading.Thread(target=self._run, args=(msg,), daemon=True).start()
            elif op == "kill":
                self._kill(int(msg.get("target", 0)))
            elif op in ("read", "write"):
                self._file_op(msg)
        with self._plock:
            targets = list(self._procs)
        for rid in targets:
            self._kill(rid)
        return 0

    def _file_op(self, msg: Mapping[str, Any]) -> None:
        rid = msg.get("id")
        try:
            path = str(msg["path"])
            if msg["op"] == "read":
                with open(path, "rb") as f:
                    data = f.read()
                self.emit({"id": rid, "op": "data", "data": base64.b64encode(data).decode()})
            else:
                with open(path, "wb") as f:
                    f.write(base64.b64decode(str(msg.get("data", ""))))
                os.chmod(path, int(msg.get("mode", 0o644)))
                self.emit({"id": rid, "op": "ok"})
        except (OSError, ValueError, KeyError) as e:
            self.emit({"id": rid, "op": "error", "error": str(e)})

    def _kill(self, rid: int) -> None:
        with self._plock:
            p = self._procs.get(rid)
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)

    def _pump(self, rid: int, fd: int, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.emit({"id": rid, "op": "out", "fd": fd, "text": raw.decode("utf-8", "replace")})

    def _run(self, msg: Mapping[str, Any]) -> None:
        rid = int(msg["id"])
        argv = [str(a) for a in msg["argv"]]
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in (msg.get("env") or {}).items()})
        timeout = float(msg.get("timeout") or 60.0)
        try:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=msg.get("cwd") or None,
                start_new_session=True,
            )
        except OSError as e:
            self.emit({"id": rid, "op": "exit", "rc": 127, "error": f"cannot start: {e}"})
            return
        with self._plock:
            self._procs[rid] = p
        assert p.stdout is not None and p.stderr is not None
        pumps = [
            threading.Thread(target=self._pump, args=(rid, 1, p.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(rid, 2, p.stderr), daemon=True),
        ]
        for t in pumps:
            t.start()
        timed_out = False
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            rc = p.wait()
        # A daemon started by the command may keep the pipes open: wait a
        # little for the output, not for the daemon.
        for t in pumps:
            t.join(5)
        with self._plock:
            self._procs.pop(rid, None)
        self.emit({"id": rid, "op": "exit", "rc": rc, "timed_out": timed_out})


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -S -m hotplug.testing.vm.agent")
    ap.add_argument("--fast-path", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return _Agent().serve(args.fast_path)


if __name__ == "__main__":
    sys.exit(main())
