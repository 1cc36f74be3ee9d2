"""Card removal (vicc stopped) and re-insertion, seen through the shim as on the desk's pcscd:
waiters wake, old handles fail with pcscd's errors, re-insertion reports the new ATR, Reconnect
with reset brings the handle back. How long a waiter takes to see the event is printed (the
benchmarks measure it), not asserted.

Each test gets its own rig (a desk with one card in slot 0), since it changes the card."""
from __future__ import annotations

import time

import pytest

from core_support import GATED_APDU, GET_CHALLENGE, OK, RV, S_CHANGED, compare, flags

NEW_ATR = "3B8F8001804F0CA0000003060300010000000069"


@pytest.fixture
def rrig(make_rig):
    return make_rig(slots=2, cards=({"slot": 0, "gate": True},), name="removal")


def _sessions(rig):
    ss = {t: rig.session(t) for t in ("desk", "shim")}
    for s in ss.values():
        assert s.rv("establish") == OK
    return ss


def _wait_all(ss, reader):
    """Starts an INFINITE GetStatusChange on reader in every session; returns the pendings."""
    out = {}
    for t, s in ss.items():
        r = s.call("gsc", readers=[[reader, 0]], ms=0)
        out[t] = (s.start("gsc", readers=[[reader, r["states"][0][1] & ~S_CHANGED]], ms=-1), r["states"][0][1])
    for t, (p, _) in out.items():
        p.wait_blocked("wait")
    return out


def test_removal_and_reinsertion_wake_waiters(rrig):
    r0 = rrig.desk.readers[0]
    ss = _sessions(rrig)
    waits = _wait_all(ss, r0)
    t_remove = time.monotonic()
    rrig.desk.remove_card(0, wait=False)
    res, lag = {}, {}
    for t, (p, before) in waits.items():
        r = p.result()
        ev = r["states"][0][1]
        lag[t] = r["t1"] - t_remove
        res[t] = {"rv": r["rv"], "flags": flags(ev), "counter": ev >> 16, "counter_step": (ev >> 16) - (before >> 16),
                  "atr": r["states"][0][2], "woke_after_the_removal": r["t1"] >= t_remove}
    compare(res, "GetStatusChange woken by the card's removal")
    assert res["shim"]["rv"] == OK and "EMPTY" in res["shim"]["flags"]
    print(f"removal seen {1000 * lag['shim']:.0f} ms after vicc was stopped through the shim, "
          f"{1000 * lag['desk']:.0f} ms at the desk")

    waits = _wait_all(ss, r0)
    t_insert = time.monotonic()
    rrig.desk.insert_card(0, atr=NEW_ATR, wait=False)
    res = {}
    for t, (p, before) in waits.items():
        r = p.result()
        ev = r["states"][0][1]
        lag[t] = r["t1"] - t_insert
        res[t] = {"rv": r["rv"], "flags": flags(ev), "counter": ev >> 16, "atr": r["states"][0][2],
                  "woke_after_the_insertion": r["t1"] >= t_insert}
    compare(res, "GetStatusChange woken by the card's insertion")
    assert res["shim"]["atr"] == NEW_ATR and "PRESENT" in res["shim"]["flags"]
    print(f"insertion seen {1000 * lag['shim']:.0f} ms after vicc started through the shim, "
          f"{1000 * lag['desk']:.0f} ms at the desk")


@pytest.mark.parametrize("tx_used", [True, False], ids=["transaction_used", "transaction_not_used_yet"])
def test_old_handle_after_removal_and_reinsertion(rrig, tx_used):
    """Calls on handles whose card was removed: pcscd's SCARD_W_REMOVED_CARD (or whatever it
    gives, per call), also after the card is back, until Reconnect (with reset) succeeds. One
    handle held a transaction when the card went (with or without a card command in it), which
    pcscd's removal clears. One round per target (a held transaction would make the other
    target's Connect wait). No call blocks on pcscd 1.9.9 here: one that hangs fails at the
    hang guard."""
    r0 = rrig.desk.readers[0]
    removed, back = {}, {}
    for t in ("desk", "shim"):
        s = rrig.session(t)
        assert s.rv("establish") == OK
        assert s.rv("connect", reader=r0) == OK
        assert s.rv("connect", reader=r0, h="tx") == OK
        assert s.rv("begin", h="tx") == OK
        if tx_used:
            assert s.call("transmit", h="tx", apdu=GET_CHALLENGE)["rv"] == OK
        rrig.desk.remove_card(0)
        rrig.wait_synced()

        def rv(op, **kw):
            return s.call(op, **kw)["rv"]

        removed[t] = {
            "transmit": rv("transmit", apdu=GET_CHALLENGE),
            "status": rv("status"),
            "begin": rv("begin"),
            "end": rv("end"),
            "transmit_in_removed_transaction": rv("transmit", h="tx", apdu=GET_CHALLENGE),
            "end_of_removed_transaction": rv("end", h="tx"),
            "getattrib": rv("getattrib", attr=0x00090303),
            "control": rv("control", code=0x42000D48),
            "reconnect_leave": rv("reconnect", init="leave"),
            "transmit_again": rv("transmit", apdu=GET_CHALLENGE),
            "new_connect": rv("connect", reader=r0, h="new"),
        }
        rrig.desk.insert_card(0, gate=True)
        rrig.wait_synced()
        out = {"transmit_old": s.call("transmit", apdu=GET_CHALLENGE)["rv"],
               "status_old": s.call("status")["rv"]}
        rc = s.call("reconnect", init="reset")
        out["reconnect_reset"] = [rc["rv"], rc["protocol"]]
        tr = s.call("transmit", apdu=GET_CHALLENGE)
        out["transmit_after_reconnect"] = [tr["rv"], tr["sw"], len(tr["data"]) // 2]
        st = s.call("status")
        out["status_after_reconnect"] = [st["rv"], st.get("atr")]
        out["tx_begin"] = s.rv("begin", h="tx")
        out["disconnect_tx"] = s.rv("disconnect", h="tx")
        out["disconnect"] = s.rv("disconnect")
        back[t] = out
        s.close()
    compare(removed, "calls on old handles after the card was removed")
    compare(back, "the old handles after the card came back")
    assert removed["shim"]["transmit"] == RV["W_REMOVED_CARD"]
    assert back["shim"]["transmit_after_reconnect"] == [OK, "9000", 8]


def test_waiting_begin_released_by_removal(rrig):
    """A transaction holder's card is removed: pcscd clears the lock, so another handle's
    waiting BeginTransaction returns (with pcscd's value) instead of waiting for ever."""
    r0 = rrig.desk.readers[0]
    res = {}
    for t in ("desk", "shim"):
        a, b = rrig.session(t, name=f"{t}-A"), rrig.session(t, name=f"{t}-B")
        for s in (a, b):
            s.call("establish")
            assert s.rv("connect", reader=r0) == OK
        assert a.rv("begin") == OK
        p = b.start("begin")
        p.wait_blocked("retry")  # SHARING_VIOLATION: B waits for A's transaction
        t_remove = time.monotonic()
        rrig.desk.remove_card(0, wait=False)
        r = p.result()
        print(f"{t}: the waiting Begin returned {1000 * (r['t1'] - t_remove):.0f} ms after vicc was stopped")
        res[t] = {"b_begin": r["rv"], "b_returned_after_the_removal": r["t1"] >= t_remove,
                  "a_transmit": a.call("transmit", apdu=GET_CHALLENGE)["rv"],
                  "a_end": a.rv("end"), "b_end": b.rv("end")}
        a.close()
        b.close()
        rrig.desk.remove_card(0)
        rrig.desk.insert_card(0, gate=True)
        rrig.wait_synced()
    compare(res, "waiting BeginTransaction when the holder's card is removed")


def test_transmit_in_flight_when_card_removed(rrig):
    """A gated APDU is held at the card (the harness's slow card): the transmit is in flight at
    the card when the card is pulled. Whatever pcscd returns then, the shim must return too."""
    r0 = rrig.desk.readers[0]
    res = {}
    for t in ("desk", "shim"):
        s = rrig.session(t)
        s.call("establish")
        assert s.rv("connect", reader=r0) == OK
        p = s.start("transmit", apdu=GATED_APDU)
        rrig.desk.gate(0).wait_held(1)  # the APDU is at the card, unanswered
        assert not p.done(), f"{t}: the transmit returned while the card held the APDU: {p.result()}"
        t_remove = time.monotonic()
        rrig.desk.remove_card(0, wait=False)
        r = p.result()
        print(f"{t}: the transmit returned {1000 * (r['t1'] - t_remove):.0f} ms after vicc was stopped")
        rrig.desk.remove_card(0)  # (waits until pcscd reports the card absent)
        rrig.wait_synced()
        res[t] = {"rv": r["rv"], "resp": r["resp"], "returned_after_the_removal": r["t1"] >= t_remove,
                  "next": s.call("transmit", apdu=GET_CHALLENGE)["rv"]}
        s.close()
        rrig.desk.insert_card(0, gate=True)
        rrig.wait_synced()
    compare(res, "transmit in flight when the card is removed")
