"""The fault matrix, bad input and exhausted resources (docs/faults.md): oversized, truncated and
garbage input on every socket, and file descriptors run out in the shim and the desk agent.

Sockets (each: oversized, truncated, garbage):
  * the shim's pcsc-lite socket (a raw client; the same bytes to the desk's pcscd for reference);
  * the shim's desk link (a fake desk the shim connects to);
  * the shim's control socket;
  * the desk agent's listener (a fake shim).
"Oversized" announces more than the socket's limit; "truncated" sends the start of a valid
message and then nothing (the connection stays open while everyone else is served, then hangs
up); "garbage" is bytes that are no message at all. Outcome: the offender's connection closed
(or, for a silent truncation, simply waited for), a log line saying why, the process alive with
the same pid, every other client served. Times (input -> the connection closed, or the
program's answer) go to the report (cbharness.faultreport, fault-matrix/input.json).

File descriptors: the shim's and the agent's RLIMIT_NOFILE soft limit lowered (prlimit) to what
they hold, then more clients: a client that cannot be served is refused at once (as pcscd), the
others served, the listener quiet (no retry storm, no spin).
"""
from __future__ import annotations

import os
import re
import resource
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from core_support import (CB_PCSC, CMD, GET_CHALLENGE, HANG_GUARD_S, OK, RV, SHIM_BIN, PcscSession, Proc, WireClient,
                          client_env, log_lines, reader_states, shim_control, threadstate, wait_until)
from cbharness.faultreport import LIVENESS_MS, PROMPT_MS, FaultReport
from test_core_malformed import (FakeDesk, _agent_conn, _agent_hello, _hdr, _transmit_struct, frame,  # noqa: E402
                                 pb_parse, reply)

E_UNAVAIL = RV["E_READER_UNAVAILABLE"]


@pytest.fixture(scope="module")
def report(request):
    r = FaultReport("input")
    yield r
    r.finish(request.config)


@pytest.fixture(scope="module")
def irig(module_rig_factory):
    return module_rig_factory(slots=2, cards=({"slot": 0},), name="finput")


def _ms(a: float, b: float) -> float:
    return 1000.0 * (b - a)


def _until_closed(s: socket.socket) -> float:
    """Reads until the peer closes (EOF or reset); the CLOCK_MONOTONIC stamp of the close.
    Fails at the hang guard if the peer keeps the connection."""
    s.settimeout(HANG_GUARD_S)
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return time.monotonic()
        except socket.timeout:
            raise AssertionError(f"the peer kept the connection for the hang guard ({HANG_GUARD_S:.0f} s)")
        if not chunk:
            return time.monotonic()


def _send(s: socket.socket, data: bytes) -> float:
    t = time.monotonic()
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed before it took everything: the close is the outcome
    return t


def _good_program(sock: str) -> float:
    """A real program (cb-pcsc: connect, GET CHALLENGE x2) works; returns its wall time in ms."""
    t0 = time.monotonic()
    r = subprocess.run([str(CB_PCSC), "transmit", "--apdu", GET_CHALLENGE, "--count", "2"], env=client_env(sock),
                       capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert '"connect":"0x00000000"' in r.stdout and r.stdout.count("9000") == 2, \
        f"a good program no longer works: {r.stdout} {r.stderr}"
    return _ms(t0, time.monotonic())


def _unix(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


# ------------------------------------------------------------------------------------------
# the shim's pcsc-lite socket (and the desk's pcscd, the reference)

PCSC_INPUT = {
    # kind: (bytes, handshake first)
    "oversized": (_hdr(0xFFFFFFF0, CMD["VERSION"]) + b"\0" * 12, False),   # a 4 GB request
    "garbage": (b"\xde\xad\xbe\xef" * 16, False),
}


@pytest.mark.parametrize("kind", ["oversized", "garbage"])
def test_pcsc_socket_oversized_and_garbage(irig, report, kind):
    data, handshake = PCSC_INPUT[kind]
    pid = irig.shim.pid
    before = len(log_lines(irig.shim_log(), "protocol error"))
    ms = {}
    for t in ("desk", "shim"):
        w = WireClient(irig.sock(t))
        if handshake:
            w.open()
        t0 = _send(w.s, data)
        ms[t] = _ms(t0, _until_closed(w.s))
        w.close()
    line = wait_until(lambda: log_lines(irig.shim_log(), "protocol error")[before:], timeout=HANG_GUARD_S,
                      desc="the shim's log line")[0]
    assert "closing the connection" in line, line
    assert irig.shim.alive() and irig.shim.pid == pid
    _good_program(irig.sock("shim"))
    report.add(f"{kind} request on the shim's pcsc-lite socket", "that connection closed (libpcsclite: the call "
               "fails, 0x80100013/0x8010001D); log: protocol error; other programs unaffected", ms["shim"],
               PROMPT_MS, "nothing to recover", pcscd=f"pcscd closes too ({ms['desk']:.1f} ms)", path="pcsc-lite socket")


def test_pcsc_socket_truncated(irig, report):
    """A request cut short and then silence (the connection open), then a hang-up: pcscd waits
    for the rest on that client's thread; the shim waits for it on that connection only."""
    pid = irig.shim.pid
    stuck = {}
    for t in ("desk", "shim"):
        w = WireClient(irig.sock(t)).open()
        w.send_raw(_hdr(32, CMD["TRANSMIT"]) + _transmit_struct(100) + b"\0" * 10)  # 10 of 100 data bytes
        stuck[t] = w
    others = _good_program(irig.sock("shim"))   # while both are stuck
    _good_program(irig.sock("desk"))
    for w in stuck.values():
        w.close()
    assert irig.shim.alive() and irig.shim.pid == pid
    _good_program(irig.sock("shim"))
    report.add("truncated request on the shim's pcsc-lite socket (then silence, then hang-up)",
               "that connection waits (as on pcscd); other programs unaffected", None, PROMPT_MS,
               "the hang-up frees it", pcscd="same", path="pcsc-lite socket",
               notes=f"a good program meanwhile: {others:.0f} ms (connect + 2 transmits)")


# ------------------------------------------------------------------------------------------
# the shim's desk link (a fake desk)

@pytest.fixture
def fake(irig):
    d = Path(tempfile.mkdtemp(prefix="cbffake-", dir="/tmp"))
    desk = FakeDesk(str(d / "desk.sock"))
    sock = str(d / "shim" / "pcscd.comm")
    proc = Proc([str(SHIM_BIN), "--socket", sock, "--desk", f"unix:{desk.path}", "--log-level", "debug"],
                name="shim-fake", log_path=irig.logs / f"shim-fake-{len(irig.retired)}.log",
                env=client_env("/nonexistent")).start()
    irig.retired.append(proc)
    wait_until(lambda: os.path.exists(sock), timeout=HANG_GUARD_S, desc="the fake desk's shim socket",
               abort=lambda: None if proc.alive() else proc.exit_description())
    yield {"desk": desk, "sock": sock, "proc": proc}
    proc.stop()
    desk.close()
    import shutil
    shutil.rmtree(d, ignore_errors=True)


READER = "Fake Reader 00 00"


def _fake_session(fake, script):
    c = fake["desk"].session(readers=(READER.encode(),))
    wait_until(lambda: [r.name for r in reader_states(fake["sock"])] == [READER], timeout=HANG_GUARD_S,
               desc="the fake desk's reader on the shim")
    prog = PcscSession(fake["sock"], script, "fake-desk-program")
    assert prog.rv("establish") == OK
    return c, prog


DESK_INPUT = {
    "oversized": (struct.pack(">I", 0xFFFFFFFF), r"desk link: bad frame \(frame length above the limit\)"),
    "garbage": (frame(b"\xff" * 40), r"desk link: malformed message"),
}


@pytest.mark.parametrize("kind", ["oversized", "garbage"])
def test_desk_link_oversized_and_garbage(irig, fake, report, kind):
    """The desk sends a frame above the limit, or bytes that are no message: the shim drops the
    link (its readers vanish: a waiter wakes), says why, and takes the desk's next session."""
    data, pattern = DESK_INPUT[kind]
    c, prog = _fake_session(fake, irig.script)
    try:
        cur = prog.call("gsc", readers=[[READER, 0]], ms=0)["states"][0][1] & ~2
        w = prog.start("gsc", readers=[[READER, cur]], ms=-1)
        w.wait_blocked("wait")
        t0 = _send(c.s, data)
        r = w.result()
        assert r["rv"] == OK and r["states"][0][1] & 0x4, r   # UNKNOWN: the reader went away
        assert c.closed_by_peer(), "the shim kept the desk link"
        assert log_lines(fake["proc"].log_text(), pattern), fake["proc"].log_tail(10)
        t_new = time.monotonic()
        c2 = fake["desk"].session(readers=(READER.encode(),), instance=2)
        wait_until(lambda: prog.call("list")["readers"] == [READER], timeout=HANG_GUARD_S,
                   desc="the desk's next session")
        t_back = time.monotonic()
        c2.close()
    finally:
        prog.close()
        c.close()
    assert fake["proc"].alive()
    report.add(f"{kind} frame from the desk", "link dropped: readers vanish (waiters UNKNOWN|UNAVAILABLE|CHANGED; "
               "a call in flight 0x80100017); log says why", _ms(t0, r["t1"]), PROMPT_MS,
               "the desk's next session is taken: readers back", _ms(t_new, t_back), path="desk link",
               pcscd="-")


def test_desk_link_truncated_reply(irig, fake, report):
    """The desk's reply to a program's Transmit stops half-way, and then nothing comes (the link
    open): the shim cannot tell a slow link from a dead one until its liveness probe goes
    unanswered: the program gets SCARD_E_READER_UNAVAILABLE within the liveness bound."""
    c, prog = _fake_session(fake, irig.script)
    try:
        # the fake desk answers the Connect, then cuts the Transmit's reply short
        p = prog.start("connect", reader=READER)
        req = _next_request(c, op=3)
        c.send(frame(reply(req, handle=77, protocol=2)))
        assert p.result()["rv"] == OK
        t = prog.start("transmit", apdu=GET_CHALLENGE)
        req = _next_request(c, op=8)
        whole = frame(reply(req, data=bytes(8) + b"\x90\x00"))
        c.send(whole[:len(whole) // 2])
        r = t.result()
        assert r["rv"] == E_UNAVAIL, r
        assert log_lines(fake["proc"].log_text(), r"does not answer"), fake["proc"].log_tail(10)
    finally:
        prog.close()
        c.close()
    assert fake["proc"].alive()
    report.add("truncated reply from the desk (then silence)", "the call in flight 0x80100017 READER_UNAVAILABLE, "
               "readers vanish", _ms(r["t0"], r["t1"]), LIVENESS_MS, "the desk's next session", path="desk link",
               pcscd="no pcscd equivalent (silence)")


def _next_request(c, op: int) -> int:
    """Reads frames from the shim until a request with |op|; returns its id."""
    while True:
        env = c.read_frame()
        assert env is not None, "the shim closed the desk link"
        if 5 in env and pb_parse(env[5][0]).get(1, [0])[0] == op:
            return env[1][0]


# ------------------------------------------------------------------------------------------
# the shim's control socket

def test_control_socket(irig, report):
    ctl = irig.shim_sock + ".ctl"
    pid = irig.shim.pid
    # truncated: half a request, kept open, while another client is answered
    stuck = _unix(ctl)
    stuck.sendall(b'{"cmd": "sta')
    t0 = time.monotonic()
    st = shim_control(ctl, {"cmd": "status"}, timeout=HANG_GUARD_S)
    other_ms = _ms(t0, time.monotonic())
    assert st["pid"] == pid
    # oversized: more than a request may be, without a newline
    big = _unix(ctl)
    t_big = _send(big, b"x" * 8192)
    big_ms = _ms(t_big, _until_closed(big))
    big.close()
    # garbage: a line that is no JSON request: answered with an error, then closed
    g = _unix(ctl)
    t_g = _send(g, b"\x00\xff\xfe not json\n")
    g.settimeout(HANG_GUARD_S)
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = g.recv(4096)
        if not chunk:
            break
        answer += chunk
    g_ms = _ms(t_g, time.monotonic())
    assert b'"error"' in answer, answer
    _until_closed(g)
    g.close()
    stuck.close()
    assert irig.shim.alive() and irig.shim.pid == pid
    assert shim_control(ctl, {"cmd": "status"})["pid"] == pid
    _good_program(irig.sock("shim"))
    for kind, ms, sees, notes in (("oversized", big_ms, "connection closed (request too large)", ""),
                                  ("garbage", g_ms, 'answered {"error": ...}, then closed', ""),
                                  ("truncated", None, "that connection waits; other clients answered",
                                   f"another client's status meanwhile: {other_ms:.1f} ms")):
        report.add(f"{kind} request on the control socket", sees, ms, PROMPT_MS, "nothing to recover",
                   path="control socket", pcscd="-", notes=notes)


# ------------------------------------------------------------------------------------------
# the desk agent's listener (a fake shim)

AGENT_INPUT = {
    "oversized": (struct.pack(">I", 0xFFFFFFFF) + b"\0" * 16, r"bad frame \(frame length above the limit\)"),
    "garbage": (frame(b"\xff" * 40), r"malformed message from the server"),
}


@pytest.mark.parametrize("kind", ["oversized", "garbage"])
def test_agent_listener_oversized_and_garbage(irig, report, kind):
    data, pattern = AGENT_INPUT[kind]
    pid = irig.agent.pid
    before = len(log_lines(irig.agent_log(), pattern))
    c = _agent_conn(irig)
    try:
        t0 = _send(c.s, data)
        t1 = _until_closed(c.s)
    finally:
        c.close()
    wait_until(lambda: len(log_lines(irig.agent_log(), pattern)) > before, timeout=HANG_GUARD_S,
               desc="the agent's log line")
    assert irig.agent.alive() and irig.agent.pid == pid
    _good_program(irig.sock("shim"))
    report.add(f"{kind} frame to the desk agent", "that connection closed; log says why; the other servers' "
               "programs unaffected", _ms(t0, t1), PROMPT_MS, "nothing to recover", path="agent listener",
               pcscd="-")


def test_agent_listener_truncated(irig, report):
    pid = irig.agent.pid
    c = _agent_conn(irig)
    try:
        _agent_hello(c)
        c.send(struct.pack(">I", 100) + b"\x08" * 10)  # 10 of 100 bytes, then silence
        others = _good_program(irig.sock("shim"))
    finally:
        c.close()
    assert irig.agent.alive() and irig.agent.pid == pid
    _good_program(irig.sock("shim"))
    report.add("truncated frame to the desk agent (then silence, then hang-up)",
               "that connection waits; the other servers' programs unaffected", None, PROMPT_MS,
               "the hang-up frees it", path="agent listener", pcscd="-",
               notes=f"a good program meanwhile: {others:.0f} ms")


# ------------------------------------------------------------------------------------------
# file descriptors

def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class _SoftLimit:
    """RLIMIT_NOFILE's soft limit of a running process set to |n| (restored on exit: only the
    soft limit is touched, so it can always go back up to the hard one)."""

    def __init__(self, pid: int, n: int):
        self.pid, self.n = pid, n
        self.old = resource.prlimit(pid, resource.RLIMIT_NOFILE)

    def __enter__(self):
        resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (self.n, self.old[1]))
        return self

    def __exit__(self, *exc):
        try:
            resource.prlimit(self.pid, resource.RLIMIT_NOFILE, self.old)
        except ProcessLookupError:
            pass


@pytest.fixture
def frig(make_rig):
    return make_rig(slots=2, cards=({"slot": 0},), name="ffd")


def _accept_failures(log: str) -> int:
    return len(re.findall(r"accept failed: Too many open files", log))


# pcscd refuses a client it cannot serve by closing the connection at once (winscard_svc.c@1.9.9
# CreateContextThread, "Too many context running": `pcscd --max-thread`), and libpcsclite's
# SCardEstablishContext then fails with one of these, depending on when it sees the close
# (measured on pcscd 1.9.9: 0x8010001D, sometimes 0x8010006A when the close resets the socket).
REFUSED = {RV["E_NO_SERVICE"], "0x8010006A", RV["F_COMM_ERROR"]}


def test_shim_at_its_fd_limit_refuses_new_programs(frig, report):
    pid = frig.shim.pid
    held = [WireClient(frig.shim_sock).open() for _ in range(2)]
    with _SoftLimit(pid, _fds(pid)):
        before = _accept_failures(frig.shim_log())
        s = frig.session("shim", name="newcomer")
        p = s.start("establish")
        t0 = time.monotonic()
        # the program's answer, or the evidence that it will not come: the shim failing to accept
        # it five times (its 100 ms retries) while the call still waits for the daemon's answer
        wait_until(lambda: p.done() or (_accept_failures(frig.shim_log()) - before >= 5
                                        and threadstate.state(s.pid, p.tid()) == "reply"),
                   timeout=HANG_GUARD_S, desc="the new program's answer, or the shim's failed accepts")
        storm = _accept_failures(frig.shim_log()) - before
        assert p.done(), (f"the new program's SCardEstablishContext still waits for an answer after the shim "
                          f"logged {storm} failed accepts (log storm, no refusal)")
        r = p.result()
        assert r["rv"] in REFUSED, r
        assert storm <= 1, f"{storm} 'accept failed' lines for one refused client"
        for w in held:
            assert len(w.readers_state()) == 16 * 184  # the programs already in are served
    report.add("fd exhaustion in the shim: a new program",
               "refused at once: 0x8010001D (0x8010006A when the close resets the socket, as with pcscd)",
               _ms(t0, r["t1"]),
               PROMPT_MS, "an fd frees: new programs served", path="pcsc-lite socket",
               pcscd="pcscd refuses at its limit: 0x8010001D (--max-thread)")


def test_shim_at_its_fd_limit_keeps_serving_and_recovers(frig, report):
    """At RLIMIT_NOFILE the programs already connected keep working (a transfer included), and
    when one of them goes the program that was waiting is served (nothing lost, nothing
    restarted). Also: the control socket's listener at the same limit must not spin (it retried
    accept() with no pause: a core at 100 % for as long as the limit lasts)."""
    pid = frig.shim.pid
    a = frig.session("shim", name="in")
    assert a.rv("establish") == OK and a.rv("connect", reader=frig.desk.readers[0]) == OK
    held = WireClient(frig.shim_sock).open()
    with _SoftLimit(pid, _fds(pid)):
        before = _accept_failures(frig.shim_log())
        s = frig.session("shim", name="newcomer")
        p = s.start("establish")
        wait_until(lambda: p.done() or _accept_failures(frig.shim_log()) - before >= 2, timeout=HANG_GUARD_S,
                   desc="the shim at its fd limit")
        assert a.call("transmit", apdu=GET_CHALLENGE)["rv"] == OK  # the program already in works
        t_free = time.monotonic()
        held.close()
        r = p.result()
        assert r["rv"] in REFUSED | {OK}, r
        if r["rv"] != OK:
            assert s.rv("establish", ctx="again") == OK
        t_ok = time.monotonic()
    assert s.call("list", ctx="again" if r["rv"] != OK else "c")["readers"] == frig.desk.readers
    assert frig.shim.alive() and frig.shim.pid == pid
    report.add("fd exhaustion in the shim: programs already connected", "served as before (Transmit 0x00000000)",
               None, PROMPT_MS, "an fd frees: the waiting program is served", _ms(t_free, t_ok),
               path="pcsc-lite socket", pcscd="same")


def _listener_fd(pid: int, path: str) -> int:
    """The fd number of |pid|'s listening unix socket bound to |path|."""
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[7] == path:
            inodes.add(f"socket:[{f[6]}]")
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return int(fd)
        except OSError:
            pass
    raise AssertionError(f"no socket of pid {pid} bound to {path}")


def test_shim_control_socket_at_its_fd_limit_does_not_spin(frig):
    """Both of the shim's listeners have a client waiting while the shim is at its fd limit. The
    pcsc-lite listener retries accept() after a pause; the control listener must pause as well.
    The pcsc-lite listener's retries are the clock: once it has failed 5 times, the control
    listener must not have failed more than a few times as often (a pausing listener: about as
    many; a spinning one: thousands). No wall-clock window."""
    pid = frig.shim.pid
    ctl_path = frig.shim_sock + ".ctl"
    fds = {"pcsc": _listener_fd(pid, frig.shim_sock), "ctl": _listener_fd(pid, ctl_path)}
    out = frig.rt / "strace.out"

    def failed() -> dict:
        text = out.read_text() if out.exists() else ""
        return {k: len(re.findall(rf"accept4?\({fd},.*EMFILE", text)) for k, fd in fds.items()}

    with _SoftLimit(pid, _fds(pid)):
        tr = subprocess.Popen(["strace", "-qq", "-e", "trace=accept,accept4", "-p", str(pid), "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: out.exists(), timeout=HANG_GUARD_S, desc="strace attached")
            p = _unix(frig.shim_sock)   # pending in the pcsc-lite listener's backlog
            c = _unix(ctl_path)         # pending in the control listener's backlog
            c.sendall(b'{"cmd":"status"}\n')
            n = wait_until(lambda: (lambda f: f if f["pcsc"] >= 5 or f["ctl"] >= 5000 else None)(failed()),
                           timeout=HANG_GUARD_S, desc="5 failed accepts on the pcsc-lite listener",
                           details=lambda: f"{failed()}")
        finally:
            tr.send_signal(signal.SIGINT)
            tr.wait(HANG_GUARD_S)
        p.close()
        c.close()
    print(f"failed accept() calls at the fd limit: {n}")
    assert n["ctl"] <= 4 * max(n["pcsc"], 5), f"{n}: the control listener spins on EMFILE"


def test_agent_at_its_fd_limit(frig, report):
    """The agent cannot open one more PC/SC context at the desk: the program's Connect that needs
    it fails at once with SCARD_E_NO_SERVICE (what a local pcscd's client gets from
    SCardEstablishContext at pcscd's own limit; the shim answers EstablishContext locally, so the
    desk's refusal surfaces on the first call that needs a desk context), the agent says so once,
    the programs already connected keep working, and a Connect works again when a context frees."""
    pid = frig.agent.pid
    r0 = frig.desk.readers[0]
    a = frig.session("shim", name="A")
    assert a.rv("establish") == OK and a.rv("connect", reader=r0) == OK
    b = frig.session("shim", name="B")
    assert b.rv("establish") == OK
    before = len(log_lines(frig.agent_log(), "cannot establish a PC/SC context"))
    with _SoftLimit(pid, _fds(pid)):
        r = b.call("connect", reader=r0)
        assert r["rv"] == RV["E_NO_SERVICE"], r
        assert a.call("transmit", apdu=GET_CHALLENGE)["rv"] == OK
        lines = log_lines(frig.agent_log(), "cannot establish a PC/SC context")[before:]
        assert len(lines) == 1, lines
        a.close()   # its desk context goes: room for one
        t_free = time.monotonic()
        ok = wait_until(lambda: (lambda x: x if x["rv"] == OK else None)(b.call("connect", reader=r0)),
                        timeout=HANG_GUARD_S, interval=0.01, max_interval=0.02,
                        desc="B's Connect once A's desk context is released")
        assert b.call("transmit", apdu=GET_CHALLENGE)["rv"] == OK
    assert frig.agent.alive() and frig.agent.pid == pid
    report.add("fd exhaustion in the desk agent: a Connect needing a new desk context",
               "SCardConnect 0x8010001D NO_SERVICE at once (agent logs it once); connected programs unaffected",
               _ms(r["t0"], r["t1"]), PROMPT_MS, "a desk context frees: Connect works", _ms(t_free, ok["t1"]),
               path="agent", pcscd="pcscd at its limit: SCardEstablishContext 0x8010001D")


def test_agent_at_its_fd_limit_refuses_new_servers(frig):
    pid = frig.agent.pid
    with _SoftLimit(pid, _fds(pid)):
        before = _accept_failures(frig.agent_log())
        sock = str(frig.rt / "shim2" / "pcscd.comm")
        p = frig._proc([SHIM_BIN, "--socket", sock, "--desk", f"unix:{frig.agent_sock}", "--log-level", "debug"],
                       "shim2", client_env("/nonexistent"))
        frig.retired.append(p)
        refused = re.compile(r"desk .* connection closed")
        wait_until(lambda: log_lines(p.log_text(), refused.pattern) or _accept_failures(frig.agent_log()) - before >= 5,
                   timeout=HANG_GUARD_S, desc="the agent to refuse the second shim, or to fail accepting it")
        storm = _accept_failures(frig.agent_log()) - before
        assert log_lines(p.log_text(), refused.pattern), f"the agent logged {storm} failed accepts and neither " \
                                                         f"served nor refused the second shim"
        assert storm <= 1, f"{storm} 'accept failed' lines for one refused connection"
