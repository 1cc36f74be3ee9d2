"""Stock FreeRDP client and a real xrdp server for end-to-end tests, without touching the host.

Used by tests/integration/test_xfreerdp_stock.py, tests/integration/test_xrdp_e2e.py and
tests/bench/rdp_bench.py. Everything needs root (mount namespaces) and cleans up after itself.

  Xvfb          a private X display for xfreerdp (`Xvfb -displayfd`: no display-number races)
  AddinMount    makes libcardbridge-client.so visible at FreeRDP's only add-in directory,
                /usr/lib/x86_64-linux-gnu/freerdp2 (freerdp3 for FreeRDP 3), for ONE command: the command runs in a private
                mount namespace where a tmpfs-backed overlayfs is mounted over
                /usr/lib/x86_64-linux-gnu with freerdp2/libcardbridge-client.so in its upper
                layer (Debian does not ship that directory, so there is nothing to bind-mount
                over; if it exists, the add-in directory is bind-mounted instead). The host's
                /usr is never written; the mounts vanish with the command's last process.
  StockClient   `xfreerdp /vc:cardbridge` (or /dvc:) under Xvfb through AddinMount
  XrdpServer    xrdp + xrdp-sesman in a private mount namespace: private /etc/xrdp (a copy of
                the system one with CBRIDGE=true under [Channels], set by the product's own
                installers/xrdp/cardbridge-xrdp-config; free ports; a fresh certificate; logs in
                the test directory), private /run (overlay: /run/xrdp/sockdir), and a test user
                that exists only inside the namespace (private /etc/passwd, /etc/group and
                /etc/shadow bind-mounted over the host's: nothing to clean up in the host's user
                database, no clash between parallel runs). Xorg + xorgxrdp is the X backend
                (the Xvnc backend needs tigervnc, which is not installed). The session start
                script (private /etc/xrdp/startwm.sh) sources the product's xrdp hook
                (installers/profile.d/cardbridge.sh, i.e. `cdrsession start --desk xrdp
                --until-pid $$`) and then keeps the session alive; it writes the session's
                DISPLAY, PCSCLITE_CSOCK_NAME and leader pid where the test can read them.
                Sockets the test uses live in the host's /tmp (XDG_RUNTIME_DIR of the user),
                so the test talks to the shim from outside the namespace, as that user.
  cb_pcsc, PcscSession, shim_status, tcp_bytes   PC/SC and counters, optionally as another uid

Env: CARDBRIDGE_BUILD_DIR (default <repo>/build), CARDBRIDGE_ADDIN (the add-in),
     CARDBRIDGE_SHIM (the cardbridge-shim to test, e.g. a patched one),
     CARDBRIDGE_FREERDP (2 or 3: the FreeRDP flavour: stock xfreerdp or xfreerdp3 and its add-in
     directory; default 2), CARDBRIDGE_FREERDP_BUILD_DIR (that flavour's build directory: add-in,
     cb-rdp-host, cb-rdp-client; default CARDBRIDGE_BUILD_DIR),
     CARDBRIDGE_INSTALLED=1 (the installed packages' files: /usr/bin, FreeRDP's add-in directory,
     /etc/profile.d/cardbridge.sh, /usr/libexec/cardbridge; nothing from the build tree but test tools).

Cleanup: every process of an XrdpServer runs in its mount namespace; stop() TERMs, then KILLs,
exactly the processes of that namespace (found through /proc/PID/ns/mnt). A watchdog shell in
the namespace does the same if the test process dies without stopping it.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "harness"))
from cbharness import Proc, last_json_line, shim_control, wait_until  # noqa: E402
from cbharness.ports import reserve_ports  # noqa: E402

BUILD = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", ROOT / "build"))
FLAVOUR = os.environ.get("CARDBRIDGE_FREERDP", "2")
if FLAVOUR not in ("2", "3"):
    raise RuntimeError(f"CARDBRIDGE_FREERDP must be 2 or 3, not {FLAVOUR!r}")
FREERDP_BUILD = Path(os.environ.get("CARDBRIDGE_FREERDP_BUILD_DIR", BUILD))
INSTALLED = os.environ.get("CARDBRIDGE_INSTALLED") in ("1", "true", "yes")
LIBDIR = "/usr/lib/x86_64-linux-gnu"
ADDIN_DIR = LIBDIR + f"/freerdp{FLAVOUR}"
XFREERDP = "xfreerdp" if FLAVOUR == "2" else "xfreerdp3"
if INSTALLED:
    # What the packages installed, and nothing of the build tree but the test's own tools.
    ADDIN = Path(ADDIN_DIR) / "libcardbridge-client.so"
    SHIM = Path("/usr/bin/cardbridge-shim")
    CDRSESSION = Path("/usr/bin/cdrsession")
    PROFILE_HOOK = Path("/etc/profile.d/cardbridge.sh")
    XRDP_CONFIG_TOOL = Path("/usr/libexec/cardbridge/cardbridge-xrdp-config")
else:
    ADDIN = Path(os.environ.get("CARDBRIDGE_ADDIN", FREERDP_BUILD / "client-plugin" / "libcardbridge-client.so"))
    SHIM = Path(os.environ.get("CARDBRIDGE_SHIM", BUILD / "server-shim" / "cardbridge-shim"))
    CDRSESSION = BUILD / "cdrsession" / "cdrsession"
    PROFILE_HOOK = ROOT / "installers" / "profile.d" / "cardbridge.sh"
    XRDP_CONFIG_TOOL = ROOT / "installers" / "xrdp" / "cardbridge-xrdp-config"
CB_PCSC = BUILD / "tests" / "tools" / "cb-pcsc"
RDP_HOST = FREERDP_BUILD / "tests" / "tools" / "rdp_host" / "cb-rdp-host"
RDP_CLIENT = FREERDP_BUILD / "tests" / "tools" / "rdp_client" / "cb-rdp-client"
SYSTEM_PYTHON = "/usr/bin/python3"
OK = "0x00000000"
E_INVALID_VALUE = "0x80100011"       # SCARD_E_INVALID_VALUE
E_READER_UNAVAILABLE = "0x80100017"  # SCARD_E_READER_UNAVAILABLE
GET_CHALLENGE = "0084000008"


# ----------------------------------------------------------------------------------- basics

def missing(*names: str) -> List[str]:
    """Programs (names on PATH or absolute paths) that are not there."""
    out = []
    for n in names:
        if os.path.isabs(n):
            if not os.access(n, os.X_OK):
                out.append(n)
        elif shutil.which(n) is None:
            out.append(n)
    return out


def listening(port: int) -> bool:
    """A TCP socket of this network namespace listens on `port` (any address)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            pass
    return False


def tcp_bytes(port: int) -> Dict[str, int]:
    """Bytes sent and received so far on the established TCP connections to local port `port`,
    seen from the server side (`ss -tin`): what really crossed the RDP connection."""
    r = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                       capture_output=True, text=True, timeout=10)
    sent = received = conns = 0
    for m in re.finditer(r"bytes_sent:(\d+)|bytes_received:(\d+)", r.stdout):
        if m.group(1):
            sent += int(m.group(1))
            conns += 1
        else:
            received += int(m.group(2))
    return {"sent": sent, "received": received, "connections": conns}


def proc_io(pid: int) -> Dict[str, int]:
    """/proc/PID/io counters (rchar/wchar: bytes through read/write-like system calls)."""
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def _user_kwargs(uid: Optional[int], gid: Optional[int]) -> dict:
    if uid is None:
        return {}
    return {"user": uid, "group": gid if gid is not None else uid, "extra_groups": []}


def client_env(sock: str, home: Optional[str] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCSCLITE_", "PYTHON"))}
    env["PCSCLITE_CSOCK_NAME"] = sock
    if home:
        env["HOME"] = home
    return env


def cb_pcsc(sock: str, *args: str, uid: Optional[int] = None, timeout: float = 60.0, binary: Path = CB_PCSC) -> dict:
    """Runs cb-pcsc against `sock` (as `uid` if given); its last JSON line."""
    r = subprocess.run([str(binary), *args], env=client_env(sock, "/"), capture_output=True, text=True,
                       timeout=timeout, **_user_kwargs(uid, None))
    return last_json_line(r, f"cb-pcsc {args} on {sock}")


NO_READERS = "0x8010002E"   # SCARD_E_NO_READERS_AVAILABLE: what pcscd answers with no reader


def reader_names(sock: str, uid: Optional[int] = None) -> List[str]:
    """The readers a PC/SC program sees on `sock`. [] only for pcscd's own "no reader" answer:
    any other failure (a dead shim: SCARD_E_NO_SERVICE) raises, so that "the readers vanished"
    cannot be mistaken for "the shim crashed"."""
    r = cb_pcsc(sock, "list", uid=uid, timeout=15)
    if r.get("list") == OK:
        return [x["name"] for x in r.get("readers", [])]
    if r.get("list") == NO_READERS:
        return []
    raise AssertionError(f"SCardListReaders on {sock} failed: {r}")


def shim_status(sock: str) -> dict:
    """The shim's `{"cmd":"status"}` answer (control socket SOCK.ctl)."""
    return shim_control(sock + ".ctl", {"cmd": "status"})


# A PC/SC session that outlives single calls: one JSON command per stdin line, one JSON answer per
# stdout line (pyscard on the system python). "gsc" blocks in SCardGetStatusChange on a thread of
# its own and answers when it returns (its answer may come later than those of other commands).
SESSION_TOOL = r'''
import json, sys, threading
from smartcard import scard as S
lock = threading.Lock()
def out(o):
    with lock:
        print(json.dumps(o), flush=True)
def rvs(rv): return "0x%08X" % (rv & 0xFFFFFFFF)
rv, hc = S.SCardEstablishContext(S.SCARD_SCOPE_USER)
out({"establish": rvs(rv)})
card, proto = None, None
def gsc(readers, timeout):
    rv, hc2 = S.SCardEstablishContext(S.SCARD_SCOPE_USER)
    states = [(r, S.SCARD_STATE_UNAWARE) for r in readers]
    rv, st = S.SCardGetStatusChange(hc2, 0, states)
    states = [(r, s) for (r, s, atr) in st]
    rv, st = S.SCardGetStatusChange(hc2, timeout, states)
    out({"gsc": rvs(rv), "states": [[r, s] for (r, s, atr) in st]})
for line in sys.stdin:
    c = json.loads(line)
    op = c["op"]
    if op == "connect":
        rv, card, proto = S.SCardConnect(hc, c["reader"], S.SCARD_SHARE_SHARED, S.SCARD_PROTOCOL_T0 | S.SCARD_PROTOCOL_T1)
        out({"rv": rvs(rv), "protocol": proto})
    elif op == "transmit":
        rv, resp = S.SCardTransmit(card, proto, list(bytes.fromhex(c["apdu"])))
        out({"rv": rvs(rv), "resp": bytes(resp).hex().upper()})
    elif op == "readers":
        rv, readers = S.SCardListReaders(hc, [])
        out({"rv": rvs(rv), "readers": list(readers)})
    elif op == "gsc":
        threading.Thread(target=gsc, args=(c["readers"], c.get("timeout", 0xFFFFFFFF)), daemon=True).start()
        out({"started": True})
    elif op == "quit":
        break
'''


class PcscSession:
    """SESSION_TOOL in a subprocess on one socket, optionally as another user and with more
    environment (e.g. PCSCLITE_NO_BLOCKING)."""

    def __init__(self, sock: str, script_dir: Path, uid: Optional[int] = None,
                 extra_env: Optional[Dict[str, str]] = None):
        script = Path(script_dir) / "cb_pcsc_session.py"
        if not script.exists():
            script.write_text(SESSION_TOOL)
            script.chmod(0o644)
        env = {**client_env(sock, "/"), **(extra_env or {})}
        self.p = subprocess.Popen([SYSTEM_PYTHON, str(script)], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                  **_user_kwargs(uid, None))
        self.hello = self.read()

    def read(self, timeout: float = 30.0) -> dict:
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise AssertionError(f"PC/SC session: no answer within {timeout} s")
        line = self.p.stdout.readline()
        if not line:
            raise AssertionError(f"PC/SC session ended: {self.p.stderr.read()}")
        return json.loads(line)

    def send(self, **cmd) -> None:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def call(self, **cmd) -> dict:
        self.send(**cmd)
        return self.read()

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.send(op="quit")
                self.p.wait(3)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait(5)
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self) -> "PcscSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------- Xvfb

def _pdeathsig_preexec(sig: int):
    """Child set-up: `sig` when this (main) thread's process dies. SIGTERM for X servers, so that they
    remove their lock file and socket even when the test process is killed."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(1, sig, 0, 0, 0)   # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL)
    return preexec


class Xvfb:
    """A private X server for xfreerdp: Xvfb picks a free display itself (-displayfd)."""

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self.popen: Optional[subprocess.Popen] = None
        self.display = ""

    def start(self, timeout: float = 20.0) -> "Xvfb":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        r, w = os.pipe()
        try:
            with open(self.log_path, "ab") as log:
                self.popen = subprocess.Popen(
                    ["Xvfb", "-displayfd", str(w), "-screen", "0", "1024x768x24", "-nolisten", "tcp", "-noreset"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, pass_fds=(w,),
                    start_new_session=True, preexec_fn=_pdeathsig_preexec(signal.SIGTERM))
            os.close(w)
            w = -1
            data = b""
            deadline = time.monotonic() + timeout
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                ready, _, _ = select.select([r], [], [], max(left, 0))
                if not ready:
                    raise RuntimeError(f"Xvfb printed no display number within {timeout} s: {self.log_tail()}")
                chunk = os.read(r, 64)
                if not chunk:
                    raise RuntimeError(f"Xvfb exited ({self.popen.poll()}): {self.log_tail()}")
                data += chunk
            self.display = ":" + data.decode().strip()
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        return self

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)


# ------------------------------------------------------------------------------ the add-in

class AddinMount:
    """Runs commands with `addin` visible as /usr/lib/x86_64-linux-gnu/freerdp2/libcardbridge-client.so,
    in a private mount namespace (see the module docstring). The library is copied first, so a
    rebuild during a test does not swap it under a running client."""

    SCRIPT = r'''
set -e
m=$1; src=$2; shift 2
mount -t tmpfs -o mode=0755,size=256m cbaddin "$m"
mkdir -p "$m/up/{addin_name}" "$m/work"
cp "$src" "$m/up/{addin_name}/libcardbridge-client.so"
if [ -d "{addin_dir}" ]; then
  mount --bind "$m/up/{addin_name}" "{addin_dir}"
else
  mount -t overlay overlay -o "lowerdir={libdir},upperdir=$m/up,workdir=$m/work" "{libdir}"
fi
exec "$@"
'''

    def __init__(self, addin: Path, workdir: Path):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lib = self.dir / "libcardbridge-client.so"
        self.mnt = self.dir / "mnt"
        if INSTALLED:
            return   # the package put it where FreeRDP looks: nothing to expose
        shutil.copy2(addin, self.lib)
        self.mnt.mkdir(exist_ok=True)

    def wrap(self, argv: Sequence[str]) -> List[str]:
        if INSTALLED:
            return [str(a) for a in argv]
        script = (self.SCRIPT.replace("{addin_dir}", ADDIN_DIR).replace("{libdir}", LIBDIR)
                  .replace("{addin_name}", os.path.basename(ADDIN_DIR)))
        return ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script, "cbaddin",
                str(self.mnt), str(self.lib), *[str(a) for a in argv]]

    def check(self) -> str:
        """Empty string when FreeRDP's add-in directory shows the add-in inside the namespace."""
        r = subprocess.run(self.wrap(["ls", ADDIN_DIR]), capture_output=True, text=True, timeout=20)
        if r.returncode != 0 or "libcardbridge-client.so" not in r.stdout:
            return f"cannot expose the add-in at {ADDIN_DIR} (rc {r.returncode}): {r.stderr.strip()}"
        return ""


def xfreerdp_argv(port: int, *, user: str = "u", password: str = "p", channel: str = "static",
                  addin_options: str = "", host: str = "127.0.0.1", extra: Sequence[str] = ()) -> List[str]:
    opt = ("/vc:" if channel == "static" else "/dvc:") + "cardbridge" + (f",{addin_options}" if addin_options else "")
    return [XFREERDP, f"/v:{host}:{port}", f"/u:{user}", f"/p:{password}", "/cert:ignore", "/sec:tls",
            "/size:800x600", opt, *extra]


class StockClient:
    """Stock xfreerdp with the add-in, on an Xvfb display, with the desk's pcscd for PC/SC."""

    def __init__(self, mount: AddinMount, xvfb: Xvfb, port: int, *, desk_socket: str, log_path: Path,
                 home: Path, channel: str = "static", user: str = "u", password: str = "p",
                 desk_name: str = "stock", log_level: str = "debug", extra: Sequence[str] = ()):
        self.channel = channel
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PCSCLITE_", "WAYLAND"))}
        Path(home).mkdir(parents=True, exist_ok=True)
        env.update(DISPLAY=xvfb.display, HOME=str(home), PCSCLITE_CSOCK_NAME=desk_socket)
        argv = xfreerdp_argv(port, user=user, password=password, channel=channel,
                             addin_options=f"log-level:{log_level},name:{desk_name}", extra=extra)
        self.proc = Proc(mount.wrap(argv), name=f"xfreerdp-{desk_name}", log_path=log_path, env=env)

    def start(self) -> "StockClient":
        self.proc.start()
        return self

    def wait_channel_open(self, timeout: float = 30.0) -> float:
        """Waits until the add-in logged that its CBRIDGE channel is open; seconds waited."""
        t0 = time.monotonic()
        wait_until(lambda: "channel CBRIDGE open" in self.proc.log_text(), timeout=timeout,
                   desc=f"xfreerdp ({self.channel}) to open the CBRIDGE channel",
                   abort=lambda: None if self.proc.alive() else self.proc.exit_description(),
                   details=lambda: self.proc.log_tail(40))
        return time.monotonic() - t0

    def wait_server_hello(self, timeout: float = 30.0) -> None:
        wait_until(lambda: re.search(r"cardbridge\.desk: server .* connected", self.proc.log_text()), timeout=timeout,
                   desc="the add-in to hear the shim's hello",
                   abort=lambda: None if self.proc.alive() else self.proc.exit_description(),
                   details=lambda: self.proc.log_tail(40))

    def alive(self) -> bool:
        return self.proc.alive()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.proc.stop(grace=2)

    def stop(self, grace: float = 5.0) -> Optional[int]:
        return self.proc.stop(grace=grace)

    def failure_report(self, n: int = 30) -> str:
        return self.proc.failure_report(n)


# ------------------------------------------------------------------------------------ xrdp

NAMESPACE_SCRIPT = r'''
# xrdp + xrdp-sesman in this (private) mount namespace. $1: test dir, $2: pid to watch,
# $3: "fallback" to create /run/cardbridge as cardbridge-server's tmpfiles.d entry does.
T=$1; WATCH=$2; RUNTIME=${3:-private}
me=$(readlink /proc/$$/ns/mnt)
others() {
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] && continue
    [ "$(readlink "$d/ns/mnt" 2>/dev/null)" = "$me" ] && echo "$p"
  done
}
alive() {  # those of the given pids that still run (not zombies)
  for p in "$@"; do
    case "$(cat "/proc/$p/stat" 2>/dev/null)" in
      ""|*") Z "*|*") X "*) ;;
      *) echo "$p" ;;
    esac
  done
}
cleanup() {
  trap - TERM INT HUP
  pids=$(others); [ -n "$pids" ] && kill -TERM $pids 2>/dev/null
  i=0
  while [ $i -lt 40 ] && [ -n "$(alive $pids)" ]; do sleep 0.1; i=$((i + 1)); done
  pids=$(others); [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  echo "namespace cleaned up"
  exit 0
}
trap cleanup TERM INT HUP
set -e
mount --bind "$T/etc-xrdp" /etc/xrdp
mount -t overlay overlay -o "lowerdir=/run,upperdir=$T/ns/run-up,workdir=$T/ns/run-work" /run
for f in passwd group shadow; do mount --bind "$T/etc/$f" "/etc/$f"; done
# Sessions of this namespace have no logind directory (/run/user/UID).
rm -rf /run/user
[ "$RUNTIME" = fallback ] && mkdir -m 1733 /run/cardbridge && chown root:root /run/cardbridge
set +e
xrdp-sesman --nodaemon >"$T/log/sesman.out" 2>&1 &
xrdp --nodaemon >"$T/log/xrdp.out" 2>&1 &
echo "namespace $me: sesman and xrdp started"
while kill -0 "$WATCH" 2>/dev/null; do sleep 1 & wait $!; done
echo "pid $WATCH is gone"
cleanup
'''

STARTWM = r'''#!/bin/sh
# CardBridge test session (written by tests/integration/xrdp_fixture.py).
exec >>"{logdir}/session-$$.log" 2>&1
echo "session leader $$ uid $(id -u) DISPLAY=$DISPLAY XRDP_SESSION=${XRDP_SESSION:-}"
report="{runtime}"
{runtime_export}
export PATH="{bindir}:$PATH"
{etc_export}
# The cardbridge-server package's /etc/profile.d/cardbridge.sh (startwm.sh sources /etc/profile,
# which sources it): cdrsession start --until-pid $$, then the export (or the start error).
. "{hook}"
echo "PCSCLITE_CSOCK_NAME=${PCSCLITE_CSOCK_NAME:-} CARDBRIDGE_START_ERROR=${CARDBRIDGE_START_ERROR:-}"
f="$report/session-${DISPLAY#:}.env"
printf 'DISPLAY=%s\nLEADER=%s\nPCSCLITE_CSOCK_NAME=%s\nSTARTED=%s\nCARDBRIDGE_START_ERROR=%s\n' "$DISPLAY" "$$" \
  "${PCSCLITE_CSOCK_NAME:-}" "${CARDBRIDGE_SESSION_STARTED:-}" "${CARDBRIDGE_START_ERROR:-}" >"$f.tmp" && mv "$f.tmp" "$f"
# The "window manager": the session lives as long as this process (same pid as the hook saw).
exec sleep 2147483647
'''


def _pick_uid(lock_dir: Path):
    """A uid/gid unused on the host (passwd, group, running processes), locked against parallel runs."""
    import grp
    import pwd
    lock_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(lock_dir, 0o1777)
    used = set()
    for d in os.scandir("/proc"):
        if d.name.isdigit():
            try:
                used.add(os.stat(d.path).st_uid)
            except OSError:
                pass
    for uid in range(61500, 62000):
        if uid in used:
            continue
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            pass
        fd = os.open(lock_dir / f"uid-{uid}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return uid, fd
    raise RuntimeError("no free uid in 61500..61999")


class XrdpSession:
    """What the session start script reported for one xrdp session."""

    def __init__(self, env: Dict[str, str]):
        self.display = env["DISPLAY"]
        self.display_number = int(re.match(r":(\d+)", self.display).group(1))
        self.leader = int(env["LEADER"])
        self.socket = env["PCSCLITE_CSOCK_NAME"]
        self.started = env.get("STARTED", "") == "1"
        self.start_error = env.get("CARDBRIDGE_START_ERROR", "")

    def __repr__(self) -> str:
        return f"<xrdp session {self.display} leader {self.leader} shim {self.socket}>"


class XrdpServer:
    """xrdp + sesman in a private mount namespace, with a test user that exists only there."""

    def __init__(self, base: Optional[Path] = None, *, log_level: str = "DEBUG", keep: bool = False,
                 runtime: str = "private", channel_entry: bool = True):
        """runtime: "private" (sessions get XDG_RUNTIME_DIR = a test directory), "fallback" (no
        XDG_RUNTIME_DIR, no /run/user/UID, /run/cardbridge as the server package's tmpfiles.d entry
        makes it), or "none" (neither: the session's start must fail, and say why)."""
        if runtime not in ("private", "fallback", "none"):
            raise ValueError(runtime)
        self.runtime = runtime
        self.channel_entry = channel_entry   # False: the admin forgot [Channels] CBRIDGE=true
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="cbxrdp-"))
        self.log_level = log_level
        self.keep = keep
        self.proc: Optional[Proc] = None
        self.uid = -1
        self.user = ""
        self.password = secrets.token_hex(8)
        self._uid_lock = -1
        self.port = 0
        self.sesman_port = 0
        self.ns = ""
        self.seen_displays: Dict[int, int] = {}   # display -> pid of our Xorg
        self._ns_fd = -1
        self._ports = None

    # -- paths -----------------------------------------------------------------------------
    @property
    def logdir(self) -> Path:
        return self.base / "log"

    @property
    def session_logdir(self) -> Path:
        return self.base / "slog"

    @property
    def runtime_dir(self) -> Path:
        return self.base / "rt"

    @property
    def bindir(self) -> Path:
        return self.base / "bin"

    @property
    def cdrsession(self) -> Path:
        """The cdrsession the session uses (the installed one, or a copy of the build's)."""
        return CDRSESSION if INSTALLED else self.bindir / "cdrsession"

    @property
    def cardbridge_etc(self) -> Path:
        """Where `cdrsession enable xrdp` put its marker (the real /etc/cardbridge when installed)."""
        return Path("/etc/cardbridge") if INSTALLED else self.base / "etc-cardbridge"

    # -- set-up ----------------------------------------------------------------------------
    def _prepare(self) -> None:
        b = self.base
        os.chmod(b, 0o755)
        for d in ("log", "etc", "ns/run-up/xrdp", "ns/run-work", "bin"):
            (b / d).mkdir(parents=True, exist_ok=True)
        self.uid, self._uid_lock = _pick_uid(Path(tempfile.gettempdir()) / "cbxrdp-locks")
        self.user = f"cbx{self.uid}"
        home = b / "home"
        for d, mode in ((home, 0o700), (self.runtime_dir, 0o700), (self.session_logdir, 0o755)):
            d.mkdir(exist_ok=True)
            os.chown(d, self.uid, self.uid)
            os.chmod(d, mode)
        # Users that exist only inside the namespace.
        pw = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=self.password, capture_output=True,
                            text=True, check=True).stdout.strip()

        def extended(path: str, line: str, mode: int) -> None:
            text = Path(path).read_text()
            if text and not text.endswith("\n"):
                text += "\n"
            dst = b / "etc" / Path(path).name
            dst.write_text(text + line + "\n")
            os.chmod(dst, mode)

        extended("/etc/passwd", f"{self.user}:x:{self.uid}:{self.uid}:CardBridge xrdp test:{home}:/bin/sh", 0o644)
        extended("/etc/group", f"{self.user}:x:{self.uid}:", 0o644)
        extended("/etc/shadow", f"{self.user}:{pw}:19000:0:99999:7:::", 0o640)
        # The product's session pieces, where the user can run them (and safe from rebuilds); the
        # installed packages' own files when testing those.
        for src in ((CB_PCSC,) if INSTALLED else (CDRSESSION, SHIM, CB_PCSC)):
            shutil.copy2(src, self.bindir / src.name)
        if not INSTALLED:
            shutil.copy2(PROFILE_HOOK, self.bindir / "cardbridge-profile.sh")
            os.chmod(self.bindir / "cardbridge-profile.sh", 0o644)
        # Private /etc/xrdp.
        etc = b / "etc-xrdp"
        shutil.copytree("/etc/xrdp", etc, symlinks=True)
        for f in ("cert.pem", "key.pem"):
            (etc / f).unlink(missing_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-batch", "-subj", "/CN=cbxrdp-test",
                        "-days", "7", "-keyout", str(etc / "key.pem"), "-out", str(etc / "cert.pem")],
                       check=True, capture_output=True)
        # Held (flock) until stop(), below the ephemeral range: no other test takes them and no
        # outgoing connection lands on them before xrdp and sesman bind them.
        self._ports = reserve_ports(2)
        self.port, self.sesman_port = self._ports.ports
        ini = (etc / "xrdp.ini").read_text()
        ini = _set_ini(ini, "Globals", "port", f"tcp://127.0.0.1:{self.port}")
        ini = _set_ini(ini, "Logging", "LogFile", str(self.logdir / "xrdp.log"))
        ini = _set_ini(ini, "Logging", "LogLevel", self.log_level)
        ini = _set_ini(ini, "Logging", "EnableSyslog", "false")
        (etc / "xrdp.ini").write_text(ini)
        # What the admin does: `cdrsession enable xrdp` (the hook's opt-in marker, and CBRIDGE=true
        # under [Channels] in xrdp.ini: our copy).
        cmd = [str(self.cdrsession), "enable", "xrdp", "--xrdp-ini", str(etc / "xrdp.ini")]
        env = dict(os.environ)
        if not INSTALLED:
            cmd += ["--xrdp-config-tool", str(XRDP_CONFIG_TOOL)]
            env["CARDBRIDGE_ETC"] = str(self.cardbridge_etc)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"cdrsession enable xrdp failed ({r.returncode}): {r.stdout}{r.stderr}")
        if "CBRIDGE=true" not in (etc / "xrdp.ini").read_text():
            raise RuntimeError(f"cdrsession enable xrdp did not allow the channel: {r.stdout}")
        if not self.channel_entry:
            r = subprocess.run(["sh", str(XRDP_CONFIG_TOOL), "disable", str(etc / "xrdp.ini")], capture_output=True,
                               text=True)
            if r.returncode != 0 or "CBRIDGE" in (etc / "xrdp.ini").read_text():
                raise RuntimeError(f"cannot remove the channel entry: {r.stderr}")
        ses = (etc / "sesman.ini").read_text()
        ses = _set_ini(ses, "Globals", "ListenAddress", "127.0.0.1")
        ses = _set_ini(ses, "Globals", "ListenPort", str(self.sesman_port))
        ses = _set_ini(ses, "Globals", "EnableUserWindowManager", "false")
        ses = _set_ini(ses, "Globals", "DefaultWindowManager", "startwm.sh")
        ses = _set_ini(ses, "Sessions", "KillDisconnected", "false")
        ses = _set_ini(ses, "Sessions", "DisconnectedTimeLimit", "0")
        ses = _set_ini(ses, "Logging", "LogFile", str(self.logdir / "sesman.log"))
        ses = _set_ini(ses, "Logging", "LogLevel", self.log_level)
        ses = _set_ini(ses, "Logging", "EnableSyslog", "false")
        ses = _set_ini(ses, "ChansrvLogging", "LogLevel", self.log_level)
        ses = _set_ini(ses, "ChansrvLogging", "EnableSyslog", "false")
        ses = _set_ini(ses, "ChansrvLogging", "EnableConsole", "false")
        (etc / "sesman.ini").write_text(ses)
        startwm = (STARTWM.replace("{logdir}", str(self.session_logdir)).replace("{runtime}", str(self.runtime_dir))
                   .replace("{bindir}", str(self.bindir))
                   .replace("{hook}", str(PROFILE_HOOK) if INSTALLED else str(self.bindir / "cardbridge-profile.sh"))
                   .replace("{runtime_export}", f'export XDG_RUNTIME_DIR="{self.runtime_dir}"' if self.runtime == "private"
                            else "unset XDG_RUNTIME_DIR")
                   .replace("{etc_export}", "" if INSTALLED else f'export CARDBRIDGE_ETC="{self.cardbridge_etc}"'))
        (etc / "startwm.sh").write_text(startwm)
        os.chmod(etc / "startwm.sh", 0o755)
        (etc / "reconnectwm.sh").write_text("#!/bin/sh\necho \"reconnect $(date +%T.%N)\" >>" +
                                            f"\"{self.session_logdir}/reconnect.log\"\n")
        os.chmod(etc / "reconnectwm.sh", 0o755)

    def start(self, timeout: float = 20.0) -> "XrdpServer":
        if os.geteuid() != 0:
            raise RuntimeError("XrdpServer needs root (mount namespaces, sesman)")
        self._prepare()
        script = self.base / "namespace.sh"
        script.write_text(NAMESPACE_SCRIPT)
        # No pdeathsig: if this process dies, the watchdog loop in the script cleans up the namespace.
        self.proc = Proc(["unshare", "-m", "--propagation", "private", "--", "sh", str(script), str(self.base),
                          str(os.getpid()), self.runtime], name="xrdp-namespace", log_path=self.logdir / "namespace.log",
                         pdeathsig=False, grace=8).start()
        wait_until(lambda: listening(self.port) and listening(self.sesman_port), timeout=timeout,
                   desc=f"xrdp on port {self.port} and sesman on port {self.sesman_port}",
                   abort=lambda: None if self.proc.alive() else self.proc.exit_description(),
                   details=self.report)
        # Hold the namespace: while this fd is open its inode number cannot be reused by another
        # namespace, so "processes in our namespace" never matches anybody else's processes.
        self._ns_fd = os.open(f"/proc/{self.proc.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self.ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
        return self

    # -- sessions --------------------------------------------------------------------------
    def session_env_files(self) -> List[Path]:
        return sorted(self.runtime_dir.glob("session-*.env"))

    def wait_session(self, timeout: float = 30.0, display: Optional[int] = None) -> XrdpSession:
        def ready():
            for f in self.session_env_files():
                env = dict(l.split("=", 1) for l in f.read_text().splitlines() if "=" in l)
                s = XrdpSession(env)
                if display is None or s.display_number == display:
                    return s
            return None
        s = wait_until(ready, timeout=timeout, desc="the xrdp session's start script to report",
                       abort=lambda: None if self.proc.alive() else self.proc.exit_description(), details=self.report)
        self._note_xorg()
        return s

    def in_namespace(self, path: str) -> Path:
        """`path` as the processes of the namespace see it (through /proc/PID/root)."""
        return Path(f"/proc/{self.proc.pid}/root") / path.lstrip("/")

    def chansrv_waiting(self, display: int) -> bool:
        """True while the session's chansrv waits for xrdp (no client connected): chansrv stops
        listening on its socket while an xrdp connection is up and listens again when it has gone."""
        return self.in_namespace(f"/run/xrdp/sockdir/xrdp_chansrv_socket_{display}").exists()

    def namespace_pids(self) -> List[int]:
        out = []
        if not self.ns:
            return out
        for d in os.scandir("/proc"):
            if d.name.isdigit():
                try:
                    if os.readlink(f"/proc/{d.name}/ns/mnt") == self.ns:
                        out.append(int(d.name))
                except OSError:
                    pass
        return out

    def _session_pids(self) -> List[int]:
        """Everything in the namespace but the watchdog script and its `sleep 1`."""
        script = self.proc.pid if self.proc else -1
        out = []
        for p in self.namespace_pids():
            if p == script:
                continue
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == script and cmd.startswith(b"sleep\0"):
                continue
            out.append(p)
        return out

    def processes(self) -> Dict[int, str]:
        out = {}
        for pid in self.namespace_pids():
            try:
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                pass
        return out

    def _note_xorg(self) -> None:
        for pid, cmd in self.processes().items():
            m = re.match(r"\S*Xorg :(\d+)\b", cmd)
            if m:
                self.seen_displays[int(m.group(1))] = pid

    def report(self) -> str:
        parts = [f"xrdp test dir {self.base} (port {self.port}, sesman {self.sesman_port}, user {self.user}/{self.uid})"]
        parts.append("processes in the namespace:\n" + "\n".join(f"  {p} {c[:150]}" for p, c in self.processes().items()))
        files = [self.logdir / n for n in ("namespace.log", "xrdp.log", "sesman.log", "xrdp.out", "sesman.out")]
        files += sorted(self.session_logdir.glob("*.log"))
        files += sorted(self.runtime_dir.glob("cardbridge/*/*.log"))
        if self.proc and self.proc.alive():   # the /run/cardbridge fallback lives in the namespace's /run
            try:
                files += sorted(self.in_namespace("/run/cardbridge").glob("*/cardbridge/*/*.log"))
            except OSError:
                pass
        files += sorted(self.runtime_dir.glob("*.log"))
        for f in files:
            try:
                tail = f.read_text(errors="replace").splitlines()[-25:]
            except OSError:
                continue
            parts.append(f"--- {f} (last {len(tail)} lines)\n" + "\n".join("  | " + l for l in tail))
        return "\n".join(parts)

    # -- teardown --------------------------------------------------------------------------
    def stop(self) -> None:
        self._note_xorg()
        for sig, wait in ((signal.SIGTERM, 4.0), (signal.SIGKILL, 3.0)):
            for p in self._session_pids():
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self._session_pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.proc:
            self.proc.stop(grace=5)
        # An Xorg that had to be KILLed leaves its lock file and socket behind: remove ours only.
        for n, pid in self.seen_displays.items():
            lock = Path(f"/tmp/.X{n}-lock")
            try:
                owner = int(lock.read_text().strip())
            except (OSError, ValueError):
                continue
            if owner == pid and not Path(f"/proc/{pid}").exists():
                lock.unlink(missing_ok=True)
                Path(f"/tmp/.X11-unix/X{n}").unlink(missing_ok=True)
        if self._ns_fd >= 0:
            os.close(self._ns_fd)
            self._ns_fd = -1
            self.ns = ""
        if self._uid_lock >= 0:
            os.close(self._uid_lock)
            self._uid_lock = -1
        if self._ports is not None:
            self._ports.release()
            self._ports = None
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)


def _set_ini(text: str, section: str, key: str, value: str) -> str:
    """Sets key=value in [section] of an xrdp-style ini text (replacing an active or commented line)."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip() == f"[{section}]"), None)
    if start is None:
        return text.rstrip("\n") + f"\n\n[{section}]\n{key}={value}\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    pat = re.compile(rf"^\s*[#;]?\s*{re.escape(key)}\s*=")
    for i in range(start + 1, end):
        if pat.match(lines[i]) and not lines[i].lstrip().startswith((";", "#")):
            lines[i] = f"{key}={value}"
            return "\n".join(lines) + "\n"
    for i in range(start + 1, end):
        if pat.match(lines[i]):
            lines[i] = f"{key}={value}"
            return "\n".join(lines) + "\n"
    lines.insert(start + 1, f"{key}={value}")
    return "\n".join(lines) + "\n"
