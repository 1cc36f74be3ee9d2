"""Shared helpers of the cdrsession tests (tests/integration/test_session_*.py). No tests here.

The pieces, all real:
    emulated desk (private pcscd + vpcd + vicc, tests/harness)
      <- cardbridge-desk --listen unix:PATH | tcp:127.0.0.1:PORT   ("DeskAgent")
      <- cardbridge-shim, started and supervised by `cdrsession start` in a session environment
         (XDG_RUNTIME_DIR of its own, optionally as another user through setpriv)
      <- PC/SC programs (cb-pcsc, pyscard) with PCSCLITE_CSOCK_NAME from `cdrsession start`

`cdrsession start` daemonises (setsid), so its processes are not children of the test: every
session a test starts goes through Sessions, which stops it with `cdrsession stop` and then kills
whatever is left that serves that session's socket path (found in /proc by exact path).
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "harness"))
from cbharness import HANG_GUARD_S, EmulatedDesk, Proc, artefact, last_json_line, shim_control, wait_until  # noqa: E402,F401
from cbharness import netinfo  # noqa: E402
from cbharness.waiting import HarnessError  # noqa: E402

BUILD = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", ROOT / "build"))
CDRSESSION = BUILD / "cdrsession" / "cdrsession"
SHIM = BUILD / "server-shim" / "cardbridge-shim"
DESK_BIN = BUILD / "client-plugin" / "cardbridge-desk"
CB_PCSC = BUILD / "tests" / "tools" / "cb-pcsc"
SYSTEM_PYTHON = "/usr/bin/python3"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

OK = "0x00000000"
E_NO_SERVICE = "0x8010001D"
W_SECURITY_VIOLATION = "0x8010006A"
E_UNKNOWN_READER = "0x80100009"
GET_CHALLENGE = "0084000008"
CPS3_ATR = "3BAC00402A001225006480000310009000"
VICC_ATR = "3B951381018073FF01000B"  # vicc's stock ISO 7816 card: no CPx card

# Exit codes of `cdrsession doctor` (cdrsession/lib/include/cardbridge/session/doctor.hpp), the
# monitoring convention: 0 ok, 1 warning, 2 critical, 3 unknown; the check is in the JSON's first_problem.
EXIT = {"healthy": 0, "environment": 2, "shim": 2, "user": 2, "channel": 2, "readers": 2, "card": 2,
        "card-type": 1, "latency": 1}
EXIT_WARNING = 1  # any warning (a plain-TCP desk link is a "channel" warning, not a failure)


def start_desk(**kw) -> EmulatedDesk:
    return EmulatedDesk(**kw).start()


def require_built() -> None:
    import pytest
    missing = [str(p) for p in (CDRSESSION, SHIM, DESK_BIN, CB_PCSC) if not p.exists()]
    if missing:
        pytest.fail(f"not built: {missing} (CARDBRIDGE_BUILD_DIR={BUILD})", pytrace=False)


def short_tmp(prefix: str) -> Path:
    """A directory for sockets (AF_UNIX paths are limited to 107 bytes), traversable by others."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d


def session_env(rt: Optional[str], **extra: Optional[str]) -> Dict[str, str]:
    """A clean session environment: none of the test runner's PCSCLITE_/XRDP/DISPLAY/CARDBRIDGE_
    variables leak in. extra=None removes a key."""
    env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/nonexistent"}
    if rt is not None:
        env["XDG_RUNTIME_DIR"] = str(rt)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def as_user(user: Optional[str]) -> List[str]:
    """argv prefix running a command as |user| (None: as ourselves)."""
    if not user:
        return []
    return ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--"]


def run(argv, env, user: Optional[str] = None, timeout: float = 30.0, input: Optional[str] = None,
        cwd: str = "/") -> subprocess.CompletedProcess:
    return subprocess.run([*as_user(user), *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=timeout, input=input, cwd=cwd)


def cdr(*args, env, user: Optional[str] = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return run([CDRSESSION, *args], env, user, timeout)


def cb_pcsc(sock: str, *args: str, user: Optional[str] = None, timeout: float = 30.0) -> dict:
    env = session_env(None, PCSCLITE_CSOCK_NAME=sock)
    return last_json_line(run([CB_PCSC, *args], env, user, timeout), f"cb-pcsc {args} on {sock}")


def shim_reader_names(sock: str, user: Optional[str] = None) -> List[str]:
    r = cb_pcsc(sock, "list", user=user)
    return [x["name"] for x in r.get("readers", [])] if r.get("list") == OK else []


def control(ctl_path: str, cmd: dict, timeout: float = 5.0) -> dict:
    """One request on a shim's control socket (same uid only: the shim refuses others)."""
    return shim_control(ctl_path, cmd, timeout)


def export_socket(stdout: str) -> str:
    """The socket path from `cdrsession start`'s export line."""
    line = next(l for l in stdout.splitlines() if l.startswith("PCSCLITE_CSOCK_NAME="))
    value = line.split("=", 1)[1].split(";", 1)[0]
    assert value.startswith("'") and value.endswith("'"), line
    return value[1:-1]


def processes_with_arg(arg: str) -> List[int]:
    """Pids of processes with |arg| as one exact argv element."""
    out = []
    for e in os.scandir("/proc"):
        if not e.name.isdigit():
            continue
        try:
            with open(f"/proc/{e.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv:
            out.append(int(e.name))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def shim_pids(sock: str) -> List[int]:
    pids = []
    for pid in processes_with_arg(sock):
        argv0 = cmdline(pid).split(" ", 1)[0]
        if os.path.basename(argv0) == "cardbridge-shim" and alive(pid):
            pids.append(pid)
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class SessionDir:
    """The layout of one session (cdrsession/lib/include/cardbridge/session/session.hpp)."""

    def __init__(self, rt: str, key: str = "default"):
        self.rt = str(rt)
        self.key = key
        self.dir = f"{rt}/cardbridge/{key}"
        self.socket = f"{self.dir}/pcscd.comm"
        self.ctl = self.socket + ".ctl"
        self.pid_file = f"{self.dir}/cdrsession.pid"

    def supervisor_pid(self) -> Optional[int]:
        try:
            return int(Path(self.pid_file).read_text().strip())
        except (OSError, ValueError):
            return None

    def logs(self) -> str:
        out = []
        for name in ("cdrsession.log", "shim.log"):
            p = Path(self.dir) / name
            try:
                out.append(f"--- {p}\n{p.read_text(errors='replace')[-6000:]}")
            except OSError:
                pass
        return "\n".join(out)


class Sessions:
    """Sessions started by a test, stopped (and, failing that, killed) at its end."""

    def __init__(self):
        self.started: List[tuple] = []  # (SessionDir, env, user)
        self.supervisors: List[Optional[int]] = []

    def start(self, env: Dict[str, str], *args: str, user: Optional[str] = None, key: str = "default",
              expect_ok: bool = True, wrap=()) -> tuple:
        """wrap: argv prefix (e.g. ip netns exec NS) for the supervisor and its shim."""
        sd = SessionDir(env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}", key)
        self.started.append((sd, env, user))
        if any(a.startswith("tcp:") for a in args):
            args = (*args, "--insecure-tcp")  # a plain TCP desk link is refused without it (test links on 127.0.0.1)
        r = run([*wrap, CDRSESSION, "start", *args], env, user)
        self.supervisors.append(sd.supervisor_pid())  # before a test may remove the directory
        if expect_ok:
            assert r.returncode == 0, f"cdrsession start failed ({r.returncode}): {r.stderr}\n{sd.logs()}"
        return r, sd

    def stop_all(self) -> None:
        """SIGTERM to every supervisor at once (what `cdrsession stop` sends; the stop command itself
        is tested in test_session_lifecycle.py), then SIGKILL to whatever still serves a socket.
        (`cdrsession stop` one by one would wait for each zombie supervisor to be reaped by PID 1,
        which is slow on this test machine.)"""
        candidates = list(self.supervisors)
        for sd, env, user in self.started:
            candidates += [sd.supervisor_pid()] + [parent_of(p) for p in shim_pids(sd.socket)]
        # (a recorded pid may have been reused: only cdrsession processes)
        supervisors = {p for p in candidates if p and "cdrsession" in cmdline(p)}
        for pid in supervisors:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in supervisors):
            time.sleep(0.05)
        for sd, env, user in self.started:
            for p in [x for x in supervisors if alive(x)] + shim_pids(sd.socket):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.started.clear()
        self.supervisors.clear()


class DeskAgent:
    """An emulated desk and the desk agent serving it (unix socket or TCP on 127.0.0.1)."""

    def __init__(self, name: str, friendly_name: str = "Virtual PCD", slots: int = 2, cards=({"slot": 0},),
                 tcp: bool = False, agent_args=(), desk_name: Optional[str] = None, log_level: str = "info",
                 desk: Optional[EmulatedDesk] = None, netns: Optional[str] = None, port: Optional[int] = None):
        """desk: an emulated desk started elsewhere (shared by several agents; not stopped here).
        netns: run the agent in that network namespace (TCP then means its own 127.0.0.1)."""
        self.name = name
        self.rt = short_tmp(f"cbs{name}-")
        self.own_desk = desk is None
        self.desk = desk
        self.agent: Optional[Proc] = None
        try:
            if self.own_desk:
                self.desk = start_desk(slots=slots, friendly_name=friendly_name, name=name)
                for c in cards:
                    c = dict(c)
                    self.desk.insert_card(c.pop("slot"), **c)
            if port:  # (a fixed port: only in a private network namespace, where nothing else runs)
                self.spec = f"tcp:127.0.0.1:{port}"
            elif tcp:
                # port 0: the agent binds a port the kernel picks and holds it; the test reads it
                # from /proc (never a port checked free, released, and bound again)
                self.spec = "tcp:127.0.0.1:0"
            else:
                self.spec = f"unix:{self.rt}/agent.sock"
            prefix = ["ip", "netns", "exec", netns] if netns else []
            insecure = ["--insecure-tcp"] if self.spec.startswith("tcp:") else []
            self.agent = Proc([*prefix, str(DESK_BIN), "--listen", self.spec, "--name", desk_name or name,
                               "--log-level", log_level, *insecure, *agent_args], name=f"agent-{name}",
                              log_path=self.rt / "agent.log", env={**session_env(None), **self.desk.env()}).start()
            agent = self.agent
            wait_until(lambda: "listening on" in agent.log_text(), timeout=HANG_GUARD_S, desc=f"desk agent {name}",
                       abort=lambda: None if agent.alive() else agent.exit_description(),
                       details=lambda: agent.failure_report())
            if self.spec == "tcp:127.0.0.1:0":
                [bound] = wait_until(lambda: netinfo.listening_tcp_ports(agent.pid), timeout=HANG_GUARD_S,
                                     desc=f"desk agent {name}'s TCP port")
                self.spec = f"tcp:127.0.0.1:{bound}"
        except BaseException:
            self.stop()
            raise

    @property
    def readers(self) -> List[str]:
        return self.desk.readers

    def report(self) -> str:
        parts = [self.agent.failure_report(30)] if self.agent else []
        try:
            parts.append(self.desk.failure_report())
        except Exception as exc:  # noqa: BLE001
            parts.append(f"(desk report failed: {exc})")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop(grace=3)
        try:
            if self.own_desk and self.desk is not None:
                self.desk.stop()
        finally:
            shutil.rmtree(self.rt, ignore_errors=True)


class ThrowawayUser:
    """A real local user for the test (useradd), with a private XDG_RUNTIME_DIR; removed after."""

    def __init__(self, prefix: str, base: Path):
        self.name = f"{prefix}{os.getpid() % 100000}"
        subprocess.run(["userdel", "-f", self.name], capture_output=True)  # a leftover of a killed run
        r = subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                            "--user-group", self.name], capture_output=True, text=True)
        assert r.returncode == 0, f"useradd {self.name}: {r.stderr}"
        pw = pwd.getpwnam(self.name)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.rt = base / self.name
        self.rt.mkdir(mode=0o700)
        os.chown(self.rt, self.uid, self.gid)
        self.rt.chmod(0o700)

    def env(self, **extra) -> Dict[str, str]:
        return session_env(str(self.rt), USER=self.name, LOGNAME=self.name, **extra)

    def remove(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.rt, ignore_errors=True)
        for _ in range(20):
            r = subprocess.run(["userdel", "-f", self.name], capture_output=True, text=True)
            if r.returncode == 0 or "does not exist" in r.stderr:
                return
            time.sleep(0.1)

    def pids(self) -> List[int]:
        out = []
        for e in os.scandir("/proc"):
            if e.name.isdigit():
                try:
                    if os.stat(f"/proc/{e.name}").st_uid == self.uid:
                        out.append(int(e.name))
                except OSError:
                    pass
        return out


# The doctor's latency check compares measured round trips with thresholds (50 ms median,
# 200 ms p99 by default): on a loaded CI machine a local link can cross them. Tests whose subject
# is not the latency pass these instead, so that their verdict does not depend on the load; the
# latency check itself is proven with the default thresholds on a link whose delay is a lower
# bound (test_session_doctor.py::test_slow_link).
LOAD_PROOF_LATENCY = ("--slow-median-ms", "600000", "--slow-p99-ms", "600000")


def doctor(env: Dict[str, str], *args: str, user: Optional[str] = None, json_out: bool = False,
           timeout: float = HANG_GUARD_S, default_latency_thresholds: bool = False) -> tuple:
    """(exit code, text or parsed JSON, stderr) of `cdrsession doctor`. Unless asked for the
    default latency thresholds (or given thresholds in args), LOAD_PROOF_LATENCY is passed."""
    if not default_latency_thresholds and "--slow-median-ms" not in args:
        args = (*args, *LOAD_PROOF_LATENCY)
    r = cdr("doctor", *(["--json"] if json_out else []), *args, env=env, user=user, timeout=timeout)
    out = r.stdout
    if json_out:
        try:
            out = json.loads(r.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"doctor --json printed no JSON ({exc}): {r.stdout!r} {r.stderr}")
    return r.returncode, out, r.stderr


def check_of(report: dict, cid: str) -> dict:
    return next(c for c in report["checks"] if c["id"] == cid)


class DelayRelay:
    """A TCP relay on 127.0.0.1 that holds every chunk |delay_s| in each direction, in order: a
    link of round-trip time 2 * delay_s between a shim and a desk agent (the fallback for kernels
    without sch_netem)."""

    def __init__(self, target: tuple, delay_s: float):
        import queue
        import threading
        self._queue, self._threading = queue, threading
        self.target, self.delay = target, delay_s
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.conns: List[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target, timeout=HANG_GUARD_S)
            except OSError:
                a.close()
                continue
            b.settimeout(None)
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns += [a, b]
            self._pipe(a, b)
            self._pipe(b, a)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        q = self._queue.Queue()

        def reader():
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                q.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        def writer():
            while True:
                due, data = q.get()
                left = due - time.monotonic()
                if left > 0:
                    time.sleep(left)
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        self._threading.Thread(target=reader, daemon=True).start()
        self._threading.Thread(target=writer, daemon=True).start()

    def close(self) -> None:
        self.closed = True
        try:
            self.lsock.close()
        except OSError:
            pass
        for s in self.conns:
            for op in (lambda: s.shutdown(socket.SHUT_RDWR), s.close):
                try:
                    op()
                except OSError:
                    pass
