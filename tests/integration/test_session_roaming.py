"""Roaming over real RDP: the same user session, reached from desk A, then from desk B.

    desk A (emulated, "Desk A Reader 00 00/01") -> cb-rdp-client --client-name DESK-A  \
                                                                                        > cb-rdp-host (FreeRDP server,
    desk B (emulated, "Desk B Reader 00 00/01") -> cb-rdp-client --client-name DESK-B  /  one session)
        -> relay socket $XDG_RUNTIME_DIR/cardbridge/desk.sock (a FreeRDP-based host's session)
        -> the session shim, started by `cdrsession start` with no --desk: it detects the relay
        -> PC/SC programs (pyscard, long-lived: core_support.PcscSession) with its PCSCLITE_CSOCK_NAME

A disconnects (the RDP client is closed): waiters on A's reader and on the PnP reader wake with
the states pcscd gives for an unplugged reader, A's open handle fails like a handle on a removed
reader in pcscd (SCardTransmit SCARD_E_INVALID_VALUE, SCardStatus SCARD_E_READER_UNAVAILABLE).
B connects: only B's readers, nothing of A; PnP waiters wake; B's card works. The add-in is
loaded without a name: option, so the desk name is the RDP client name (what hospital IT sees in
`cdrsession status`/`doctor` and in the audit trail).

Reuses test_rdp_e2e.py's tools, add-in and certificate fixture.
Run:  /usr/bin/python3 -m pytest tests/integration/test_session_roaming.py -v
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from core_support import (PNP, RV, S_CHANGED, S_EMPTY, S_PRESENT, S_UNAVAILABLE, S_UNKNOWN, SESSION_SCRIPT,
                          PcscSession, flags)
from test_rdp_e2e import ADDIN, CLIENT, HOST, cert_dir  # noqa: F401  (cert_dir: the e2e test's fixture)
from test_session_support import (CPS3_ATR, GET_CHALLENGE, HANG_GUARD_S, OK, EmulatedDesk, Proc, Sessions, cdr,
                                  control, doctor, export_socket, require_built, session_env, shim_reader_names,
                                  short_tmp, start_desk, wait_until)


@pytest.fixture(scope="module")
def desks():
    require_built()
    for p in (HOST, CLIENT, ADDIN):
        if not Path(p).exists():
            pytest.fail(f"{p} not built", pytrace=False)
    made = []
    try:
        a = start_desk(slots=2, friendly_name="Desk A Reader", name="roam-a")
        made.append(a)
        a.insert_card(0, fix_tlv=True)
        b = start_desk(slots=2, friendly_name="Desk B Reader", name="roam-b")
        made.append(b)
        b.insert_card(0, atr=CPS3_ATR)
        yield a, b
    finally:
        for d in made:
            d.stop()


class RdpSession:
    """cb-rdp-host with its relay in the session's runtime directory, the session's shim from
    `cdrsession start`, and RDP clients from the desks."""

    def __init__(self, cert_dir: Path, logs: Path, mode: str = "static"):
        self.mode = mode
        self.logs = logs
        self.base = short_tmp("cbroam-")
        self.rt = self.base / "run"
        self.rt.mkdir(mode=0o700)
        self.relay = f"{self.rt}/cardbridge/desk.sock"
        self.env = session_env(str(self.rt))
        self.sessions = Sessions()
        self.procs: list[Proc] = []
        self.host = self._proc([HOST, "--port", "0", "--bind", "127.0.0.1", "--make-cert", cert_dir, "--relay",
                                self.relay, "--channel", mode, "--log-level", "info"], "host")
        line = wait_until(lambda: next((l for l in self.host.log_text().splitlines() if l.startswith("READY port=")),
                                       None), timeout=HANG_GUARD_S, desc="cb-rdp-host READY line",
                          abort=lambda: None if self.host.alive() else self.host.exit_description(),
                          details=lambda: self.host.log_tail(30))
        self.port = int(line.split("=", 1)[1])
        wait_until(lambda: os.path.exists(self.relay), timeout=HANG_GUARD_S, desc="the relay socket")
        r, self.sd = self.sessions.start(self.env)  # no --desk: detected from the relay socket
        self.env["PCSCLITE_CSOCK_NAME"] = export_socket(r.stdout)
        self.socket = self.sd.socket

    def _proc(self, argv, name, env=None) -> Proc:
        p = Proc([str(a) for a in argv], name=name, log_path=self.logs / f"{name}.log", env=env).start()
        self.procs.append(p)
        return p

    def connect(self, desk: EmulatedDesk, client_name: str) -> Proc:
        env = {**session_env(None), **desk.env()}
        p = self._proc([CLIENT, "--host", "127.0.0.1", "--port", str(self.port), "--addin", ADDIN, "--mode",
                        self.mode, "--addin-args", "log-level:info", "--client-name", client_name],
                       f"client-{client_name}", env)
        wait_until(lambda: "CONNECTED" in p.log_text().splitlines(), timeout=HANG_GUARD_S, desc=f"{client_name} to connect",
                   abort=lambda: None if p.alive() else p.exit_description(), details=lambda: p.log_tail(30))
        return p

    def wait_readers(self, want, timeout: float = 10.0):
        return wait_until(lambda: shim_reader_names(self.socket) == want, timeout=timeout,
                          desc=f"readers {want} in the session", details=self.report)

    def status(self) -> dict:
        return control(self.sd.ctl, {"cmd": "status"})

    def report(self) -> str:
        return "\n".join([p.failure_report(25) for p in self.procs] + [self.sd.logs()])

    def stop(self) -> None:
        self.sessions.stop_all()
        for p in reversed(self.procs):
            p.stop(grace=5)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(params=["static", "dynamic"])
def rdp(request, cert_dir, tmp_path):  # noqa: F811
    s = RdpSession(cert_dir, tmp_path, request.param)
    try:
        yield s
    finally:
        s.stop()
        print(s.report())


def event(res: dict) -> int:
    assert res["rv"] == OK, res
    return res["states"][0][1]


def test_roaming_from_desk_a_to_desk_b(rdp, desks):
    desk_a, desk_b = desks
    A, B = desk_a.readers, desk_b.readers
    st = rdp.status()
    assert st["desk_link"] == f"unix:{rdp.relay}" and not st["desk"]["connected"], st
    code, rep, _ = doctor(rdp.env, json_out=True)
    assert rep["session"]["type"] == "freerdp-host" and code == 2, rep  # up, no desk yet

    # ---- desk A -----------------------------------------------------------------------------
    t0 = time.monotonic()
    client_a = rdp.connect(desk_a, "DESK-A")
    rdp.wait_readers(A)
    print(f"[{rdp.mode}] desk A: readers in the session {time.monotonic() - t0:.2f} s after starting the RDP client")
    assert rdp.status()["desk"]["name"] == "DESK-A"

    script = rdp.logs / "pcsc_session.py"
    script.write_text(SESSION_SCRIPT)
    app = PcscSession(rdp.socket, script, "app")
    waiter = PcscSession(rdp.socket, script, "waiter")
    try:
        assert app.rv("establish") == OK
        r = app.call("connect", reader=A[0])
        assert r["rv"] == OK, r
        r = app.call("transmit", apdu=GET_CHALLENGE)
        assert r["rv"] == OK and r["sw"] == "9000", r
        assert app.call("status")["reader"] == A[0]

        # Waiters: on A's reader with a card, on A's empty reader, on the PnP reader.
        assert waiter.rv("establish", ctx="r") == OK and waiter.rv("establish", ctx="p") == OK
        assert waiter.rv("establish", ctx="e") == OK
        cur = event(waiter.call("gsc", ctx="r", readers=[[A[0], 0]], ms=0))
        assert cur & S_PRESENT, flags(cur)
        cur_empty = event(waiter.call("gsc", ctx="e", readers=[[A[1], 0]], ms=0))
        assert cur_empty & S_EMPTY, flags(cur_empty)
        pnp_cur = len(A) << 16  # the PnP pseudo-reader: the reader count in the high word
        w_card = waiter.start("gsc", ctx="r", readers=[[A[0], cur]], ms=-1)
        w_empty = waiter.start("gsc", ctx="e", readers=[[A[1], cur_empty]], ms=-1)
        w_pnp = waiter.start("gsc", ctx="p", readers=[[PNP, pnp_cur]], ms=-1)
        for w in (w_card, w_empty, w_pnp):
            w.wait_blocked("wait")  # (fails at once if a waiter returned with nothing changed)

        # ---- A disconnects (the user closes the RDP client at desk A) ------------------------
        t1 = time.monotonic()
        client_a.send_signal(signal.SIGTERM)
        res = w_card.result()
        woke = time.monotonic() - t1
        st_card = event(res)
        assert st_card & S_UNKNOWN and st_card & S_UNAVAILABLE and st_card & S_CHANGED, flags(st_card)
        st_empty = event(w_empty.result())
        assert st_empty & S_UNKNOWN and st_empty & S_UNAVAILABLE and st_empty & S_CHANGED, flags(st_empty)
        st_pnp = event(w_pnp.result())
        assert st_pnp & S_CHANGED, flags(st_pnp)
        print(f"[{rdp.mode}] waiters woke {woke * 1000:.0f} ms after desk A's client was closed: reader {flags(st_card)}, "
              f"PnP {flags(st_pnp)}")
        assert client_a.wait(HANG_GUARD_S) == 0, client_a.failure_report(20)

        # What pcscd gives for a handle on an unplugged reader.
        r = app.call("transmit", apdu=GET_CHALLENGE)
        assert r["rv"] == RV["E_INVALID_VALUE"], r
        r = app.call("status")
        assert r["rv"] == RV["E_READER_UNAVAILABLE"], r
        r = app.call("list")
        assert r["rv"] == RV["E_NO_READERS_AVAILABLE"] and r["readers"] == [], r
        assert shim_reader_names(rdp.socket) == []
        st = rdp.status()
        assert not st["desk"]["connected"] and st["readers"] == [], st

        # ---- B connects (the same user, the same session, another desk) ------------------------
        w_pnp2 = waiter.start("gsc", ctx="p", readers=[[PNP, 0 << 16]], ms=-1)  # no reader now
        w_pnp2.wait_blocked("wait")
        t2 = time.monotonic()
        client_b = rdp.connect(desk_b, "DESK-B")
        st_pnp2 = event(w_pnp2.result())
        assert st_pnp2 & S_CHANGED, flags(st_pnp2)
        rdp.wait_readers(B)
        print(f"[{rdp.mode}] desk B: readers in the session {time.monotonic() - t2:.2f} s after starting its RDP client")

        # Only B's readers, nothing of A: in PC/SC, in the shim's status, for a fresh program too.
        r = app.call("list")
        assert r["rv"] == OK and r["readers"] == B, r
        st = rdp.status()
        assert st["desk"]["connected"] and st["desk"]["name"] == "DESK-B", st
        assert [x["name"] for x in st["readers"]] == B
        assert "Desk A" not in json.dumps(st["readers"])
        assert app.call("connect", reader=A[0], h="stale")["rv"] == RV["E_UNKNOWN_READER"]
        # A's handle stays dead: no silent redirection to B's card.
        assert app.call("transmit", apdu=GET_CHALLENGE)["rv"] == RV["E_INVALID_VALUE"]
        # A new wait on A's reader name: that reader does not exist any more (libpcsclite's answer
        # from the shim's reader array).
        r = waiter.call("gsc", ctx="r", readers=[[A[0], st_card & ~S_CHANGED]], ms=300, states_on_error=True)
        assert r["rv"] == RV["E_UNKNOWN_READER"], r

        fresh = PcscSession(rdp.socket, script, "fresh")
        try:
            assert fresh.rv("establish") == OK
            assert fresh.call("list")["readers"] == B
            assert fresh.rv("connect", reader=B[0]) == OK
            r = fresh.call("transmit", apdu=GET_CHALLENGE)
            assert r["rv"] == OK and r["sw"] == "9000", r
            assert fresh.call("status")["atr"] == CPS3_ATR
        finally:
            fresh.close()
        assert client_b.alive()
    finally:
        app.close()
        waiter.close()

    # The doctor, in this session: desk B by its client name, its CPS3 card, healthy.
    code, rep, _ = doctor(rdp.env, "--pings", "10", json_out=True)
    assert code == 0 and rep["verdict"] == "healthy", rep
    assert rep["desk"]["name"] == "DESK-B" and [r["name"] for r in rep["readers"]] == B
    assert rep["cards"][0]["kind"] == "cps3"
    print(f"[{rdp.mode}] over RDP: desk round trip median {rep['latency']['median_us']:.0f} us, "
          f"p99 {rep['latency']['p99_us']:.0f} us")

    # The audit trail tells the story, per desk.
    r = cdr("status", "--json", env=rdp.env)
    events = [e["event"] for e in json.loads(r.stdout)["audit"]]
    want = ["desk connected: declared-name='DESK-A'", "card connected: reader='Desk A Reader 00 00'",
            "desk disconnected: declared-name='DESK-A'", "desk connected: declared-name='DESK-B'",
            "card connected: reader='Desk B Reader 00 00'"]
    pos = 0
    for e in events:
        if pos < len(want) and e.startswith(want[pos]):
            pos += 1
    assert pos == len(want), f"audit trail {events} lacks {want[pos:]} in order"


def test_reconnect_from_another_desk_takes_the_session_over(rdp, desks):
    """The user walks to desk B without closing the client at desk A: B's connection takes the
    session over (as an RDS reconnect does); A's client is disconnected; A's readers vanish with
    the same errors; only B's readers remain."""
    desk_a, desk_b = desks
    A, B = desk_a.readers, desk_b.readers
    client_a = rdp.connect(desk_a, "DESK-A")
    rdp.wait_readers(A)
    script = rdp.logs / "pcsc_session.py"
    script.write_text(SESSION_SCRIPT)
    app = PcscSession(rdp.socket, script, "app")
    try:
        assert app.rv("establish") == OK and app.rv("establish", ctx="w") == OK
        assert app.rv("connect", reader=A[0]) == OK
        cur = event(app.call("gsc", ctx="w", readers=[[A[0], 0]], ms=0))
        waiting = app.start("gsc", ctx="w", readers=[[A[0], cur & ~S_CHANGED]], ms=-1)
        t0 = time.monotonic()
        client_b = rdp.connect(desk_b, "DESK-B")
        st = event(waiting.result())
        assert st & S_UNKNOWN and st & S_UNAVAILABLE and st & S_CHANGED, flags(st)
        assert client_a.wait(HANG_GUARD_S) == 0, client_a.failure_report(20)
        rdp.wait_readers(B)
        print(f"[{rdp.mode}] takeover: B's readers {time.monotonic() - t0:.2f} s after B's client started")
        assert app.call("transmit", apdu=GET_CHALLENGE)["rv"] == RV["E_INVALID_VALUE"]
        assert app.call("status")["rv"] == RV["E_READER_UNAVAILABLE"]
        assert app.call("list")["readers"] == B
        assert rdp.status()["desk"]["name"] == "DESK-B"
        assert app.rv("connect", reader=B[0], h="b") == OK
        r = app.call("transmit", h="b", apdu=GET_CHALLENGE)
        assert r["rv"] == OK and r["sw"] == "9000", r
        assert client_b.alive()
    finally:
        app.close()
