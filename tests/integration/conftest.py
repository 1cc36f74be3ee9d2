"""Shared fixtures for the core integration tests (tests/integration/test_core_*.py).

The chain under test, all real parts:

    emulated desk (private pcscd + vpcd + vicc, tests/harness)
      <- cardbridge-desk --listen unix:AGENT       (uses the desk's pcscd through PCSCLITE_CSOCK_NAME)
      <- cardbridge-shim --socket SHIM --desk unix:AGENT
      <- PC/SC programs on the system libpcsclite with PCSCLITE_CSOCK_NAME=SHIM

Method: the same client scenario is run against the desk's pcscd directly ("desk") and
through the shim ("shim"); the observable results must be the same.

libpcsclite reads PCSCLITE_CSOCK_NAME once per process, so every PC/SC client runs in a
subprocess of its own:
  * PcscSession  a long-lived pyscard process driven by JSON lines (contexts and handles are
                 kept by name; any call can run on its own thread, so blocking calls such as
                 SCardGetStatusChange(INFINITE) or a waiting SCardBeginTransaction can be
                 observed and cancelled);
  * cb_pcsc()    the project's C++ client (tests/tools/cb_pcsc.cpp);
  * WireClient   a raw pcsc-lite protocol client (pure Python sockets), for what libpcsclite
                 never sends (malformed or foreign requests, small receive buffers).
Every process is cleaned up even when a test fails; the logs of the desk agent, the shim
and pcscd are attached to the report of a failing test.

Determinism (docs: the brief's "Deterministic tests"): a test waits for events, never for time.
  * a call that must block is seen blocked (Pending.wait_blocked: the client thread's state in
    the kernel) and must return only after the call that releases it started (t0/t1 are
    CLOCK_MONOTONIC, comparable across processes);
  * a transfer "in flight" is one the card holds (the gated card: desk.gate(slot));
  * the desk is idle (no pcscd handle open) before a test on the shared rig starts;
  * every time bound is HANG_GUARD_S, a hang guard; durations are printed, never asserted.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "harness"))
from cbharness import (GATED_APDU, HANG_GUARD_S, EmulatedDesk, Proc, last_json_line, reader_states,  # noqa: E402
                       shim_control, threadstate, wait_until)
from cbharness.waiting import HarnessError  # noqa: E402

# Test files import the helpers below as `core_support` (tests/harness has a conftest.py of its
# own, so `import conftest` would be ambiguous).
sys.modules.setdefault("core_support", sys.modules[__name__])

BUILD = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", ROOT / "build"))
SHIM_BIN = BUILD / "server-shim" / "cardbridge-shim"
DESK_BIN = BUILD / "client-plugin" / "cardbridge-desk"
CB_PCSC = BUILD / "tests" / "tools" / "cb-pcsc"
SYSTEM_PYTHON = "/usr/bin/python3"

PNP = "\\\\?PnP?\\Notification"
GET_CHALLENGE = "0084000008"

# SCARD return values (pcsclite.h 1.9.9), as the "0x%08X" strings the clients print.
RV = {
    "S_SUCCESS": "0x00000000", "E_CANCELLED": "0x80100002", "E_INVALID_HANDLE": "0x80100003",
    "E_INVALID_PARAMETER": "0x80100004", "E_INSUFFICIENT_BUFFER": "0x80100008",
    "E_UNKNOWN_READER": "0x80100009", "E_TIMEOUT": "0x8010000A", "E_SHARING_VIOLATION": "0x8010000B",
    "E_NO_SMARTCARD": "0x8010000C", "E_PROTO_MISMATCH": "0x8010000F", "E_INVALID_VALUE": "0x80100011",
    "F_COMM_ERROR": "0x80100013", "E_NOT_TRANSACTED": "0x80100016", "E_READER_UNAVAILABLE": "0x80100017",
    "E_NO_SERVICE": "0x8010001D", "E_SERVICE_STOPPED": "0x8010001E", "E_UNSUPPORTED_FEATURE": "0x8010001F",
    "E_NO_READERS_AVAILABLE": "0x8010002E", "W_UNPOWERED_CARD": "0x80100067", "W_RESET_CARD": "0x80100068",
    "W_REMOVED_CARD": "0x80100069",
}
RV_NAME = {v: k for k, v in RV.items()}
OK = RV["S_SUCCESS"]

# SCARD_STATE_* bits
STATE_BITS = [("IGNORE", 0x1), ("CHANGED", 0x2), ("UNKNOWN", 0x4), ("UNAVAILABLE", 0x8), ("EMPTY", 0x10),
              ("PRESENT", 0x20), ("ATRMATCH", 0x40), ("EXCLUSIVE", 0x80), ("INUSE", 0x100), ("MUTE", 0x200)]
S_CHANGED, S_UNKNOWN, S_UNAVAILABLE, S_EMPTY, S_PRESENT, S_EXCLUSIVE, S_INUSE = (
    0x2, 0x4, 0x8, 0x10, 0x20, 0x80, 0x100)


def flags(state: int) -> List[str]:
    """SCARD_STATE_* names of an event state (the counter in the high 16 bits is left out)."""
    return [n for n, b in STATE_BITS if state & b]


def rv_name(rv: str) -> str:
    return RV_NAME.get(rv, rv)


def require_built() -> None:
    missing = [str(p) for p in (SHIM_BIN, DESK_BIN, CB_PCSC) if not p.exists()]
    if missing:
        pytest.fail(f"not built: {missing} (CARDBRIDGE_BUILD_DIR={BUILD}); "
                    f"cmake -S {ROOT} -B {BUILD} -G Ninja && ninja -C {BUILD}", pytrace=False)


def client_env(sock: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCSCLITE_", "PYTHON", "LD_PRELOAD"))}
    env["PCSCLITE_CSOCK_NAME"] = str(sock)
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------------
# A pyscard process driven by JSON lines.

SESSION_SCRIPT = r'''
import json, os, sys, threading, time, traceback
from smartcard import scard as S

_lock = threading.Lock()
ctxs, cards, protos = {}, {}, {}
SHARE = {"shared": S.SCARD_SHARE_SHARED, "exclusive": S.SCARD_SHARE_EXCLUSIVE, "direct": S.SCARD_SHARE_DIRECT}
DISP = {"leave": S.SCARD_LEAVE_CARD, "reset": S.SCARD_RESET_CARD, "unpower": S.SCARD_UNPOWER_CARD,
        "eject": S.SCARD_EJECT_CARD}

def out(o):
    line = json.dumps(o)
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

def rvs(rv):
    return "0x%08X" % (rv & 0xFFFFFFFF)

def C(c):
    return c["craw"] if "craw" in c else ctxs[c.get("ctx", "c")]

def H(c):
    return c["hraw"] if "hraw" in c else cards.get(c.get("h", "h"), 0x7FFFFFFE)  # not a handle (pyscard rejects 0)

def num(v, table):
    return table[v] if isinstance(v, str) else int(v)

def op_establish(c):
    rv, hc = S.SCardEstablishContext(c.get("scope", S.SCARD_SCOPE_USER))
    if rv == 0:
        ctxs[c.get("ctx", "c")] = hc
    return {"rv": rvs(rv), "value": hc if rv == 0 else 0}

def op_release(c):
    return {"rv": rvs(S.SCardReleaseContext(C(c)))}

def op_isvalid(c):
    return {"rv": rvs(S.SCardIsValidContext(C(c)))}

def op_list(c):
    rv, readers = S.SCardListReaders(C(c), [])
    return {"rv": rvs(rv), "readers": list(readers) if rv == 0 else []}

def op_gsc(c):
    t = c.get("ms", 0)
    t = S.INFINITE if t < 0 else t
    rv, states = S.SCardGetStatusChange(C(c), t, [(r, cur) for r, cur in c["readers"]])
    res = {"rv": rvs(rv)}
    if rv == 0 or c.get("states_on_error"):
        res["states"] = [[r, st, bytes(atr).hex().upper()] for r, st, atr in states]
    return res

def op_cancel(c):
    return {"rv": rvs(S.SCardCancel(C(c)))}

def op_connect(c):
    share = num(c.get("share", "shared"), SHARE)
    rv, h, proto = S.SCardConnect(C(c), c["reader"], share, c.get("protocols", S.SCARD_PROTOCOL_T0 | S.SCARD_PROTOCOL_T1))
    if rv == 0:
        cards[c.get("h", "h")] = h
        protos[c.get("h", "h")] = proto
    return {"rv": rvs(rv), "protocol": proto if rv == 0 else 0, "value": h if rv == 0 else 0}

def op_reconnect(c):
    rv, proto = S.SCardReconnect(H(c), num(c.get("share", "shared"), SHARE),
                                 c.get("protocols", S.SCARD_PROTOCOL_T0 | S.SCARD_PROTOCOL_T1),
                                 num(c.get("init", "leave"), DISP))
    if rv == 0 and "h" in c:
        protos[c["h"]] = proto
    return {"rv": rvs(rv), "protocol": proto if rv == 0 else 0}

def op_disconnect(c):
    return {"rv": rvs(S.SCardDisconnect(H(c), num(c.get("disp", "leave"), DISP)))}

def op_begin(c):
    return {"rv": rvs(S.SCardBeginTransaction(H(c)))}

def op_end(c):
    return {"rv": rvs(S.SCardEndTransaction(H(c), num(c.get("disp", "leave"), DISP)))}

def op_transmit(c):
    proto = c.get("proto", protos.get(c.get("h", "h"), S.SCARD_PROTOCOL_T1))
    rv, resp = S.SCardTransmit(H(c), proto, list(bytes.fromhex(c["apdu"])))
    resp = bytes(resp) if rv == 0 else b""
    return {"rv": rvs(rv), "resp": resp.hex().upper(), "sw": resp[-2:].hex().upper(),
            "data": resp[:-2].hex().upper()}

def op_transmit_many(c):
    res = []
    for apdu in c["apdus"]:
        r = op_transmit(dict(c, apdu=apdu))
        res.append(r)
    return {"rv": res[-1]["rv"] if res else rvs(0), "results": res}

def op_status(c):
    rv, reader, state, proto, atr = S.SCardStatus(H(c))
    if rv != 0:
        return {"rv": rvs(rv)}
    return {"rv": rvs(rv), "reader": reader, "state": state, "protocol": proto, "atr": bytes(atr).hex().upper()}

def op_control(c):
    rv, resp = S.SCardControl(H(c), c["code"], list(bytes.fromhex(c.get("data", ""))))
    return {"rv": rvs(rv), "resp": bytes(resp).hex().upper() if rv == 0 else ""}

def op_getattrib(c):
    rv, resp = S.SCardGetAttrib(H(c), c["attr"])
    return {"rv": rvs(rv), "data": bytes(resp).hex().upper() if rv == 0 else ""}

def op_batch(c):
    """Several calls back to back in this process (no round trip to the test between them)."""
    res = []
    for step in c["steps"]:
        t0 = time.monotonic()
        r = OPS[step["op"]](step)
        r.update(op=step["op"], t0=t0, t1=time.monotonic())
        res.append(r)
    return {"rv": res[-1]["rv"] if res else rvs(0), "results": res}

def op_sleep(c):
    time.sleep(c["s"])
    return {"rv": rvs(0)}

def op_crash(c):
    os._exit(0)   # no Release/Disconnect: like a program that dies

OPS = {k[3:]: v for k, v in globals().items() if k.startswith("op_")}

def run(c):
    if c.get("async"):
        # the thread's kernel id: the test reads what this call is blocked in (cbharness.threadstate)
        out({"id": c["id"], "started": True, "tid": threading.get_native_id()})
    t0 = time.monotonic()
    try:
        res = OPS[c["op"]](c)
    except Exception as e:
        res = {"error": "%s: %s" % (type(e).__name__, e), "trace": traceback.format_exc()}
    res.update(id=c["id"], op=c["op"], t0=t0, t1=time.monotonic())
    out(res)

out({"ready": True, "pid": os.getpid()})
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "quit":
        break
    if cmd.get("async"):
        threading.Thread(target=run, args=(cmd,), daemon=True).start()
    else:
        run(cmd)
'''


class SessionError(AssertionError):
    pass


class Pending:
    """A call running on its own thread of the session process."""

    def __init__(self, session: "PcscSession", cid: int, desc: str):
        self.session, self.id, self.desc = session, cid, desc
        self._res: Optional[dict] = None

    def done(self) -> bool:
        return self._res is not None or self.session._peek(self.id) is not None

    def result(self, timeout: float = HANG_GUARD_S) -> dict:
        if self._res is None:
            self._res = self.session._wait(self.id, timeout, self.desc)
        return self._res

    def tid(self) -> int:
        return wait_until(lambda: self.session._started.get(self.id), timeout=HANG_GUARD_S,
                          desc=f"{self.desc} to start")

    def wait_blocked(self, how: str, timeout: float = HANG_GUARD_S) -> None:
        """Until the call is blocked in libpcsclite as |how| says (cbharness.threadstate):
        "wait"  SCardGetStatusChange waiting for an event, cancellable;
        "reply" the request is with the daemon, which has not answered;
        "retry" the daemon answered SCARD_E_SHARING_VIOLATION, the client sleeps and asks again.
        Fails at once if the call returns instead."""
        tid = self.tid()
        pid = self.session.pid

        def returned():
            return f"it returned instead: {self.result(0)}" if self.done() else None

        wait_until(lambda: threadstate.state(pid, tid) == how, timeout=timeout,
                   desc=f"{self.desc} to be blocked ({how})", abort=returned,
                   details=lambda: f"thread {tid} of {pid}: {threadstate.state(pid, tid)!r}")


class PcscSession:
    """One pyscard process (SESSION_SCRIPT) on one socket. Contexts and handles are named:
    s.call("establish", ctx="a"); s.call("connect", ctx="a", reader=R, h="h1");
    p = s.start("gsc", ctx="a", readers=[[R, state]], ms=-1)   # ms: GSC timeout, -1 = INFINITE   # on its own thread
    p.result(2)  ->  {"rv": "0x...", "states": [[name, event_state, atr_hex]], "t0":, "t1":}
    t0/t1 are time.monotonic() (CLOCK_MONOTONIC: comparable with this process's clock)."""

    def __init__(self, sock: str, script: Path, name: str, env_extra: Optional[Dict[str, str]] = None):
        self.sock, self.name = sock, name
        self.p = subprocess.Popen([SYSTEM_PYTHON, str(script)], env=client_env(sock, env_extra),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        self._next = 1
        self._results: Dict[int, dict] = {}
        self._started: Dict[int, int] = {}  # call id -> kernel thread id
        self.killed_at: Optional[float] = None
        self._cv = threading.Condition()
        self._eof = False
        self._stderr: List[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()
        hello = self._wait(0, HANG_GUARD_S, "session start")
        self.pid = hello["pid"]

    def _pump(self) -> None:
        for line in self.p.stdout:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._cv:
                if obj.get("started"):
                    self._started[obj["id"]] = obj["tid"]
                else:
                    self._results[obj.get("id", 0)] = obj
                self._cv.notify_all()
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def _pump_err(self) -> None:
        for line in self.p.stderr:
            self._stderr.append(line)

    def _peek(self, cid: int) -> Optional[dict]:
        with self._cv:
            return self._results.get(cid)

    def _wait(self, cid: int, timeout: float, desc: str) -> dict:
        end = time.monotonic() + timeout
        with self._cv:
            while cid not in self._results:
                if self._eof:
                    raise SessionError(f"{self.name}: pyscard process ended before answering {desc}: "
                                       f"rc={self.p.poll()} stderr={''.join(self._stderr)[-2000:]}")
                left = end - time.monotonic()
                if left <= 0:
                    raise SessionError(f"{self.name} ({self.sock}): no answer to {desc} within {timeout}s "
                                       f"(the call hangs)")
                self._cv.wait(left)
            res = self._results.pop(cid)
        if "error" in res:
            raise SessionError(f"{self.name}: {desc} raised {res['error']}\n{res.get('trace', '')}")
        return res

    def start(self, op: str, **kw) -> Pending:
        cid = self._next
        self._next += 1
        cmd = dict(kw, op=op, id=cid, **{"async": True})
        try:
            self.p.stdin.write(json.dumps(cmd) + "\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise SessionError(f"{self.name}: process gone ({exc}); stderr={''.join(self._stderr)[-2000:]}")
        return Pending(self, cid, f"{op} {kw}")

    def call(self, op: str, timeout: float = HANG_GUARD_S, **kw) -> dict:
        return self.start(op, **kw).result(timeout)

    def rv(self, op: str, timeout: float = HANG_GUARD_S, **kw) -> str:
        return self.call(op, timeout=timeout, **kw)["rv"]

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash); killed_at = CLOCK_MONOTONIC just before the signal."""
        if self.p.poll() is None:
            self.killed_at = time.monotonic()
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write('{"op": "quit", "id": -1}\n')
                self.p.stdin.flush()
                self.p.wait(3)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            try:
                f.close()
            except OSError:
                pass


# ------------------------------------------------------------------------------------------
# Raw pcsc-lite wire client (protocol 4.4, x86-64 layouts, docs: /work/shared/docs/pcsc-protocol.md)

CMD = dict(ESTABLISH=0x01, RELEASE=0x02, LIST_READERS=0x03, CONNECT=0x04, RECONNECT=0x05, DISCONNECT=0x06,
           BEGIN=0x07, END=0x08, TRANSMIT=0x09, CONTROL=0x0A, STATUS=0x0B, GET_STATUS_CHANGE=0x0C, CANCEL=0x0D,
           CANCEL_TRANSACTION=0x0E, GET_ATTRIB=0x0F, SET_ATTRIB=0x10, VERSION=0x11, GET_READERS_STATE=0x12,
           WAIT=0x13, STOP_WAITING=0x14)


class WireClosed(Exception):
    pass


class WireClient:
    """Speaks the pcsc-lite daemon protocol on a raw socket (what libpcsclite sends)."""

    def __init__(self, sock_path: str, timeout: float = HANG_GUARD_S):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A blocking connect waits for room in the listen backlog (a socket with a timeout is
        # non-blocking in Python and would fail with EAGAIN when pcscd is slow to accept).
        self.s.connect(str(sock_path))
        self.s.settimeout(timeout)
        self.context = 0

    def close(self) -> None:
        try:
            self.s.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.s.sendall(data)

    def request(self, cmd: int, body: bytes = b"", extra: bytes = b"", size: Optional[int] = None) -> None:
        self.send_raw(struct.pack("<II", len(body) if size is None else size, cmd) + body + extra)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise WireClosed(f"peer closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def closed_by_peer(self, timeout: float) -> bool:
        """True if the peer closes the connection within timeout (any data before is discarded)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.s.settimeout(left)
            try:
                chunk = self.s.recv(65536)
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
            if not chunk:
                return True

    # ---- the calls ----
    def version(self, major: int = 4, minor: int = 4) -> tuple:
        self.request(CMD["VERSION"], struct.pack("<iiI", major, minor, 0))
        return struct.unpack("<iiI", self.recv_exact(12))

    def establish(self, scope: int = 0) -> int:
        self.request(CMD["ESTABLISH"], struct.pack("<III", scope, 0, 0))
        _, ctx, rv = struct.unpack("<III", self.recv_exact(12))
        if rv == 0:
            self.context = ctx
        return rv

    def release(self, ctx: Optional[int] = None) -> int:
        self.request(CMD["RELEASE"], struct.pack("<II", self.context if ctx is None else ctx, 0))
        return struct.unpack("<II", self.recv_exact(8))[1]

    def open(self) -> "WireClient":
        v = self.version()
        assert v[2] == 0, f"CMD_VERSION refused: {v}"
        rv = self.establish()
        assert rv == 0, f"ESTABLISH_CONTEXT failed: 0x{rv:08X}"
        return self

    def readers_state(self) -> bytes:
        self.request(CMD["GET_READERS_STATE"])
        return self.recv_exact(16 * 184)

    def connect(self, reader: str, share: int = 2, protocols: int = 3, ctx: Optional[int] = None) -> tuple:
        name = reader.encode().ljust(128, b"\0")
        self.request(CMD["CONNECT"], struct.pack("<I128sIIiII", self.context if ctx is None else ctx, name,
                                                 share, protocols, 0, 0, 0))
        r = struct.unpack("<I128sIIiII", self.recv_exact(152))
        return r[4], r[5], r[6]  # hCard, protocol, rv

    def disconnect(self, card: int, disp: int = 0) -> int:
        self.request(CMD["DISCONNECT"], struct.pack("<iII", card, disp, 0))
        return struct.unpack("<iII", self.recv_exact(12))[2]

    def status(self, card: int) -> int:
        self.request(CMD["STATUS"], struct.pack("<iI", card, 0))
        return struct.unpack("<iI", self.recv_exact(8))[1]

    def begin(self, card: int) -> int:
        self.request(CMD["BEGIN"], struct.pack("<iI", card, 0))
        return struct.unpack("<iI", self.recv_exact(8))[1]

    def end(self, card: int, disp: int = 0) -> int:
        self.request(CMD["END"], struct.pack("<iII", card, disp, 0))
        return struct.unpack("<iII", self.recv_exact(12))[2]

    def transmit_request(self, card: int, apdu: bytes, recv_len: int = 65548, proto: int = 2,
                         send_len: Optional[int] = None) -> None:
        body = struct.pack("<iIIIIIII", card, proto, 16, len(apdu) if send_len is None else send_len, 3, 16,
                           recv_len, 0)
        self.request(CMD["TRANSMIT"], body, apdu)

    def transmit(self, card: int, apdu: bytes, recv_len: int = 65548, proto: int = 2) -> dict:
        self.transmit_request(card, apdu, recv_len, proto)
        f = struct.unpack("<iIIIIIII", self.recv_exact(32))
        data = self.recv_exact(f[6]) if f[7] == 0 else b""
        return {"rv": f"0x{f[7]:08X}", "recv_length": f[6], "recv_pci": f[4], "data": data.hex().upper()}

    def cancel(self, ctx: int) -> int:
        self.request(CMD["CANCEL"], struct.pack("<iI", ctx, 0))
        return struct.unpack("<iI", self.recv_exact(8))[1]


def parse_array(data: bytes) -> List[dict]:
    out = []
    for i in range(16):
        name, ev, st, sh, atr, atrlen, proto = struct.unpack_from("=128sIIi33s3xII", data, i * 184)
        name = name.split(b"\0", 1)[0].decode("utf-8", "replace")
        if name:
            out.append(dict(name=name, event_counter=ev, state=st, sharing=sh, atr=atr[:min(atrlen, 33)].hex().upper(),
                            protocol=proto))
    return out


# ------------------------------------------------------------------------------------------
# The rig: emulated desk + desk agent + shim

def _short_tmp(prefix: str) -> Path:
    # AF_UNIX paths are limited to 107 bytes: keep sockets out of pytest's long tmp_path.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Rig:
    """An emulated desk, its desk agent and a shim, plus PC/SC clients on either socket.

    rig.sock("desk") / rig.sock("shim")  the two pcsc-lite sockets
    rig.session("shim")                  a PcscSession (closed with the rig)
    rig.kill_agent() / rig.start_agent() desk loss and recovery
    """

    def __init__(self, *, slots: int = 2, cards=({"slot": 0},), log_level: str = "debug", name: str = "core",
                 start_agent: bool = True, start_shim: bool = True, shim_desk: Optional[str] = None,
                 shim_args=(), agent_args=(), desk_debug: bool = False):
        require_built()
        self.log_level = log_level
        self.rt = _short_tmp(f"cb{name}-")
        self.logs = self.rt / "logs"
        self.logs.mkdir()
        self.agent_sock = str(self.rt / "agent.sock")
        self.shim_sock = str(self.rt / "shim" / "pcscd.comm")
        self.shim_desk = shim_desk or f"unix:{self.agent_sock}"
        self.shim_args, self.agent_args = list(shim_args), list(agent_args)
        self.script = self.rt / "pcsc_session.py"
        self.script.write_text(SESSION_SCRIPT)
        self.sessions: List[PcscSession] = []
        self.agent: Optional[Proc] = None
        self.shim: Optional[Proc] = None
        self.retired: List[Proc] = []
        self.desk = EmulatedDesk(slots=slots, name=name, debug=desk_debug or None)
        try:
            self.desk.start()
            for c in cards:
                c = dict(c)
                self.desk.insert_card(c.pop("slot"), **c)
            if start_agent:
                self.start_agent()
            if start_shim:
                self.start_shim()
                if start_agent:
                    self.wait_synced()
        except BaseException:
            self.stop()
            raise

    # ---- processes ----
    def sock(self, target: str) -> str:
        return {"desk": self.desk.socket_path, "shim": self.shim_sock}[target]

    def _proc(self, argv, name, env=None) -> Proc:
        n = sum(1 for p in self.retired if p.name == name)
        log = self.logs / (f"{name}.log" if n == 0 else f"{name}.{n}.log")
        return Proc([str(a) for a in argv], name=name, log_path=log, env=env).start()

    def start_agent(self, level: Optional[str] = None) -> Proc:
        if self.agent is not None:
            self.retired.append(self.agent)
        env = client_env(self.desk.socket_path)
        self.agent = self._proc([DESK_BIN, "--listen", f"unix:{self.agent_sock}", "--log-level",
                                 level or self.log_level, "--name", "coredesk", *self.agent_args], "agent", env)
        agent = self.agent
        wait_until(lambda: os.path.exists(self.agent_sock) and "listening on" in agent.log_text(),
                   timeout=HANG_GUARD_S,
                   desc="the desk agent's socket",
                   abort=lambda: None if agent.alive() else agent.exit_description(),
                   details=lambda: agent.failure_report())
        return agent

    def kill_agent(self, sig: int = signal.SIGKILL) -> None:
        agent = self.agent
        os.kill(agent.pid, sig)
        agent.wait(HANG_GUARD_S)
        agent.stop()
        # A SIGKILLed agent leaves its socket file behind; a restarted one replaces it.

    def start_shim(self, level: Optional[str] = None) -> Proc:
        if self.shim is not None:
            self.retired.append(self.shim)
        self.shim = self._proc([SHIM_BIN, "--socket", self.shim_sock, "--desk", self.shim_desk, "--log-level",
                                level or self.log_level, *self.shim_args], "shim", client_env("/nonexistent"))
        shim = self.shim
        wait_until(lambda: os.path.exists(self.shim_sock) and os.path.exists(self.shim_sock + ".ctl"),
                   timeout=HANG_GUARD_S,
                   desc="the shim's sockets", abort=lambda: None if shim.alive() else shim.exit_description(),
                   details=lambda: shim.failure_report())
        return shim

    def start_extra_shim(self, name: str, *args: str) -> tuple:
        """Another shim (another server session) on the same desk agent; returns (Proc, socket)."""
        sock = str(self.rt / name / "pcscd.comm")
        p = self._proc([SHIM_BIN, "--socket", sock, "--desk", self.shim_desk, "--log-level", self.log_level,
                        *args], name, client_env("/nonexistent"))
        self.retired.append(p)
        wait_until(lambda: os.path.exists(sock), timeout=HANG_GUARD_S, desc=f"{name}'s socket",
                   abort=lambda: None if p.alive() else p.exit_description())
        wait_until(lambda: [r.name for r in reader_states(sock)] == self.desk.readers, timeout=HANG_GUARD_S,
                   desc=f"{name} to show the desk's readers", details=lambda: p.failure_report())
        return p, sock

    def shim_view(self) -> List[tuple]:
        return [(r.name, r.card_present, r.atr.hex()) for r in reader_states(self.shim_sock)]

    def desk_view(self) -> List[tuple]:
        return [(r.name, r.card_present, r.atr.hex()) for r in reader_states(self.desk.socket_path)]

    def wait_synced(self, timeout: float = HANG_GUARD_S) -> None:
        """Until the shim's reader array shows what the desk's pcscd shows."""
        wait_until(lambda: self.shim_view() == self.desk_view(), timeout=timeout,
                   desc="the shim to show the desk's readers",
                   details=lambda: f"desk: {self._safe(self.desk_view)}\nshim: {self._safe(self.shim_view)}\n"
                                   f"{self.failure_report()}")

    @staticmethod
    def _safe(fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            return f"({exc})"

    def ctl(self, cmd: dict, timeout: float = HANG_GUARD_S) -> dict:
        return shim_control(self.shim_sock + ".ctl", cmd, timeout)

    def status(self) -> dict:
        return self.ctl({"cmd": "status"})

    # ---- clients ----
    def session(self, target: str, name: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> PcscSession:
        """target: "desk", "shim" or a socket path."""
        sock = self.sock(target) if target in ("desk", "shim") else target
        s = PcscSession(sock, self.script, name or target, env)
        self.sessions.append(s)
        return s

    def cb_pcsc(self, target: str, *args: str, timeout: float = HANG_GUARD_S) -> dict:
        return cb_pcsc(self.sock(target), *args, timeout=timeout)

    def wait_desk_idle(self) -> None:
        """Until no handle is open at the desk's pcscd (every reader's sharing count is 0): the
        shim answers a program's Disconnect or End before its desk side is done (pipelining), and
        a program that closes leaves its clean-up to the shim; the next run must not race that."""
        wait_until(lambda: all(r.sharing == 0 for r in self.desk.states()), timeout=HANG_GUARD_S,
                   desc="the desk's pcscd to have no handle open",
                   details=lambda: f"{self.desk.states()}\nshim: {self._safe(self.status)}")

    def cold(self, slot: int = 0) -> None:
        """Brings the desk to a state that does not change by itself, so that a desk run and a
        shim run start from the same pcscd card state: no handle open (wait_desk_idle) and the
        card powered down. pcscd 1.9.9 powers a card down about half a second after its last
        handle goes and forgets the negotiated protocol (eventhandler.c: cardProtocol is set to
        SCARD_PROTOCOL_UNDEFINED with the power-off), which a DIRECT connect reports and a RAW or
        T=0 connect is checked against: a "warm" card would be a race with that timer. The
        event: the reader array's cardProtocol is 0 (and the card is present)."""
        self.wait_desk_idle()
        wait_until(lambda: (lambda st: st.card_present and st.protocol == 0)(self.desk.state(slot)),
                   timeout=HANG_GUARD_S, desc="pcscd to power the idle card down",
                   details=lambda: f"{self.desk.state(slot)}")

    def readers(self, slots=None) -> List[str]:
        return self.desk.readers if slots is None else [self.desk.readers[i] for i in slots]

    # ---- logs ----
    def agent_log(self) -> str:
        return "".join(p.log_text() for p in self.retired if p.name == "agent") + (
            self.agent.log_text() if self.agent else "")

    def shim_log(self) -> str:
        return "".join(p.log_text() for p in self.retired if p.name == "shim") + (
            self.shim.log_text() if self.shim else "")

    def failure_report(self) -> str:
        parts = []
        for p in self.retired + [x for x in (self.agent, self.shim) if x is not None]:
            parts.append(p.failure_report(60))
        try:
            parts.append(self.desk.failure_report())
        except Exception as exc:  # noqa: BLE001
            parts.append(f"(desk report failed: {exc})")
        return "\n".join(parts)

    def stop(self) -> None:
        for s in self.sessions:
            s.close()
        self.sessions.clear()
        for p in [self.shim, self.agent] + self.retired:
            if p is not None:
                p.stop(grace=3)
        try:
            self.desk.stop()
        finally:
            if os.environ.get("CBHARNESS_KEEP") not in ("1", "true", "yes"):
                shutil.rmtree(self.rt, ignore_errors=True)


_active_rigs: List[Rig] = []


def _rig_factory():
    """Yields a factory of rigs, then stops every rig it made (the fixtures' teardown)."""
    made: List[Rig] = []

    def make(**kw) -> Rig:
        r = Rig(**kw)
        made.append(r)
        _active_rigs.append(r)
        return r

    yield make
    for r in made:
        _active_rigs.remove(r)
        r.stop()


@pytest.fixture
def make_rig():
    """Factory for rigs owned by one test (stopped at its end, even on failure)."""
    yield from _rig_factory()


@pytest.fixture(scope="module")
def module_rig_factory():
    """Factory for rigs shared by a module's tests (stopped after the module)."""
    yield from _rig_factory()


# Card set-up of the shared (module) rig: slot 0 a vicc (ISO 7816 card, with the harness fix
# for the SELECT-with-FCI crash), slot 1 empty, slot 2 a vicc with the harness test INS EE
# (echo / pattern responses), extended length and the gated INS EF (held at the card until the
# test releases it: desk.gate(2)), slot 3 empty.
SHARED_CARDS = ({"slot": 0, "fix_tlv": True}, {"slot": 2, "test_ins": True, "extended": True, "gate": True})


@pytest.fixture(scope="module")
def rig(module_rig_factory) -> Rig:
    return module_rig_factory(slots=4, cards=SHARED_CARDS)


@pytest.fixture(autouse=True)
def _shared_rig_idle(request):
    """A test on the shared rig starts with nothing open at the desk: the previous test's last
    Disconnect or End through the shim may still be on its way to the desk (pipelining)."""
    if "rig" in request.fixturenames:
        r = request.getfixturevalue("rig")
        if isinstance(r, Rig):  # (the RDP tests have a rig of their own)
            r.wait_desk_idle()


@pytest.fixture
def both(rig):
    """Sessions on the desk's pcscd and on the shim, closed after the test."""
    made = []

    def make(env=None):
        d, s = rig.session("desk", env=env), rig.session("shim", env=env)
        made.extend([d, s])
        return {"desk": d, "shim": s}

    yield make
    for s in made:
        s.close()
        if s in rig.sessions:
            rig.sessions.remove(s)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed and _active_rigs:
        for i, r in enumerate(_active_rigs):
            rep.sections.append((f"rig {i} processes ({r.rt})", r.failure_report()))


# ------------------------------------------------------------------------------------------
# helpers for tests

def cb_pcsc(sock: str, *args: str, timeout: float = HANG_GUARD_S) -> dict:
    r = subprocess.run([str(CB_PCSC), *args], env=client_env(sock), capture_output=True, text=True, timeout=timeout)
    return last_json_line(r, f"cb-pcsc {args} on {sock}")


PYSCARD_PRELUDE = r'''
import json, os, sys, threading, time
from smartcard import scard as S
def out(o):
    print(json.dumps(o), flush=True)
def rvs(rv):
    return "0x%08X" % (rv & 0xFFFFFFFF)
'''


def pyscard_popen(sock: str, code: str, *args: str) -> subprocess.Popen:
    """Starts a pyscard snippet (PYSCARD_PRELUDE + code; sys.argv[1:] = args) on one socket."""
    return subprocess.Popen([SYSTEM_PYTHON, "-c", PYSCARD_PRELUDE + code, *args], env=client_env(sock),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def pyscard_result(p: subprocess.Popen, timeout: float = HANG_GUARD_S) -> dict:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"pyscard snippet hung for {timeout}s: {err[-2000:]}")
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines:
        raise AssertionError(f"pyscard snippet printed nothing (rc {p.returncode}): {err[-3000:]}")
    return json.loads(lines[-1])


def run_pyscard(sock: str, code: str, *args: str, timeout: float = HANG_GUARD_S) -> dict:
    """Runs a pyscard snippet in a subprocess on one socket; returns its last JSON line."""
    return pyscard_result(pyscard_popen(sock, code, *args), timeout)


def run_tool(argv, sock: str, timeout: float = HANG_GUARD_S, input: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=client_env(sock), capture_output=True, text=True, timeout=timeout, input=input)


def compare(results: Dict[str, object], what: str) -> None:
    """Assert that the desk's pcscd and the shim gave the same observable results."""
    d, s = results["desk"], results["shim"]
    if d != s:
        raise AssertionError(
            f"{what}: the shim differs from the desk's pcscd\n"
            f"  pcscd: {json.dumps(d, indent=None, default=str)}\n"
            f"  shim : {json.dumps(s, indent=None, default=str)}")


def strip_times(res):
    """Drop per-call bookkeeping (ids, stamps) from session results so they can be compared."""
    if isinstance(res, dict):
        return {k: strip_times(v) for k, v in res.items() if k not in ("id", "t0", "t1", "op", "value")}
    if isinstance(res, list):
        return [strip_times(v) for v in res]
    return res


def log_lines(text: str, pattern: str) -> List[str]:
    rx = re.compile(pattern)
    return [l for l in text.splitlines() if rx.search(l)]
