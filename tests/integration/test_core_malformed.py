"""Malformed input on both sockets: a clear error in the log, that connection closed, everyone
else unaffected.

  * pcsc-lite socket of the shim: raw clients speaking broken pcsc-lite protocol (each case is
    also run against the desk's pcscd: closing or answering must match);
  * the desk agent's socket: a fake "shim" sending broken cardbridge frames;
  * the shim's desk link: a fake "desk" (a socket this test listens on, given to a second shim
    as --desk) sending broken frames.
After every case a good client must still work (and the processes must still be the same)."""
from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest

from core_support import (CB_PCSC, CMD, GET_CHALLENGE, HANG_GUARD_S, OK, RV, SHIM_BIN, PcscSession, Proc, WireClient,
                          client_env, compare, log_lines, wait_until)

# ------------------------------------------------------------------------------------------
# helpers


def _send_tolerant(w: WireClient, data: bytes) -> bool:
    """Sends data; False if the peer closed the connection before taking all of it (pcscd closes
    a connection as soon as it has read a header it refuses, whatever else the client still
    has to send: how much of it the client got to write depends on socket buffers, so only
    the close itself is an outcome)."""
    try:
        w.s.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def _read_some(w: WireClient, n: int) -> tuple:
    """Up to n bytes; (bytes, closed) where closed means the peer closed before n bytes came."""
    got = b""
    while len(got) < n:
        try:
            chunk = w.s.recv(n - len(got))
        except ConnectionResetError:
            return got, True
        except socket.timeout:
            raise AssertionError(f"no answer within the hang guard ({HANG_GUARD_S:.0f} s): the peer neither "
                                 f"answered nor closed (got {len(got)} of {n} bytes)")
        if not chunk:
            return got, True
        got += chunk
    return got, False


def _observe(sock_path: str, payload, handshake: bool, expect: tuple, mask=None) -> dict:
    """Sends payload (bytes, or a function of a valid card handle: then the client also connects
    to the card first) on a fresh pcsc-lite connection and observes what the daemon does, by
    events only: expect = (n, after) is pcscd's outcome, n answer bytes and then "closed" (the
    connection is closed) or "open" (it still serves: a CMD_GET_READERS_STATE is answered). The
    observation stops at whatever comes first (EOF, n bytes, the probe's answer), so a peer
    that behaves differently shows up in the result, not as a timing artefact.
    mask: byte ranges of the reply to blank (random values)."""
    n, after = expect
    with WireClient(sock_path, timeout=HANG_GUARD_S) as w:
        if handshake or callable(payload):
            w.open()
        if callable(payload):
            card, _, rv = w.connect(READER0)
            assert rv == 0, f"connect 0x{rv:08X}"
            payload = payload(card)
        _send_tolerant(w, payload)
        got, closed = _read_some(w, n)
        if not closed and after == "closed":
            extra, closed = _read_some(w, 1 << 20)  # until EOF (or the hang guard)
            got += extra
        elif not closed:
            if _send_tolerant(w, _hdr(0, CMD["GET_READERS_STATE"])):
                array, closed = _read_some(w, 16 * 184)
            else:
                closed = True
        for a, b in mask or ():
            got = got[:a] + b"\0" * (min(b, len(got)) - a) + got[b:]
        return {"closed": closed, "reply": got[:16].hex(), "reply_len": len(got)}


def _good_client_works(sock_path: str) -> None:
    import subprocess
    r = subprocess.run([str(CB_PCSC), "transmit", "--apdu", GET_CHALLENGE, "--count", "2"], env=client_env(sock_path),
                       capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert '"connect":"0x00000000"' in r.stdout and r.stdout.count("9000") == 2, \
        f"a good client no longer works: {r.stdout} {r.stderr}"


def _wait_log(get_text, pattern: str, before: int, what: str, timeout: float = HANG_GUARD_S) -> str:
    lines = wait_until(lambda: log_lines(get_text(), pattern)[before:] or None, timeout=timeout,
                       desc=f"a log line matching {pattern!r} ({what})",
                       details=lambda: "\n".join(get_text().splitlines()[-15:]))
    return lines[0]


def _hdr(size: int, cmd: int) -> bytes:
    return struct.pack("<II", size, cmd)


def _transmit_struct(send_len: int, card: int = 1) -> bytes:
    return struct.pack("<iIIIIIII", card, 2, 16, send_len, 3, 16, 264, 0)


READER0 = "Virtual PCD 00 00"

PCSC_CASES = {
    # name: (payload or payload(card), handshake first, reply bytes to blank)
    # pcscd 1.9.9 closes the connection without a word on every one of these (winscard_svc.c
    # ContextThread: READ_BODY/size checks, unknown command -> goto exit), except the last two,
    # which it answers (12 bytes) and keeps serving: EXPECT below.
    "garbage": (b"\xde\xad\xbe\xef" * 16, False, None),
    "unknown_command": (_hdr(0, 0x99), True, None),
    "list_readers_0x03": (_hdr(0, CMD["LIST_READERS"]), True, None),
    "get_status_change_0x0C": (_hdr(0, CMD["GET_STATUS_CHANGE"]), True, None),
    "cancel_transaction_0x0E": (_hdr(0, CMD["CANCEL_TRANSACTION"]), True, None),
    "establish_wrong_size": (_hdr(20, CMD["ESTABLISH"]) + b"\0" * 20, True, None),
    "version_wrong_size": (_hdr(8, CMD["VERSION"]) + struct.pack("<ii", 4, 4), False, None),
    "huge_header_size": (_hdr(0xFFFFFFF0, CMD["VERSION"]) + b"\0" * 12, False, None),
    "transmit_send_length_2G": (lambda card: _hdr(32, CMD["TRANSMIT"]) + _transmit_struct(0x7FFFFFFF, card), True,
                                None),
    "transmit_send_length_65549": (lambda card: _hdr(32, CMD["TRANSMIT"]) + _transmit_struct(65549, card)
                                   + b"\0" * 65549, True, None),
    "control_send_length_256M": (lambda card: _hdr(24, CMD["CONTROL"])
                                 + struct.pack("<iIIIII", card, 0x42000D48, 0x10000000, 0, 0, 0), True, None),
    "get_attrib_length_300": (lambda card: _hdr(280, CMD["GET_ATTRIB"]) + struct.pack("<iI", card, 0x90303)
                              + b"\0" * 264 + struct.pack("<II", 300, 0), True, None),
    "set_attrib_length_265": (lambda card: _hdr(280, CMD["SET_ATTRIB"]) + struct.pack("<iI", card, 0x90303)
                              + b"\1" * 264 + struct.pack("<II", 265, 0), True, None),
    "transmit_wrong_size": (lambda card: _hdr(36, CMD["TRANSMIT"]) + _transmit_struct(5, card) + b"\0" * 4
                            + bytes.fromhex(GET_CHALLENGE), True, None),
    # pcscd 1.9.9 answers with its own version {4, 4}; the shim with the highest it speaks
    # ({4, 6}, as pcscd 2.5 would). libpcsclite only looks at the rv: compare that.
    "version_major_3": (_hdr(12, CMD["VERSION"]) + struct.pack("<iiI", 3, 0, 0), False, [(4, 8)]),
    "establish_before_version": (_hdr(12, CMD["ESTABLISH"]) + struct.pack("<III", 0, 0, 0), False, [(4, 8)]),
}


CLOSED = (0, "closed")
EXPECT = {case: CLOSED for case in PCSC_CASES}
EXPECT.update({
    # CMD_VERSION 3.0: pcscd answers {4, 4, SCARD_E_SERVICE_STOPPED} and carries on.
    "version_major_3": (12, "open"),
    # ESTABLISH without CMD_VERSION: pcscd does not require the version first.
    "establish_before_version": (12, "open"),
})


@pytest.mark.parametrize("case", list(PCSC_CASES))
def test_broken_pcsc_lite_requests(rig, case):
    payload, handshake, mask = PCSC_CASES[case]
    before = len(log_lines(rig.shim_log(), "protocol error"))
    shim_pid = rig.shim.pid
    res = {t: _observe(rig.sock(t), payload, handshake, EXPECT[case], mask=mask) for t in ("desk", "shim")}
    n, after = EXPECT[case]
    assert res["desk"]["reply_len"] == n and res["desk"]["closed"] == (after == "closed"), \
        f"pcscd no longer does what this test pins for '{case}' ({EXPECT[case]}): {res['desk']}"
    if res["desk"]["closed"]:
        line = _wait_log(rig.shim_log, "protocol error", before, case)
        assert "closing the connection" in line, line
    compare(res, f"pcsc-lite request '{case}'")
    assert rig.shim.alive() and rig.shim.pid == shim_pid
    _good_client_works(rig.sock("shim"))


def test_truncated_requests_and_partial_header(rig):
    """Clients that stop in the middle of a request (then hang up, or stay silent) cost the
    other clients nothing."""
    shim = rig.sock("shim")
    # half a header, kept open while a good client works
    idle = WireClient(shim)
    idle.send_raw(b"\x0c\x00\x00")
    # a transmit announcing 100 data bytes, 10 sent, kept open
    stuck = WireClient(shim).open()
    stuck.send_raw(_hdr(32, CMD["TRANSMIT"]) + _transmit_struct(100) + b"\0" * 10)
    _good_client_works(shim)
    for payload in (_hdr(12, CMD["VERSION"]) + b"\x04\x00", _hdr(32, CMD["TRANSMIT"]) + b"\0" * 7):
        w = WireClient(shim)
        if payload[4] == CMD["TRANSMIT"]:
            w.open()
        w.send_raw(payload)
        w.close()  # hang up mid-request
    idle.close()
    stuck.close()
    _good_client_works(shim)
    assert rig.shim.alive()


def test_unread_replies_are_bounded(rig):
    """A client that sends requests and never reads the answers (each 8-byte
    CMD_GET_READERS_STATE costs the shim a 2944-byte reply): pcscd's thread just blocks on the
    full socket. The shim bounds what it queues: past 1 MiB of unread answers it closes that
    client (server-shim/io/src/shim_service.cpp, "answers unread; closing the connection"),
    stays up, and serves everyone else."""
    def rss_kb(pid):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {pid}: the shim is gone")

    pid = rig.shim.pid
    before = len(log_lines(rig.shim_log(), "answers unread; closing the connection"))
    base = rss_kb(pid)
    w = WireClient(rig.sock("shim"), timeout=HANG_GUARD_S).open()
    burst = _hdr(0, CMD["GET_READERS_STATE"]) * 4096
    # Far more than the bound (1 MiB of answers = 357 requests); a blocking send either ends
    # with the shim closing on us (the outcome), or blocks until the hang guard (the shim
    # stopped reading without closing), or runs out of requests (the shim reads and queues
    # without bound).
    sent, limit, closed = 0, 200_000 * 8, False
    try:
        while sent < limit:
            w.s.sendall(burst)
            sent += len(burst)
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    except socket.timeout:
        raise AssertionError(f"the shim stopped reading after {sent // 8} unread requests and did not close the "
                             f"client within {HANG_GUARD_S:.0f} s")
    assert closed, f"the shim took {sent // 8} unread CMD_GET_READERS_STATE requests (answers: " \
                   f"{sent // 8 * 2944 >> 20} MiB) without closing the client"
    # What reached us before the close is answers, then EOF.
    _, eof = _read_some(w, 1 << 30)
    assert eof
    w.close()
    _wait_log(rig.shim_log, "answers unread; closing the connection", before, "the unread-answers limit")
    assert rig.shim.alive() and rig.shim.pid == pid, "the shim died"
    grown_mb = (rss_kb(pid) - base) / 1024
    assert grown_mb < 40, f"the shim's memory grew by {grown_mb:.0f} MB although it closed the client"
    _good_client_works(rig.sock("shim"))


# ------------------------------------------------------------------------------------------
# cardbridge.v1 frames, hand-encoded (protocol/wire/proto/cardbridge/v1/cardbridge.proto)

def _varint(n: int) -> bytes:
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb_int(num: int, v: int) -> bytes:
    return _varint(num << 3) + _varint(v) if v else b""


def pb_bytes(num: int, b: bytes) -> bytes:
    return _varint((num << 3) | 2) + _varint(len(b)) + b


def hello(role: int, major: int = 1, minor: int = 0, caps: int = 1, reply: bool = False, instance: int = 0x1234,
          name: bytes = b"fake") -> bytes:
    return (pb_int(1, major) + pb_int(2, minor) + pb_int(3, caps) + pb_int(4, role) + pb_bytes(5, b"fake 0")
            + pb_bytes(6, name) + pb_int(7, instance) + pb_int(8, int(reply)))


def envelope(body_field: int, body: bytes, mid: int = 0) -> bytes:
    return pb_int(1, mid) + pb_bytes(body_field, body)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def reader_info(name: bytes, state: int = 0x22, count: int = 1, atr: bytes = bytes.fromhex("3B00")) -> bytes:
    return pb_bytes(1, name) + pb_int(2, state) + pb_int(3, count) + pb_bytes(4, atr)


def snapshot(*readers: bytes, seq: int = 1) -> bytes:
    return envelope(3, pb_int(1, seq) + b"".join(pb_bytes(2, r) for r in readers))


def request(op: int, context: int = 1, handle: int = 0, data: bytes = b"", mid: int = 1) -> bytes:
    body = pb_int(1, op) + pb_int(2, context) + pb_int(3, handle) + (pb_bytes(9, data) if data else b"")
    return envelope(5, body, mid)


def reply(mid: int, rv: int = 0, handle: int = 0, protocol: int = 0, data: bytes = b"") -> bytes:
    return envelope(6, pb_int(1, rv) + pb_int(2, handle) + pb_int(3, protocol) + (pb_bytes(4, data) if data else b""),
                    mid)


def pb_parse(b: bytes) -> dict:
    """field number -> list of values (int or bytes)."""
    out, i = {}, 0
    while i < len(b):
        key, i = _read_varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(b, i)
        elif wt == 2:
            n, i = _read_varint(b, i)
            v, i = b[i:i + n], i + n
        else:
            raise ValueError(f"wire type {wt}")
        out.setdefault(num, []).append(v)
    return out


def _read_varint(b: bytes, i: int):
    shift = v = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return v, i


class FrameConn:
    def __init__(self, s: socket.socket):
        self.s = s
        self.s.settimeout(HANG_GUARD_S)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def read_frame(self, timeout: float = HANG_GUARD_S):
        """Next envelope as a parsed dict, or None if the peer closed."""
        end = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    payload, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return pb_parse(payload)
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame")
            self.s.settimeout(left)
            try:
                chunk = self.s.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def closed_by_peer(self, timeout: float = HANG_GUARD_S) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.read_frame(end - time.monotonic()) is None:
                    return True
            except (TimeoutError, socket.timeout):
                return False
            except ValueError:
                continue
        return False

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------
# a fake "shim" on the desk agent's socket

def _agent_conn(rig) -> FrameConn:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(rig.agent_sock)
    return FrameConn(s)


def _agent_hello(c: FrameConn) -> dict:
    """Completes the hello exchange as a server; returns the desk's hello."""
    c.send(frame(envelope(2, hello(role=2))))
    while True:
        env = c.read_frame()
        assert env is not None, "the agent closed the connection during the hello"
        if 2 in env:
            h = pb_parse(env[2][0])
            if h.get(8, [0])[0]:  # the reply to our hello
                return h


AGENT_CASES = {
    # name: (frames to send, hello first, log pattern, the agent closes the connection)
    "frame_length_4G": (struct.pack(">I", 0xFFFFFFFF) + b"\0" * 16, False, r"bad frame \(frame length above the limit\)",
                        True),
    "frame_length_600k": (struct.pack(">I", 600 * 1024) + b"\0" * 1024, False,
                          r"bad frame \(frame length above the limit\)", True),
    "empty_frame": (struct.pack(">I", 0), False, r"bad frame \(empty frame\)", True),
    "garbage_payload": (frame(b"\xff" * 40), False, r"malformed message from the server", True),
    "envelope_without_body": (frame(pb_int(1, 7)), False, r"malformed message from the server", True),
    "hello_from_a_desk": (frame(envelope(2, hello(role=1))), False, r"peer is not a CardBridge server", True),
    "hello_version_9": (frame(envelope(2, hello(role=2, major=9))), False, r"server speaks protocol 9\.", True),
    "request_before_hello": (frame(request(op=8, data=b"\0\x84\0\0\x08")), False, r"before the hello exchange; ignored",
                             False),
    "unknown_op_after_hello": (frame(request(op=99)), True, r"malformed message from the server", True),
    "request_without_id": (frame(request(op=13, mid=0)), True, r"malformed message from the server", True),
    "oversized_request_data": (frame(request(op=8, data=b"\0" * 70000)), True, r"malformed message from the server",
                               True),
}


@pytest.mark.parametrize("case", list(AGENT_CASES))
def test_broken_frames_to_the_desk_agent(rig, case):
    data, with_hello, pattern, closes = AGENT_CASES[case]
    agent_pid = rig.agent.pid
    before = len(log_lines(rig.agent_log(), pattern))
    c = _agent_conn(rig)
    try:
        if with_hello:
            _agent_hello(c)
        c.send(data)
        line = _wait_log(rig.agent_log, pattern, before, case)
        if closes:
            assert c.closed_by_peer(), f"{case}: the agent kept the connection (log: {line})"
        else:
            # Still served: the hello exchange that was missing now succeeds on the same connection.
            _agent_hello(c)
    finally:
        c.close()
    assert rig.agent.alive() and rig.agent.pid == agent_pid, "the desk agent died"
    _good_client_works(rig.sock("shim"))


def test_desk_agent_requests_with_bogus_handles(rig):
    """After a proper hello, card requests naming handles this connection never got: error
    replies, nothing else (and the real shim's handles are untouched)."""
    s = rig.session("shim")
    s.call("establish")
    assert s.rv("connect", reader=rig.desk.readers[0]) == OK
    c = _agent_conn(rig)
    try:
        _agent_hello(c)
        answers = {}
        for mid, op in ((11, 8), (12, 5), (13, 6), (14, 12)):   # transmit, disconnect, begin, status
            for handle in (1, 2, 0x7FFFFFFF):
                c.send(frame(request(op=op, context=1, handle=handle, data=b"\0\x84\0\0\x08" if op == 8 else b"",
                                     mid=mid * 100 + handle % 100)))
        while len(answers) < 12:
            env = c.read_frame()
            assert env is not None, "the agent closed the connection"
            if 6 in env:
                answers[env[1][0]] = pb_parse(env[6][0]).get(1, [0])[0]
        assert len(answers) == 12, answers
        # every one: SCARD_E_INVALID_HANDLE (the desk engine knows no such handle on this
        # connection; client-plugin/core/src/desk_core.cpp), and nothing reached a card
        assert set(answers.values()) == {int(RV["E_INVALID_HANDLE"], 16)}, {k: hex(v) for k, v in answers.items()}
    finally:
        c.close()
    assert s.call("transmit", apdu=GET_CHALLENGE)["rv"] == OK
    s.close()


# ------------------------------------------------------------------------------------------
# a fake "desk" for a second shim

class FakeDesk:
    """Listens on a UNIX socket that a shim uses as --desk; hands out the connections."""

    def __init__(self, path: str):
        self.path = path
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(8)
        self.srv.settimeout(HANG_GUARD_S)

    def accept(self, timeout: float = HANG_GUARD_S) -> FrameConn:
        self.srv.settimeout(timeout)
        s, _ = self.srv.accept()
        return FrameConn(s)

    def session(self, readers=(b"Fake Reader 00 00",), instance: int = 1) -> FrameConn:
        """Accepts the shim, says hello as a desk, pushes a reader snapshot."""
        c = self.accept()
        c.send(frame(envelope(2, hello(role=1, instance=instance))))
        c.send(frame(snapshot(*[reader_info(r) for r in readers])))
        return c

    def close(self):
        self.srv.close()


@pytest.fixture
def fake(rig):
    d = Path(tempfile.mkdtemp(prefix="cbfake-", dir="/tmp"))
    desk = FakeDesk(str(d / "desk.sock"))
    sock = str(d / "shim" / "pcscd.comm")
    proc = Proc([str(SHIM_BIN), "--socket", sock, "--desk", f"unix:{desk.path}", "--log-level", "debug"],
                name="shim-fakedesk", log_path=rig.logs / "shim-fakedesk.log", env=client_env("/nonexistent")).start()
    rig.retired.append(proc)
    wait_until(lambda: os.path.exists(sock), timeout=HANG_GUARD_S, desc="the second shim's socket",
               abort=lambda: None if proc.alive() else proc.exit_description())
    yield {"desk": desk, "sock": sock, "proc": proc, "log": proc.log_text}
    proc.stop()
    desk.close()
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def _readers(sock):
    from core_support import reader_states
    return [r.name for r in reader_states(sock)]


DESK_CASES = {
    # name: (frame, log pattern)
    "frame_length_4G": (struct.pack(">I", 0xFFFFFFFF), r"desk link: bad frame \(frame length above the limit\)"),
    "empty_frame": (struct.pack(">I", 0), r"desk link: bad frame \(empty frame\)"),
    "garbage_payload": (frame(b"\xff" * 40), r"desk link: malformed message"),
    "reader_name_with_nul": (frame(snapshot(reader_info(b"Bad\0Name"))), r"desk link: malformed message"),
    "reader_name_200_bytes": (frame(snapshot(reader_info(b"R" * 200))), r"desk link: malformed message"),
    "duplicate_reader_names": (frame(snapshot(reader_info(b"Twin"), reader_info(b"Twin"))),
                               r"desk link: malformed message"),
    "65_readers": (frame(snapshot(*[reader_info(b"R%02d" % i) for i in range(65)])), r"desk link: malformed message"),
    "atr_40_bytes": (frame(snapshot(reader_info(b"Long ATR", atr=b"\x3b" * 40))), r"desk link: malformed message"),
    "state_with_counter_bits": (frame(snapshot(reader_info(b"Counter", state=0x10022))),
                                r"desk link: malformed message"),
    "reply_data_70000": (frame(reply(5, data=b"\0" * 70000)), r"desk link: malformed message"),
    "second_hello_as_server": (frame(envelope(2, hello(role=2, instance=9))), r"peer is not a CardBridge desk"),
}


@pytest.mark.parametrize("case", list(DESK_CASES))
def test_broken_frames_from_the_desk(rig, fake, case):
    """The shim's desk sends a broken frame: the shim logs it, drops the link (its readers
    vanish, programs get answers, not hangs), reconnects, and is fine with a good desk."""
    data, pattern = DESK_CASES[case]
    c = fake["desk"].session()
    wait_until(lambda: _readers(fake["sock"]) == ["Fake Reader 00 00"], timeout=HANG_GUARD_S,
               desc="the fake desk's reader")
    prog = PcscSession(fake["sock"], rig.script, "fake-shim-client")
    try:
        assert prog.rv("establish") == OK
        cur = prog.call("gsc", readers=[["Fake Reader 00 00", 0]], ms=0)["states"][0][1] & ~2
        waiter = prog.start("gsc", readers=[["Fake Reader 00 00", cur]], ms=-1)
        waiter.wait_blocked("wait")
        before = len(log_lines(fake["log"](), pattern))
        c.send(data)
        line = _wait_log(fake["log"], pattern, before, case)
        assert c.closed_by_peer(), f"{case}: the shim kept the desk link open after: {line}"
        r = waiter.result()
        assert r["rv"] == OK and r["states"][0][1] & 0x4, f"the waiter was not told the reader went away: {r}"
        assert prog.call("list")["rv"] == RV["E_NO_READERS_AVAILABLE"]
        # the shim reconnects; a good desk session works
        c2 = fake["desk"].session(readers=(b"Fake Reader 00 00", b"Fake Reader 00 01"), instance=2)
        wait_until(lambda: len(_readers(fake["sock"])) == 2, timeout=HANG_GUARD_S,
                   desc="the readers of the new desk session")
        assert prog.call("list")["readers"] == ["Fake Reader 00 00", "Fake Reader 00 01"]
        c2.close()
        c.close()
    finally:
        prog.close()
    assert fake["proc"].alive()


def test_fake_desk_replies(rig, fake):
    """Replies the shim did not ask for are ignored; a transmit reply larger than the program's
    buffer becomes SCARD_E_INSUFFICIENT_BUFFER (never an overflow); a desk that never answers a
    transmit leaves the program waiting only until the desk link goes."""
    c = fake["desk"].session()
    wait_until(lambda: _readers(fake["sock"]) == ["Fake Reader 00 00"], timeout=HANG_GUARD_S,
               desc="the fake desk's reader")
    c.send(frame(reply(4242, rv=0, data=b"\x90\x00")))  # nobody asked
    w = WireClient(fake["sock"]).open()

    def answer_next(expect_op: int, **kw):
        while True:
            env = c.read_frame()
            assert env is not None, "the shim closed the desk link"
            if 5 in env:
                req = pb_parse(env[5][0])
                assert req.get(1, [0])[0] == expect_op, req
                c.send(frame(reply(env[1][0], **kw)))
                return req

    t = threading.Thread(target=answer_next, args=(3,), kwargs=dict(handle=77, protocol=2))
    t.start()
    card, proto, rv = w.connect("Fake Reader 00 00")
    t.join()
    assert rv == 0 and proto == 2, hex(rv)
    # a 300-byte answer for a 264-byte buffer
    t = threading.Thread(target=answer_next, args=(8,), kwargs=dict(data=b"\x11" * 298 + b"\x90\x00"))
    t.start()
    r = w.transmit(card, bytes.fromhex(GET_CHALLENGE), recv_len=264)
    t.join()
    assert r["rv"] == RV["E_INSUFFICIENT_BUFFER"] and r["recv_length"] == 300 and r["data"] == "", r
    # the stream is still in step
    t = threading.Thread(target=answer_next, args=(8,), kwargs=dict(data=b"\x90\x00"))
    t.start()
    r = w.transmit(card, bytes.fromhex(GET_CHALLENGE))
    t.join()
    assert r["rv"] == OK and r["data"] == "9000", r
    # a transmit the desk never answers (the fake desk has read the request: it is in flight),
    # then the desk link drops: the program gets the error pcscd gives for a transmit in flight
    # on a reader that goes away, SCARD_E_READER_UNAVAILABLE (ifdwrapper.c@1.9.9 IFDTransmit:
    # IFD_NO_SUCH_DEVICE -> SCARD_E_READER_UNAVAILABLE), and no data
    w.transmit_request(card, bytes.fromhex(GET_CHALLENGE))
    env = c.read_frame()
    while 5 not in env:
        env = c.read_frame()
    c.close()
    f = struct.unpack("<iIIIIIII", w.recv_exact(32))
    assert f"0x{f[7]:08X}" == RV["E_READER_UNAVAILABLE"], f"transmit in flight at desk loss: rv 0x{f[7]:08X}"
    w.close()
    assert fake["proc"].alive()
