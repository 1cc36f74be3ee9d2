"""Losing the desk: the desk agent killed mid-wait and mid-transmit, restarted, started after the
shim; the desk's pcscd restarted. Programs get an error promptly (never a hang), the readers
disappear, and come back when the desk does; the shim is never restarted.

pcsc-lite reference for a reader that disappears (what libpcsclite makes of the reader array):
a waiter on that reader returns SCARD_S_SUCCESS with UNKNOWN|UNAVAILABLE|CHANGED, a PnP waiter
returns with CHANGED, SCardListReaders returns SCARD_E_NO_READERS_AVAILABLE, SCardStatus
returns SCARD_E_READER_UNAVAILABLE, SCardConnect returns SCARD_E_UNKNOWN_READER.

Each test gets its own rig (desk with a card in slot 0)."""
from __future__ import annotations

import signal
import time

import pytest

from core_support import GET_CHALLENGE, OK, PNP, RV, S_CHANGED, HarnessError, flags, wait_until


@pytest.fixture
def lrig(make_rig):
    return make_rig(slots=2, cards=({"slot": 0},), name="loss")


def _readers_gone(s, ctx="h"):
    return s.call("list", ctx=ctx)["rv"] == RV["E_NO_READERS_AVAILABLE"]


def _assert_prompt(p, t_event, what, limit=1.0):
    r = p.result(5)
    lag = r["t1"] - t_event
    assert lag < limit, f"{what} returned {lag:.3f}s after the desk went away"
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
    time.sleep(0.3)
    assert not wait_reader.done() and not wait_pnp.done()

    t_kill = time.monotonic()
    lrig.kill_agent(sig)
    r = _assert_prompt(wait_reader, t_kill, "the INFINITE wait on the reader")
    assert r["rv"] == OK and {"UNKNOWN", "UNAVAILABLE", "CHANGED"} <= set(flags(r["states"][0][1])), r
    r = _assert_prompt(wait_pnp, t_kill, "the INFINITE wait on the PnP reader")
    assert r["rv"] == OK and r["states"][0][1] & S_CHANGED, r
    wait_until(lambda: _readers_gone(s), timeout=1.0, desc="the readers to disappear from SCardListReaders")

    lost = {"transmit": s.call("transmit", h="old", apdu=GET_CHALLENGE)["rv"],
            "status": s.call("status", h="old")["rv"],
            "begin": s.rv("begin", h="old"),
            "connect": s.rv("connect", ctx="h", reader=r0, h="x")}
    assert lost["transmit"] != OK and lost["begin"] != OK, lost
    assert lost["status"] == RV["E_READER_UNAVAILABLE"] and lost["connect"] == RV["E_UNKNOWN_READER"], lost

    # the desk comes back: a PnP waiter sees it, the same contexts work again
    wait_pnp = s.start("gsc", ctx="p", readers=[[PNP, 0 << 16]], ms=-1)
    time.sleep(0.1)
    t_start = time.monotonic()
    lrig.start_agent()
    r = wait_pnp.result(5)
    assert r["rv"] == OK and r["states"][0][1] & S_CHANGED, r
    lrig.wait_synced(timeout=5)
    assert time.monotonic() - t_start < 4.0
    assert s.call("list", ctx="h")["readers"] == lrig.desk.readers
    assert s.call("gsc", ctx="w", readers=[[r0, 0]], ms=0)["states"][0][2] == lrig.desk.atr(0).hex().upper()
    assert s.rv("connect", ctx="h", reader=r0, h="new") == OK
    tr = s.call("transmit", h="new", apdu=GET_CHALLENGE)
    assert tr["rv"] == OK and tr["sw"] == "9000"
    # the old handle stays dead: it must not be mapped onto the new desk session
    assert s.call("transmit", h="old", apdu=GET_CHALLENGE)["rv"] != OK
    assert lrig.shim.alive() and lrig.shim.pid == shim_pid
    st = lrig.status()
    assert st["desk"]["connected"] and st["desk"]["session"] == 2, st["desk"]


def test_agent_killed_mid_transmit(lrig):
    """A transmit in flight at the desk (a 1-byte command vpcd never answers) when the agent is
    killed: the program gets an error at once, not a hang."""
    r0 = lrig.desk.readers[0]
    s = lrig.session("shim")
    s.call("establish")
    assert s.rv("connect", reader=r0) == OK
    p = s.start("transmit", apdu="00")
    time.sleep(0.3)
    assert not p.done(), f"the 1-byte transmit returned at once: {p.result()}"
    t_kill = time.monotonic()
    lrig.kill_agent(signal.SIGKILL)
    r = _assert_prompt(p, t_kill, "the transmit in flight")
    assert r["rv"] != OK, f"the transmit in flight returned success after the desk was lost: {r}"
    # the desk's pcscd is still stuck in that transmit: remove and re-insert the card, restart
    # the agent; the same program carries on with a new connection
    lrig.desk.remove_card(0)
    lrig.desk.insert_card(0)
    lrig.start_agent()
    lrig.wait_synced(timeout=5)
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
    time.sleep(0.3)
    assert not pb.done()
    t_kill = time.monotonic()
    lrig.kill_agent(signal.SIGKILL)
    r = _assert_prompt(pb, t_kill, "the waiting BeginTransaction", limit=1.5)
    assert r["rv"] != OK, r
    lrig.start_agent()
    lrig.wait_synced(timeout=5)
    c = lrig.session("shim", name="C")
    c.call("establish")
    assert c.rv("connect", reader=r0) == OK
    pc = c.start("begin")
    assert pc.result(2)["rv"] == OK, "a new BeginTransaction waited after the desk came back"
    assert c.call("transmit", apdu=GET_CHALLENGE)["rv"] == OK
    assert c.rv("end") == OK


def test_shim_started_before_the_agent(make_rig):
    rig = make_rig(slots=2, cards=({"slot": 0},), start_agent=False, name="late")
    s = rig.session("shim")
    assert s.rv("establish") == OK
    assert s.call("list")["rv"] == RV["E_NO_READERS_AVAILABLE"]
    assert s.call("connect", reader=rig.desk.readers[0])["rv"] == RV["E_UNKNOWN_READER"]
    assert not rig.status()["desk"]["connected"]
    time.sleep(1.0)  # let the shim's reconnect back-off grow
    t0 = time.monotonic()
    rig.start_agent()
    rig.wait_synced(timeout=5)
    assert time.monotonic() - t0 < 3.0, "readers appeared more than 3 s after the agent started"
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
    time.sleep(0.2)
    try:
        lrig.desk.restart()
    except HarnessError as exc:  # harness race: "daemon ready" logged before the socket exists
        if "ready but does not serve" not in str(exc):
            raise
        lrig.desk._start_pcscd()
        lrig.desk.insert_card(0)
    r = pnp.result(5)
    assert r["rv"] == OK and r["states"][0][1] & S_CHANGED
    lrig.wait_synced(timeout=10)
    assert lrig.agent.alive() and lrig.shim.alive()
    assert s.call("transmit", apdu=GET_CHALLENGE)["rv"] != OK  # the old handle died with that pcscd
    fresh = lrig.session("shim", name="fresh")
    fresh.call("establish")
    results = {"new program: connect": fresh.rv("connect", reader=r0),
               "new program: transmit": fresh.call("transmit", apdu=GET_CHALLENGE)["rv"],
               "running program, same context: connect": s.rv("connect", reader=r0, h="new"),
               "running program, same context: transmit": s.call("transmit", h="new", apdu=GET_CHALLENGE)["rv"]}
    assert results == {k: OK for k in results}, results
