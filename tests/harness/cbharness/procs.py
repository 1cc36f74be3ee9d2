"""Child-process management that never leaves orphans behind.

Every Proc runs in its own session/process group (start_new_session=True),
so stop() can kill the command together with anything it forked.  Three
independent safety nets make sure nothing outlives the test process:

* stop() / context-manager exit: SIGTERM to the group, SIGKILL after a grace
  period;
* an atexit hook and a weakref finalizer that do the same for every Proc that
  is still running when the interpreter exits or the object is collected;
* PR_SET_PDEATHSIG(SIGKILL) in the child (only when spawned from the main
  thread, because the signal fires when the spawning *thread* exits), which
  covers the test process being SIGKILLed.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from .waiting import HarnessError

PR_SET_PDEATHSIG = 1

_live_lock = threading.Lock()
_live: "weakref.WeakSet[Proc]" = weakref.WeakSet()


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None


_LIBC = _libc()


def _make_preexec(parent_pid: int, pdeathsig: bool):
    def preexec() -> None:
        if pdeathsig and _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            # The parent may have died between fork() and prctl().
            if os.getppid() != parent_pid:
                os._exit(1)
        # Children should get default signal dispositions even if the
        # harness process (e.g. the CLI) installed handlers.
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL)

    return preexec


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - should not happen for our own children
        return False


def _group_members(pgid: int) -> List[int]:
    """Non-zombie processes in process group pgid (zombies whose new parent
    has not reaped them yet still answer kill(0), so /proc is used)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # rest: state ppid pgrp ...
        if int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


def _group_alive(pgid: int) -> bool:
    return _signal_group(pgid, 0) and bool(_group_members(pgid))


class Proc:
    """A command started with stdout+stderr redirected to a log file.

    p = Proc(["pcscd", "-f"], name="pcscd", log_path=dir / "pcscd.log").start()
    ...
    p.stop()            # SIGTERM the process group, SIGKILL after `grace`
    p.log_tail(40)      # last lines of the log
    p.failure_report()  # one string with argv, exit status and log tail
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: Optional[str] = None,
        log_path: os.PathLike | str,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[os.PathLike | str] = None,
        pdeathsig: bool = True,
        grace: float = 3.0,
        pass_fds: Sequence[int] = (),
    ):
        self.argv: List[str] = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self.log_path = Path(log_path)
        self.env: Optional[Dict[str, str]] = dict(env) if env is not None else None
        self.cwd = cwd
        self.pdeathsig = pdeathsig
        self.grace = grace
        self.pass_fds = tuple(pass_fds)  # file descriptors the child inherits (e.g. held sockets)
        self.popen: Optional[subprocess.Popen] = None
        self._finalizer: Optional[weakref.finalize] = None
        self._stopped = False

    # ------------------------------------------------------------------ start
    def start(self) -> "Proc":
        if self.popen is not None:
            raise HarnessError(f"{self.name}: already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        use_pdeathsig = self.pdeathsig and threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab", buffering=0) as log:
            try:
                self.popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,
                    preexec_fn=_make_preexec(os.getpid(), use_pdeathsig),
                    close_fds=True,
                    pass_fds=self.pass_fds,
                )
            except OSError as exc:
                raise HarnessError(f"could not start {self.name} ({' '.join(self.argv)}): {exc}") from exc
        with _live_lock:
            _live.add(self)
        # Kill the group if this object is garbage-collected while running.
        self._finalizer = weakref.finalize(self, _finalize_group, self.popen)
        return self

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> Optional[int]:
        return self.popen.pid if self.popen else None

    def poll(self) -> Optional[int]:
        return self.popen.poll() if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self.poll()

    def exit_description(self) -> str:
        rc = self.poll()
        if self.popen is None:
            return "not started"
        if rc is None:
            return "still running"
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exited with status {rc}"

    # ------------------------------------------------------------------ logs
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:])

    def failure_report(self, lines: int = 40) -> str:
        tail = self.log_tail(lines)
        return (
            f"{self.name} (pid {self.pid}, {self.exit_description()})\n"
            f"  command: {' '.join(self.argv)}\n"
            f"  log: {self.log_path}\n"
            f"  --- last {lines} log lines ---\n"
            + ("\n".join("  | " + l for l in tail.splitlines()) if tail else "  | (log is empty)")
        )

    # ------------------------------------------------------------------ stop
    def send_signal(self, sig: int) -> None:
        """Send `sig` to the process itself (not the group)."""
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.popen is None:
            raise HarnessError(f"{self.name}: not started")
        return self.popen.wait(timeout)

    def stop(self, grace: Optional[float] = None, sig: int = signal.SIGTERM) -> Optional[int]:
        """Terminate the whole process group; escalate to SIGKILL after grace."""
        if self.popen is None:
            return None
        grace = self.grace if grace is None else grace
        pgid = self.popen.pid
        if not self._stopped:
            self._stopped = True
            if self.popen.poll() is None:
                _signal_group(pgid, sig)
                try:
                    self.popen.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            # Leader gone (or stuck): make sure nothing of the group survives.
            # The pgid cannot have been recycled while any member is alive.
            _signal_group(pgid, signal.SIGKILL)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:  # pragma: no cover - D state
                pass
            deadline = time.monotonic() + grace
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.01)
        if self._finalizer is not None:
            self._finalizer.detach()
        with _live_lock:
            _live.discard(self)
        return self.popen.returncode

    kill = stop

    def __enter__(self) -> "Proc":
        if self.popen is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} {self.exit_description()}>"


def _finalize_group(popen: subprocess.Popen) -> None:
    try:
        if popen.poll() is None:
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait(2)
        else:
            _signal_group(popen.pid, signal.SIGKILL)
    except Exception:  # noqa: BLE001 - best effort at interpreter exit
        pass


def live_procs() -> List[Proc]:
    with _live_lock:
        return list(_live)


def stop_all(procs: Optional[Iterable[Proc]] = None, grace: float = 2.0) -> None:
    """Stop the given (default: all live) Procs; first SIGTERM everything,
    then wait, so shutting down N processes costs one grace period."""
    targets = list(procs) if procs is not None else live_procs()
    for p in targets:
        if p.alive():
            _signal_group(p.pid, signal.SIGTERM)
    for p in targets:
        p.stop(grace=grace)


atexit.register(stop_all)
