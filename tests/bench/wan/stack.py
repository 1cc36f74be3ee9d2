"""The processes of one emulated desk/server pair on top of a Wan (netns.py).

Desk namespace:   pcscd (own mount namespace, private /run/pcscd, vpcd reader
                  "Virtual PCD" on /dev/null:0x8C00, TCP_NODELAY preload), cb-cardsim (the
                  card), cardbridge-desk (--listen tcp:10.231.0.1:40111 --insecure-tcp),
                  and for the relay mode vsmartcard's relay (vicc_relay.py) towards the server.
Server namespace: cardbridge-shim (one per measured mode, restarted between modes), and
                  for the relay mode a second pcscd whose vpcd (0x8D00) the relay feeds.
Clients (cb-replay) run in the namespace of the socket they use.

Every process runs in its own session (process group); stop_all() ends them, also on
errors and signals (the caller's finally). Logs go to <work>/<name>.log.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from cbharness import shim_control

from .netns import DESK_ADDR, SERVER_ADDR, Wan, in_ns, kill_group

DESK_VPCD_PORT = 0x8C00     # 35840, inside the desk namespace only
RELAY_VPCD_PORT = 0x8D00    # 36096, inside the server namespace only
DESK_AGENT_PORT = 40111
READER = "Virtual PCD 00 00"
VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
VSMARTCARD_PY = "/usr/lib/python3/site-packages/virtualsmartcard"
CRYPTODOME = "/usr/lib/python3/dist-packages/Cryptodome"
SYSTEM_PYTHON = "/usr/bin/python3"
_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[2]

# Fallback copy of tests/harness/nodelay_preload.c (used when the harness is absent):
# vpcd writes a frame in two send() calls; without TCP_NODELAY on pcscd's accepted
# sockets every APDU waits ~40 ms for a delayed ACK.
_NODELAY_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
static void nodelay(int fd) {
  int saved = errno, type = 0; socklen_t tl = sizeof type; struct sockaddr_storage ss; socklen_t sl = sizeof ss;
  if (fd >= 0 && getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 && type == SOCK_STREAM &&
      getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 && (ss.ss_family == AF_INET || ss.ss_family == AF_INET6)) {
    int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  errno = saved;
}
int accept(int fd, struct sockaddr *a, socklen_t *l) {
  static int (*real)(int, struct sockaddr *, socklen_t *);
  if (!real) real = dlsym(RTLD_NEXT, "accept");
  int r = real(fd, a, l); nodelay(r); return r;
}
int accept4(int fd, struct sockaddr *a, socklen_t *l, int f) {
  static int (*real)(int, struct sockaddr *, socklen_t *, int);
  if (!real) real = dlsym(RTLD_NEXT, "accept4");
  int r = real(fd, a, l, f); nodelay(r); return r;
}
"""

PROBE_TRACE = "establish\nlist\nwait 0\nrelease\n"


class StackError(RuntimeError):
    pass


class Binaries:
    def __init__(self, build: Path):
        self.build = build
        self.shim = build / "server-shim" / "cardbridge-shim"
        self.desk = build / "client-plugin" / "cardbridge-desk"
        self.cardsim = build / "tests" / "tools" / "cardsim" / "cb-cardsim"
        self.replay = build / "tests" / "tools" / "replay" / "cb-replay"

    def missing(self) -> list[str]:
        return [str(p) for p in (self.shim, self.desk, self.cardsim, self.replay) if not os.access(p, os.X_OK)]


class Shim:
    def __init__(self, name: str, socket_path: Path, proc: subprocess.Popen):
        self.name = name
        self.socket = socket_path
        self.control = Path(str(socket_path) + ".ctl")
        self.proc = proc


class Stack:
    def __init__(self, wan: Wan, bins: Binaries, work: Path, *, card_profile: str, time_scale: float,
                 seed: int, pin: str, log: Callable[[str], None], desk_log_level: str = "warn"):
        self.wan = wan
        self.desk_log_level = desk_log_level
        self.bins = bins
        self.work = work
        self.card_profile = card_profile
        self.time_scale = time_scale
        self.seed = seed
        self.pin = pin
        self.log = log
        self.procs: dict[str, subprocess.Popen] = {}
        self.desk_socket = work / "desk-run" / "pcscd.comm"
        self.relay_socket = work / "relay-run" / "pcscd.comm"
        self.card_log = work / "card.log"
        self.probe = work / "probe.trace"
        self.probe.write_text(PROBE_TRACE)
        self.nodelay = self._build_nodelay()
        self.pyshim = work / "pyshim"
        self.pyshim.mkdir(exist_ok=True)
        if not (self.pyshim / "Crypto").exists():
            os.symlink(CRYPTODOME, self.pyshim / "Crypto")

    # ---- process plumbing ------------------------------------------------------------
    def _build_nodelay(self) -> Path:
        out = self.work / "nodelay_preload.so"
        src = _REPO / "tests" / "harness" / "nodelay_preload.c"
        if not src.exists():
            src = self.work / "nodelay_preload.c"
            src.write_text(_NODELAY_C)
        cc = shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise StackError("no C compiler for the TCP_NODELAY preload")
        r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise StackError(f"building {src}: {r.stdout}")
        return out

    def _start(self, name: str, argv: list[str], env: Optional[dict] = None) -> subprocess.Popen:
        logf = open(self.work / f"{name}.log", "ab")
        full_env = dict(os.environ)
        full_env.pop("PCSCLITE_CSOCK_NAME", None)
        full_env.update(env or {})
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                             stdin=subprocess.DEVNULL)
        logf.close()
        self.procs[name] = p
        return p

    def _stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None:
            kill_group(p)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self._stop(name)

    def log_text(self, name: str) -> str:
        """What process `name` logged so far ("" before it has a log)."""
        f = self.work / f"{name}.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def log_tail(self, name: str, lines: int = 15) -> str:
        return "\n".join(self.log_text(name).splitlines()[-lines:])

    def _check_alive(self, name: str) -> Optional[str]:
        p = self.procs.get(name)
        if p is not None and p.poll() is not None:
            return f"{name} exited with {p.returncode}:\n{self.log_tail(name)}"
        return None

    def _wait(self, what: str, pred: Callable[[], bool], timeout: float, watch: list[str]) -> None:
        end = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                if pred():
                    return
            except Exception:  # noqa: BLE001 - "not yet"
                pass
            for n in watch:
                if err := self._check_alive(n):
                    raise StackError(f"while waiting for {what}: {err}")
            if time.monotonic() > end:
                tails = "\n".join(f"--- {n}.log\n{self.log_tail(n)}" for n in watch)
                raise StackError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def _pcscd(self, name: str, ns: str, run_dir: Path, port: int) -> None:
        conf = self.work / f"{name}-conf"
        conf.mkdir(exist_ok=True)
        run_dir.mkdir(exist_ok=True)
        (conf / "vpcd.conf").write_text(
            f'FRIENDLYNAME "Virtual PCD"\nDEVICENAME /dev/null:0x{port:04X}\nLIBPATH {VPCD_DRIVER}\n')
        # Own mount namespace: /run/pcscd is a private directory, so this pcscd never meets
        # the system's or another test's.
        self._start(name, [*in_ns(ns), "unshare", "-m", "--propagation", "private", "sh", "-c",
                           'mount --bind "$0" /run/pcscd && exec "$@"', str(run_dir),
                           "env", f"LD_PRELOAD={self.nodelay}", "pcscd", "--foreground", "-c", str(conf)])
        sock = run_dir / "pcscd.comm"
        self._wait(f"{name} socket", sock.exists, 10, [name])

    def probe_card(self, sock: Path, ns: str) -> bool:
        r = subprocess.run([*in_ns(ns), str(self.bins.replay), "--trace", str(self.probe), "--reader", READER],
                           env={**os.environ, "PCSCLITE_CSOCK_NAME": str(sock)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=20)
        return r.returncode == 0

    # ---- desk ------------------------------------------------------------------------
    def start_desk(self) -> None:
        ns = self.wan.desk_ns
        self._pcscd("desk-pcscd", ns, self.desk_socket.parent, DESK_VPCD_PORT)
        self._start("cardsim", [*in_ns(ns), str(self.bins.cardsim), "--profile", self.card_profile,
                                "--time-scale", f"{self.time_scale:g}", "--host", "127.0.0.1",
                                "--port", str(DESK_VPCD_PORT), "--seed", str(self.seed), "--pin", self.pin,
                                "--log", str(self.card_log)])
        self._wait("the card in the desk's reader", lambda: self.probe_card(self.desk_socket, ns), 20,
                   ["desk-pcscd", "cardsim"])
        self._start("desk-agent", [*in_ns(ns), str(self.bins.desk), "--listen", f"tcp:{DESK_ADDR}:{DESK_AGENT_PORT}",
                                   "--insecure-tcp", "--name", "emulated-desk", "--log-level", self.desk_log_level],
                    env={"PCSCLITE_CSOCK_NAME": str(self.desk_socket)})

    def card_events(self) -> tuple[int, int]:
        """(APDUs executed, warm resets) by the card so far, from its log."""
        apdus = resets = 0
        if self.card_log.exists():
            with open(self.card_log, "rb") as f:
                for line in f:
                    if b" apdu " in line:
                        apdus += 1
                    elif line.rstrip().endswith(b" reset"):
                        resets += 1
        return apdus, resets

    # ---- server: CardBridge shim -----------------------------------------------------
    def start_shim(self, name: str, mode: str, disable: str = "") -> Shim:
        d = self.work / f"shim-{name}"
        sock = d / "pcscd.comm"
        argv = [*in_ns(self.wan.server_ns), str(self.bins.shim), "--socket", str(sock),
                "--desk", f"tcp:{DESK_ADDR}:{DESK_AGENT_PORT}", "--insecure-tcp", "--mode", mode, "--log-level", "warn"]
        if disable:
            argv += ["--disable", disable]
        proc = self._start(f"shim-{name}", argv)
        shim = Shim(name, sock, proc)

        def ready() -> bool:
            st = shim_control(shim.control, {"cmd": "status"}, timeout=5)
            return st["desk"]["connected"] and any(r["card_present"] and r["name"] == READER for r in st["readers"])

        self._wait(f"shim '{name}' connected to the desk with the card", ready, 20, [f"shim-{name}", "desk-agent"])
        return shim

    def stop_shim(self, shim: Shim) -> None:
        self._stop(f"shim-{shim.name}")

    # ---- server: vsmartcard relay ----------------------------------------------------
    def start_relay(self) -> Path:
        self._pcscd("relay-pcscd", self.wan.server_ns, self.relay_socket.parent, RELAY_VPCD_PORT)
        self._start("vicc-relay", [*in_ns(self.wan.desk_ns), SYSTEM_PYTHON, str(_HERE / "vicc_relay.py"),
                                   "--hostname", SERVER_ADDR, "--port", str(RELAY_VPCD_PORT), "-v"],
                    env={"PCSCLITE_CSOCK_NAME": str(self.desk_socket),
                         "PYTHONPATH": f"{VSMARTCARD_PY}:{self.pyshim}"})
        self._wait("the relayed card in the server's pcscd",
                   lambda: self.probe_card(self.relay_socket, self.wan.server_ns), 30, ["relay-pcscd", "vicc-relay"])
        return self.relay_socket

    def stop_relay(self) -> None:
        self._stop("vicc-relay")
        self._stop("relay-pcscd")

    # ---- clients ---------------------------------------------------------------------
    def replay(self, sock: Path, ns: str, trace: Path, repeat: int, control: Optional[Path] = None,
               breakdown: bool = False, timeout: float = 1800) -> dict:
        argv = [*in_ns(ns), str(self.bins.replay), "--trace", str(trace), "--reader", READER, "--pin", self.pin,
                "--repeat", str(repeat), "--json"]
        if control is not None:
            argv += ["--control", str(control)]
        if breakdown:
            argv.append("--breakdown")
        r = subprocess.run(argv, env={**os.environ, "PCSCLITE_CSOCK_NAME": str(sock)}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout)
        try:
            out = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out = {"ok": False, "error": f"cb-replay exit {r.returncode}: {r.stderr.strip() or r.stdout.strip()}"}
        if r.returncode != 0 and out.get("ok", True):
            out["ok"] = False
            out.setdefault("error", r.stderr.strip())
        return out

    def start_client(self, sock: Path, ns: str, trace: Path) -> subprocess.Popen:
        """A replay that runs in the background (idle-session measurement)."""
        return subprocess.Popen([*in_ns(ns), str(self.bins.replay), "--trace", str(trace), "--reader", READER],
                                env={**os.environ, "PCSCLITE_CSOCK_NAME": str(sock)}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
