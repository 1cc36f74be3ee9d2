"""SCardCancel and SCardGetStatusChange time-outs, through the shim and on the desk's pcscd.

A wait is cancelled once libpcsclite is seen waiting for the daemon's event (Pending.wait_blocked
("wait"): only then is the context cancellable; an SCardCancel before that returns success and
does nothing, in libpcsclite itself). How fast a wait wakes is printed, not asserted.

Shared rig: slot 0 card, slot 1 empty."""
from __future__ import annotations

import pytest

from core_support import OK, PNP, RV, S_CHANGED, WireClient, compare


def _current(s, reader, ctx="c"):
    """The reader's current event state (for a wait that must not return at once). The PnP
    pseudo-reader answers an UNAWARE query with SCARD_E_TIMEOUT on pcsc-lite 1.9.9: use 0."""
    r = s.call("gsc", ctx=ctx, readers=[[reader, 0]], ms=0)
    if reader == PNP and r["rv"] == RV["E_TIMEOUT"]:
        return 0
    assert r["rv"] == OK, r
    return r["states"][0][1] & ~S_CHANGED


@pytest.mark.parametrize("which", ["card_reader", "empty_reader", "pnp"])
def test_cancel_wakes_infinite_wait(rig, both, which):
    """SCardCancel from another thread wakes an INFINITE SCardGetStatusChange with
    SCARD_E_CANCELLED; the context stays usable."""
    reader = {"card_reader": rig.desk.readers[0], "empty_reader": rig.desk.readers[1], "pnp": PNP}[which]
    res = {}
    for t, s in both().items():
        s.call("establish")
        cur = _current(s, reader)
        p = s.start("gsc", readers=[[reader, cur]], ms=-1)
        p.wait_blocked("wait")
        c = s.call("cancel")
        r = p.result()
        assert r["t1"] >= c["t0"], f"{t}: the wait returned before SCardCancel was called: {r}"
        print(f"{t}: the wait ended {1000 * (r['t1'] - c['t0']):.1f} ms after SCardCancel was called")
        after = s.call("gsc", readers=[[reader, cur]], ms=0)
        res[t] = {"cancel": c["rv"], "wait": r["rv"], "next_wait": after["rv"], "list": s.call("list")["rv"]}
    compare(res, f"SCardCancel of an INFINITE wait on {which}")
    assert res["shim"] == {"cancel": OK, "wait": RV["E_CANCELLED"], "next_wait": RV["E_TIMEOUT"], "list": OK}


def test_cancel_with_cb_pcsc(rig):
    res = {}
    for t in ("desk", "shim"):
        r = rig.cb_pcsc(t, "cancel", "--reader", rig.desk.readers[0])
        print(f"{t}: cb-pcsc cancel: woke {r['wake_after_cancel_ms']:.1f} ms after the cancel that worked")
        res[t] = {k: r[k] for k in ("rv", "cancel_rv")}
    compare(res, "cb-pcsc cancel")
    assert res["shim"] == {"rv": RV["E_CANCELLED"], "cancel_rv": OK}


def test_cancel_wakes_only_its_own_context(rig, both):
    """Two contexts wait; cancelling one leaves the other waiting: B's wait ends only with B's
    own cancel, which comes after A's wait has returned."""
    r0 = rig.desk.readers[0]
    res = {}
    for t, s in both().items():
        s.call("establish", ctx="a")
        s.call("establish", ctx="b")
        cur = _current(s, r0, ctx="a")
        pa = s.start("gsc", ctx="a", readers=[[r0, cur]], ms=-1)
        pb = s.start("gsc", ctx="b", readers=[[r0, cur]], ms=-1)
        pa.wait_blocked("wait")
        pb.wait_blocked("wait")
        ca = s.call("cancel", ctx="a")
        ra = pa.result()
        b_waiting_after_a = not pb.done()  # A's wait has returned; B's must still be waiting
        cb = s.call("cancel", ctx="b")
        rb = pb.result()
        res[t] = {"cancel_a": ca["rv"], "a": ra["rv"], "b_waiting_after_a": b_waiting_after_a,
                  "cancel_b": cb["rv"], "b": rb["rv"], "b_woke_by_its_own_cancel": rb["t1"] >= cb["t0"]}
    compare(res, "cancel one of two waiting contexts")
    assert res["shim"] == {"cancel_a": OK, "a": RV["E_CANCELLED"], "b_waiting_after_a": True, "cancel_b": OK,
                           "b": RV["E_CANCELLED"], "b_woke_by_its_own_cancel": True}


def test_cancel_when_not_waiting(rig, both):
    res = {}
    for t, s in both().items():
        s.call("establish")
        res[t] = [s.call("cancel")["rv"], s.call("gsc", readers=[[rig.desk.readers[0], 0]], ms=0)["rv"]]
    compare(res, "SCardCancel with nothing to cancel")


def test_cancel_on_the_wire(rig):
    """SCARD_CANCEL as libpcsclite sends it (on a second connection) for a context that is not
    waiting, for an unknown context, and for a waiting one."""
    res = {}
    for t in ("desk", "shim"):
        with WireClient(rig.sock(t)) as target, WireClient(rig.sock(t)) as c1, WireClient(rig.sock(t)) as c2:
            target.open()
            not_waiting = c1.cancel(target.context)
            unknown = c2.cancel(0x12345)
            target.request(0x13)  # CMD_WAIT_READER_STATE_CHANGE: registers and returns the array
            target.recv_exact(16 * 184)
            with WireClient(rig.sock(t)) as c3:
                waiting = c3.cancel(target.context)
            signal = target.recv_exact(8)
            res[t] = {"not_waiting": f"0x{not_waiting:08X}", "unknown": f"0x{unknown:08X}",
                      "waiting": f"0x{waiting:08X}", "signal": signal.hex()}
    compare(res, "SCARD_CANCEL on the wire")


def test_timeout_zero_without_change(rig, both):
    r0, r1 = rig.desk.readers[0], rig.desk.readers[1]
    res = {}
    for t, s in both().items():
        s.call("establish")
        cur0, cur1 = _current(s, r0), _current(s, r1)
        r = s.call("gsc", readers=[[r0, cur0], [r1, cur1]], ms=0)
        res[t] = r["rv"]
    compare(res, "GetStatusChange(timeout 0) with no change")
    assert res["shim"] == RV["E_TIMEOUT"]


@pytest.mark.parametrize("ms", [100, 400])
def test_timeout_elapses(rig, both, ms):
    """A finite wait with no change returns SCARD_E_TIMEOUT, and not before the time asked for
    (libpcsclite counts that time itself: a lower bound no load can break; how much later it
    returns is printed, not asserted)."""
    r0 = rig.desk.readers[0]
    res = {}
    for t, s in both().items():
        s.call("establish")
        cur = _current(s, r0)
        r = s.call("gsc", readers=[[r0, cur]], ms=ms)
        took = r["t1"] - r["t0"]
        assert took >= ms / 1000 - 0.002, f"{t}: a {ms} ms wait returned after {took * 1000:.1f} ms"
        print(f"{t}: a {ms} ms wait took {took * 1000:.1f} ms")
        res[t] = r["rv"]
    compare(res, f"GetStatusChange({ms} ms) with no change")
    assert res["shim"] == RV["E_TIMEOUT"]


def test_wait_with_cb_pcsc(rig):
    """cb-pcsc wait: timeout 0 on the current state, and the PnP reader."""
    res = {}
    for t in ("desk", "shim"):
        st = rig.cb_pcsc(t, "wait", "--reader", rig.desk.readers[0], "--timeout-ms", "0")
        cur = st["event_state"] & ~S_CHANGED
        again = rig.cb_pcsc(t, "wait", "--reader", rig.desk.readers[0], "--timeout-ms", "0", "--current", str(cur))
        pnp = rig.cb_pcsc(t, "wait", "--reader", "pnp", "--timeout-ms", "0")
        res[t] = {"first": [st["rv"], st["event_state"], st["atr"]], "again": again["rv"], "pnp": pnp["rv"]}
    compare(res, "cb-pcsc wait")
