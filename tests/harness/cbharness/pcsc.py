"""Run pcsc_tool.py (pyscard) against a given pcscd socket in a subprocess.

    pcsc_call(desk.socket_path, "transmit", "--reader", desk.readers[0], "0084000008")
    with PcscWatch(sock, reader) as w:   # SCardGetStatusChange in a subprocess
        w.ready  -> {"ready": True, "flags": [...], ...}
        ev = w.next_event()              # {"t": monotonic, "flags": [...]}
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import weakref
from pathlib import Path
from typing import Dict, Optional

from .support import SYSTEM_PYTHON
from .waiting import HANG_GUARD_S, HarnessError, HarnessTimeout

TOOL = str(Path(__file__).with_name("pcsc_tool.py"))


def _env(socket_path: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PCSCLITE_CSOCK_NAME"] = str(socket_path)
    return env


def pcsc_call(socket_path: str, *args: str, timeout: float = HANG_GUARD_S, check: bool = True) -> dict:
    """Run one pcsc_tool command; return its JSON output.  With check=True a
    non-zero exit or an {"error": ...} result raises HarnessError."""
    cmd = [SYSTEM_PYTHON, TOOL, *args]
    try:
        r = subprocess.run(cmd, env=_env(socket_path), capture_output=True, text=True, timeout=timeout,
                           start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        raise HarnessTimeout(f"pcsc_tool {' '.join(args)} timed out after {timeout}s") from exc
    try:
        result = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
    except json.JSONDecodeError:
        result = {"error": "bad output", "stdout": r.stdout}
    if check and (r.returncode != 0 or "error" in result):
        raise HarnessError(
            f"pcsc_tool {' '.join(args)} (PCSCLITE_CSOCK_NAME={socket_path}) failed, rc={r.returncode}: "
            f"{result}\nstderr: {r.stderr[-2000:]}"
        )
    return result


def transmit(socket_path: str, reader: str, *apdus: str, **kw) -> dict:
    return pcsc_call(socket_path, "transmit", "--reader", reader, *apdus, **kw)


class PcscWatch:
    """Background `pcsc_tool watch`: SCardGetStatusChange on one reader."""

    def __init__(self, socket_path: str, reader: str, *, count: int = 10, timeout: float = HANG_GUARD_S,
                 ready_timeout: float = HANG_GUARD_S):
        cmd = [SYSTEM_PYTHON, TOOL, "watch", "--reader", reader, "--count", str(count), "--timeout", str(timeout)]
        self.popen = subprocess.Popen(cmd, env=_env(socket_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True)
        self._finalizer = weakref.finalize(self, _kill, self.popen)
        self._q: "queue.Queue[Optional[dict]]" = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        self.ready = self._get(ready_timeout, "watch to become ready")
        if "ready" not in self.ready:
            raise HarnessError(f"pcsc watch failed: {self.ready}")

    def _pump(self) -> None:
        try:
            for line in self.popen.stdout:
                line = line.strip()
                if line:
                    try:
                        self._q.put(json.loads(line))
                    except json.JSONDecodeError:
                        self._q.put({"error": "bad output", "line": line})
        except (ValueError, OSError):  # pipe closed by close()
            pass
        self._q.put(None)

    def _get(self, timeout: float, what: str) -> dict:
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            raise HarnessTimeout(f"timed out after {timeout}s waiting for {what}") from None
        if item is None:
            self.popen.wait(2)
            raise HarnessError(f"pcsc watch exited (rc={self.popen.returncode}) before {what}: "
                               f"{self.popen.stderr.read()[-2000:]}")
        return item

    def next_event(self, timeout: float = HANG_GUARD_S) -> dict:
        ev = self._get(timeout, "a reader state change")
        if "error" in ev or "timeout" in ev:
            raise HarnessError(f"pcsc watch: {ev}")
        return ev

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "PcscWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill(popen: subprocess.Popen) -> None:
    if popen.poll() is None:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        popen.wait(2)
    except subprocess.TimeoutExpired:
        pass
    for f in (popen.stdout, popen.stderr):
        try:
            f.close()
        except Exception:  # noqa: BLE001
            pass
