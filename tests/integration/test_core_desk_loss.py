"""Losing the desk: the desk agent killed mid-wait and mid-transmit, restarted, started after the
shim; the desk's pcscd restarted. Programs get an error (never a hang), the readers disappear,
and come back when the desk does; the shim is never restarted. How long each takes is printed
(the fault benchmarks measure it), not asserted: waits end on events, with hang guards only.

pcsc-lite reference for a reader that disappears (what libpcsclite makes of the reader array):
a waiter on that reader returns SCARD_S_SUCCESS with UNKNOWN|UNAVAILABLE|CHANGED, a PnP waiter
returns with CHANGED, SCardListReaders returns SCARD_E_NO_READERS_AVAILABLE, SCardStatus
returns SCARD_E_READER_UNAVAILABLE, SCardConnect returns SCARD_E_UNKNOWN_READER.

Each test gets its own rig (desk with a card in slot 0)."""
from __future__ import annotations

import signal
import time

import pytest

from core_support import (GATED_APDU, GET_CHALLENGE, HANG_GUARD_S, OK, PNP, RV, S_CHANGED, flags, log_lines,
                          wait_until)


@pytest.fixture
def lrig(make_rig):
    return make_rig(slots=2, cards=({"slot": 0, "gate": True},), name="loss")


def _readers_gone(s, ctx="h"):
    return s.call("list", ctx=ctx)["rv"] == RV["E_NO_READERS_AVAILABLE"]


def _after(p, t_event, what):
    """The call's result; it must have returned after the event (and the lag is printed)."""
    r = p.result()
    assert r["t1"] >= t_event, f"{what} returned before the desk went away: {r}"
    print(f"{what} returned {1000 * (r['t1'] - t_event):.0f} ms after the desk went away")
    return r


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_agent_killed_mid_wait_and_restarted(lrig, sig):
    r0 = lrig.desk.readers[0]
    shim_pid = lrig.shim.pid
    s = lrig.session("shim")
    for c in ("w", "p", "h"):
        assert s.rv("establish", ctx=c) == OK
    assert s.rv("connect", ctx="h", reader=r0, h="old") == OK
    cur = s.call("gsc", ctx="w", readers=[[r0, 0]], ms=0)["states"][0][1] & ~S_CHANGED
    wait_reader = s.start("gsc", ctx="w", readers=[[r0, cur]], ms=-1)
    wait_pnp = s.start("gsc", ctx="p", readers=[[PNP, 2 << 16]], ms=-1)
    wait_reader.wait_blocked("wait")
    wait_pnp.wait_blocked("wait")

    t_kill = time.monotonic()
    lrig.kill_agent(sig)
    r = _after(wait_reader, t_kill, "the INFINITE wait on the reader")
    assert r["rv"] == OK and {"UNKNOWN", "UNAVAILABLE", "CHANGED"} <= set(flags(r["states"][0][1])), r
    r = _after(wait_pnp, t_kill, "the INFINITE wait on the PnP reader")
    assert r["rv"] == OK and r["states"][0][1] & S_CHANGED, r
    # (libpcsclite builds SCardListReaders from the array the woken waiter already read: at once)
    assert _readers_gone(s), "the readers are still listed after the waiters saw them go"

    # pcscd for a handle whose reader was unplugged: the daemon no longer finds the handle in any
    # reader (readerfactory.c@1.9.9 RFReaderInfoById -> SCARD_E_INVALID_VALUE) for Transmit and
    # Begin; libpcsclite's SCardStatus does not find the reader in the array
    # (winscard_clnt.c@1.9.9 -> SCARD_E_READER_UNAVAILABLE); Connect by name: unknown reader.
    lost = {"transmit": s.call("transmit", h="old", apdu=GET_CHALLENGE)["rv"],
            "status": s.call("status", h="old")["rv"],
            "begin": s.rv("begin", h="old"),
            "connect": s.rv("connect", ctx="h", reader=r0, h="x")}
    assert lost == {"transmit": RV["E_INVALID_VALUE"], "status": RV["E_READER_UNAVAILABLE"],
                    "begin": RV["E_INVALID_VALUE"], "connect": RV["E_UNKNOWN_READER"]}, lost

    # the desk comes back: a PnP waiter sees it, the same contexts work again
    wait_pnp = s.start("gsc", ctx="p", readers=[[PNP, 0 << 16]], ms=-1)
    wait_pnp.wait_blocked("wait")
    t_start = time.monotonic()
    lrig.start_agent()
    r = wait_pnp.result()
    assert r["rv"] == OK and r["states"][0][1] & S_CHANGED, r
    lrig.wait_synced()
    print(f"readers back {1000 * (time.monotonic() - t_start):.0f} ms after the agent was started")
    assert s.call("list", ctx="h")["readers"] == lrig.desk.readers
    assert s.call("gsc", ctx="w", readers=[[r0, 0]], ms=0)["states"][0][2] == lrig.desk.atr(0).hex().upper()
    assert s.rv("connect", ctx="h", reader=r0, h="new") == OK
    tr = s.call("transmit", h="new", apdu=GET_CHALLENGE)
    assert tr["rv"] == OK and tr["sw"] == "9000"
    # the old handle stays dead: it must not be mapped onto the new desk session
    assert s.call("transmit", h="old", apdu=GET_CHALLENGE)["rv"] == RV["E_INVALID_VALUE"]
    assert lrig.shim.alive() and lrig.shim.pid == shim_pid
    st = lrig.status()
    assert st["desk"]["connected"] and st["desk"]["session"] == 2, st["desk"]


def test_agent_killed_mid_transmit(lrig):
    """A transmit in flight at the card (a gated APDU the card holds) when the agent is killed:
    the program gets the error pcscd gives for a transmit on a reader that goes away
    (ifdwrapper.c@1.9.9 IFDTransmit: IFD_NO_SUCH_DEVICE -> SCARD_E_READER_UNAVAILABLE), not a
    hang."""
    r0 = lrig.desk.readers[0]
    s = lrig.session("shim")
    s.call("establish")
    assert s.rv("connect", reader=r0) == OK
    p = s.start("transmit", apdu=GATED_APDU)
    lrig.desk.gate(0).wait_held(1)  # at the card, unanswered
    t_kill = time.monotonic()
    lrig.kill_agent(signal.SIGKILL)
    r = _after(p, t_kill, "the transmit in flight")
    assert r["rv"] == RV["E_READER_UNAVAILABLE"], f"the transmit in flight at desk loss: {r}"
    # the card answers at last (the desk's pcscd finishes that transmit for a dead client);
    # restart the agent: the same program carries on with a new connection
    lrig.desk.gate(0).release(1)
    lrig.start_agent()
    lrig.wait_synced()
    assert s.rv("connect", reader=r0, h="new") == OK
    assert s.call("transmit", h="new", apdu=GET_CHALLENGE)["rv"] == OK


def test_waiting_begin_and_held_transaction_when_agent_killed(lrig):
    """A holds a transaction, B waits in BeginTransaction; the agent dies: B gets an error
    promptly. After the restart a new context gets a transaction at once (no stale lock)."""
    r0 = lrig.desk.readers[0]
    a, b = lrig.session("shim", name="A"), lrig.session("shim", name="B")
    for s in (a, b):
        s.call("establish")
        assert s.rv("connect", reader=r0) == OK
    assert a.rv("begin") == OK
    assert a.call("transmit", apdu=GET_CHALLENGE)["rv"] == OK
    pb = b.start("begin")
    pb.wait_blocked("retry")  # SHARING_VIOLATION: B waits for A's transaction
    t_kill = time.monotonic()
    lrig.kill_agent(signal.SIGKILL)
    r = _after(pb, t_kill, "the waiting BeginTransaction")
    # its next try finds a handle whose reader is gone (RFReaderInfoById: SCARD_E_INVALID_VALUE)
    assert r["rv"] == RV["E_INVALID_VALUE"], r
    # the desk's pcscd cleans up the dead agent (A's lock released, the card reset, the handles
    # dropped: the array's sharing count goes to 0 last) before a new agent connects
    wait_until(lambda: lrig.desk.state(0).sharing == 0, timeout=HANG_GUARD_S,
               desc="pcscd to clean up the dead agent's handles", details=lambda: f"{lrig.desk.state(0)}")
    lrig.start_agent()
    lrig.wait_synced()
    c = lrig.session("shim", name="C")
    c.call("establish")
    assert c.rv("connect", reader=r0) == OK
    # No stale lock: the Begin is answered without ever being told SHARING_VIOLATION (a stale
    # lock would keep it in libpcsclite's retry loop until the hang guard).
    assert c.rv("begin") == OK
    assert c.call("transmit", apdu=GET_CHALLENGE)["rv"] == OK
    assert c.rv("end") == OK


def test_shim_started_before_the_agent(make_rig):
    rig = make_rig(slots=2, cards=({"slot": 0},), start_agent=False, name="late")
    s = rig.session("shim")
    assert s.rv("establish") == OK
    assert s.call("list")["rv"] == RV["E_NO_READERS_AVAILABLE"]
    assert s.call("connect", reader=rig.desk.readers[0])["rv"] == RV["E_UNKNOWN_READER"]
    assert not rig.status()["desk"]["connected"]
    # let the shim's reconnect back-off grow: several failed attempts, seen in its log
    wait_until(lambda: len(log_lines(rig.shim_log(), r"desk .* not reachable")) >= 4, timeout=HANG_GUARD_S,
               desc="the shim to retry the desk link a few times", details=lambda: rig.shim_log()[-3000:])
    t0 = time.monotonic()
    rig.start_agent()
    rig.wait_synced()
    print(f"readers appeared {1000 * (time.monotonic() - t0):.0f} ms after the agent started")
    assert s.call("list")["readers"] == rig.desk.readers
    assert s.rv("connect", reader=rig.desk.readers[0]) == OK
    assert s.call("transmit", apdu=GET_CHALLENGE)["rv"] == OK


def test_desk_pcscd_restarted(lrig):
    """The desk's own pcscd goes away and comes back (same socket): the readers disappear from
    the shim and come back; nothing on the server side is restarted. For the server program
    this is its readers being unplugged and plugged back: its context (which its daemon, the
    shim, never dropped) must work again, as it would on pcscd after a reader re-plug."""
    r0 = lrig.desk.readers[0]
    s = lrig.session("shim")
    s.call("establish")
    assert s.rv("connect", reader=r0) == OK
    pnp = s.start("gsc", readers=[[PNP, 2 << 16]], ms=-1)
    pnp.wait_blocked("wait")
    lrig.desk.restart()
    r = pnp.result()
    assert r["rv"] == OK and r["states"][0][1] & S_CHANGED
    lrig.wait_synced()
    assert lrig.agent.alive() and lrig.shim.alive()
    # the old handle died with that pcscd: as on a reader that was unplugged and plugged back,
    # the daemon finds it in no reader (RFReaderInfoById: SCARD_E_INVALID_VALUE)
    assert s.call("transmit", apdu=GET_CHALLENGE)["rv"] == RV["E_INVALID_VALUE"]
    fresh = lrig.session("shim", name="fresh")
    fresh.call("establish")
    results = {"new program: connect": fresh.rv("connect", reader=r0),
               "new program: transmit": fresh.call("transmit", apdu=GET_CHALLENGE)["rv"],
               "running program, same context: connect": s.rv("connect", reader=r0, h="new"),
               "running program, same context: transmit": s.call("transmit", h="new", apdu=GET_CHALLENGE)["rv"]}
    assert results == {k: OK for k in results}, results
