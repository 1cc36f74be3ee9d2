"""Sharing modes and transactions: exclusive/shared connects, SCARD_E_SHARING_VIOLATION,
BeginTransaction waiting for another context's EndTransaction, resets by dispositions, a
transaction holder that dies. Each scenario runs on the desk's pcscd and through the shim with
separate processes as the competing programs, and the results are compared.

Shared rig: slot 0 card (T=1)."""
from __future__ import annotations

import time

import pytest

from core_support import GET_CHALLENGE, OK, RV, compare, strip_times

NO_BLOCKING = {"PCSCLITE_NO_BLOCKING": "1"}  # libpcsclite then returns SHARING_VIOLATION instead of retrying


def _pair(rig, target, env=None):
    a = rig.session(target, name=f"{target}-A", env=env)
    b = rig.session(target, name=f"{target}-B", env=env)
    for s in (a, b):
        assert s.rv("establish") == OK
    return a, b


def _close(*ss):
    for s in ss:
        s.close()


@pytest.mark.parametrize("first,second", [
    ("shared", "shared"), ("shared", "exclusive"), ("exclusive", "shared"), ("exclusive", "exclusive"),
    ("exclusive", "direct"), ("direct", "exclusive")])
def test_share_mode_matrix(rig, first, second):
    r0 = rig.desk.readers[0]
    res = {}
    for t in ("desk", "shim"):
        rig.warm()
        a, b = _pair(rig, t)
        try:
            ca = a.call("connect", reader=r0, share=first, protocols=0 if first == "direct" else 3)
            cb = b.call("connect", reader=r0, share=second, protocols=0 if second == "direct" else 3)
            tb = b.call("transmit", apdu=GET_CHALLENGE) if cb["rv"] == OK and second != "direct" else None
            res[t] = strip_times({"a": ca, "b": cb, "b_transmit": tb and {"rv": tb["rv"], "sw": tb["sw"]}})
            for s in (a, b):
                s.call("disconnect")
        finally:
            _close(a, b)
    compare(res, f"{first} connect, then {second} connect from another process")
    if "exclusive" in (first, second) and "direct" not in (first, second):
        assert res["shim"]["b"]["rv"] == RV["E_SHARING_VIOLATION"]


@pytest.mark.parametrize("holder_t,contender_t", [("shim", "desk"), ("desk", "shim")])
def test_exclusive_across_shim_and_desk(rig, holder_t, contender_t):
    """An exclusive connection through the shim is a real one at the desk, and the other way
    round."""
    r0 = rig.desk.readers[0]
    holder, contender = rig.session(holder_t), rig.session(contender_t)
    try:
        for s in (holder, contender):
            s.call("establish")
        assert holder.rv("connect", reader=r0, share="exclusive") == OK
        assert contender.rv("connect", reader=r0) == RV["E_SHARING_VIOLATION"]
        assert contender.rv("connect", reader=r0, share="exclusive") == RV["E_SHARING_VIOLATION"]
        assert holder.rv("disconnect") == OK
        deadline = time.monotonic() + 1.0  # the shim may complete its desk-side disconnect later
        while contender.rv("connect", reader=r0, share="exclusive") != OK:
            assert time.monotonic() < deadline, "the reader stayed exclusive after the disconnect"
            time.sleep(0.02)
        assert contender.rv("disconnect") == OK
    finally:
        _close(holder, contender)


def batch_rv_counts(rig, steps, timeout: float) -> dict:
    """Runs |steps| as one batch on the desk's pcscd and on the shim; per target, how many
    times each op returned each rv ("connect 0x00000000": 200, ...)."""
    res = {}
    for t in ("desk", "shim"):
        s = rig.session(t)
        try:
            out = s.call("batch", steps=steps, timeout=timeout)["results"]
        finally:
            s.close()
        counts = {}
        for r in out:
            counts[f"{r['op']} {r['rv']}"] = counts.get(f"{r['op']} {r['rv']}", 0) + 1
        res[t] = counts
    return res

def test_exclusive_reconnected_at_once_by_another_context(rig):
    """Program A disconnects its exclusive handle; at once program B (another context) connects
    exclusively. On pcscd B always succeeds: A's Disconnect has returned. 200 rounds, in one
    process so nothing but the two calls lies between them."""
    r0 = rig.desk.readers[0]
    steps = [{"op": "establish", "ctx": "a"}, {"op": "establish", "ctx": "b"}]
    for i in range(200):
        steps += [{"op": "connect", "ctx": "a", "reader": r0, "share": "exclusive", "h": "a"},
                  {"op": "disconnect", "h": "a"},
                  {"op": "connect", "ctx": "b", "reader": r0, "share": "exclusive", "h": "b"},
                  {"op": "disconnect", "h": "b"}]
    compare(batch_rv_counts(rig, steps, timeout=30),
            "exclusive connect by B right after A's exclusive handle was disconnected (200 rounds; counts of op/rv)")


def test_disconnect_with_reset_then_another_context_connects(rig):
    """Program A disconnects with SCARD_RESET_CARD; then program B (another context) connects
    and transmits. On pcscd B's new handle never sees that reset: it came after A's Disconnect
    returned. 100 rounds in one process."""
    r0 = rig.desk.readers[0]
    steps = [{"op": "establish", "ctx": "a"}, {"op": "establish", "ctx": "b"}]
    for i in range(100):
        steps += [{"op": "connect", "ctx": "a", "reader": r0, "h": "a"},
                  {"op": "disconnect", "h": "a", "disp": "reset"},
                  {"op": "connect", "ctx": "b", "reader": r0, "h": "b"},
                  {"op": "transmit", "h": "b", "apdu": GET_CHALLENGE},
                  {"op": "disconnect", "h": "b"}]
    compare(batch_rv_counts(rig, steps, timeout=60),
            "B connects and transmits right after A's Disconnect(RESET) (100 rounds; counts of op/rv)")


def test_begin_transaction_waits_for_end_transaction(rig):
    """A holds a transaction; B's BeginTransaction (another process) waits, A keeps using the
    card, and B gets the transaction as soon as A ends it."""
    r0 = rig.desk.readers[0]
    res = {}
    for t in ("desk", "shim"):
        rig.warm()
        a, b = _pair(rig, t)
        try:
            assert a.rv("connect", reader=r0) == OK and b.rv("connect", reader=r0) == OK
            assert a.rv("begin") == OK
            pb = b.start("begin")
            time.sleep(0.5)  # the bound being tested: B must still be waiting
            waited = not pb.done()
            ta = a.call("transmit", apdu=GET_CHALLENGE)
            end = a.call("end")
            rb = pb.result(5)
            res[t] = {"b_waited": waited, "a_transmit": ta["rv"], "a_end": end["rv"], "b_begin": rb["rv"],
                      "b_after_end_ok": rb["t1"] >= end["t0"]}
            lag = rb["t1"] - end["t1"]
            assert lag < 1.0, f"{t}: B got the transaction {lag:.2f}s after A's EndTransaction"
            tb = b.call("transmit", apdu=GET_CHALLENGE)
            res[t]["b_transmit"] = tb["rv"]
            res[t]["b_end"] = b.rv("end")
        finally:
            _close(a, b)
    compare(res, "BeginTransaction while another context holds the transaction")
    assert res["shim"] == {"b_waited": True, "a_transmit": OK, "a_end": OK, "b_begin": OK,
                           "b_after_end_ok": True, "b_transmit": OK, "b_end": OK}


@pytest.mark.parametrize("op", ["transmit", "status", "connect", "reconnect"])
def test_calls_wait_while_another_context_holds_the_transaction(rig, op):
    """While A holds a transaction, B's Transmit/Status/Reconnect (libpcsclite retries on
    SHARING_VIOLATION) and Connect (pcscd blocks) wait until A's EndTransaction."""
    r0 = rig.desk.readers[0]
    res = {}
    for t in ("desk", "shim"):
        rig.warm()
        a, b = _pair(rig, t)
        try:
            assert a.rv("connect", reader=r0) == OK
            if op != "connect":
                assert b.rv("connect", reader=r0) == OK
            assert a.rv("begin") == OK
            args = {"transmit": dict(apdu=GET_CHALLENGE), "status": {}, "connect": dict(reader=r0, h="h2"),
                    "reconnect": dict(init="leave")}[op]
            pb = b.start(op, **args)
            time.sleep(0.5)
            waited = not pb.done()
            end = a.call("end")
            rb = pb.result(5)
            res[t] = {"waited": waited, "end": end["rv"], "b": rb["rv"]}
            assert rb["t1"] - end["t1"] < 1.0, f"{t}: {op} returned {rb['t1'] - end['t1']:.2f}s after the End"
        finally:
            _close(a, b)
    compare(res, f"{op} from B while A holds a transaction")
    assert res["shim"]["waited"] and res["shim"]["b"] == OK


@pytest.mark.parametrize("op", ["transmit", "status", "reconnect", "getattrib"])
def test_sharing_violation_without_blocking(rig, op):
    """With PCSCLITE_NO_BLOCKING libpcsclite returns what the daemon answers while another
    context holds the transaction (no retry loop)."""
    r0 = rig.desk.readers[0]
    res = {}
    for t in ("desk", "shim"):
        rig.warm()
        a, b = _pair(rig, t, env=NO_BLOCKING)
        try:
            assert a.rv("connect", reader=r0) == OK and b.rv("connect", reader=r0) == OK
            assert a.rv("begin") == OK
            args = {"transmit": dict(apdu=GET_CHALLENGE), "status": {}, "reconnect": dict(init="leave"),
                    "getattrib": dict(attr=0x00090303)}[op]
            during = b.call(op, **args)["rv"]
            a.call("end")
            after = b.call(op, **args)["rv"]
            res[t] = {"during": during, "after": after}
        finally:
            _close(a, b)
    compare(res, f"{op} from B during / after A's transaction (PCSCLITE_NO_BLOCKING)")


def _outcome(p, wait=0.5):
    """The rv of a started call, or "blocked" if it has not returned after `wait` s."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not p.done():
        time.sleep(0.01)
    return p.result(0.1)["rv"] if p.done() else "blocked"


def _strict_shim(rig):
    """A shim with deferred BeginTransaction switched off (docs/performance.md): every Begin
    reaches the desk's pcscd before it is answered."""
    _proc, sock = rig.start_extra_shim("strict", "--disable", "defer-begin")
    return sock


def test_begin_by_desk_program_while_shim_program_holds_transaction(rig):
    """A program on the server side holds a transaction; a program at the desk itself (not
    through CardBridge) calls BeginTransaction. With --disable defer-begin the pcscd semantics
    hold exactly: the desk program waits until the server program's EndTransaction."""
    r0 = rig.desk.readers[0]
    a, d = rig.session(_strict_shim(rig), name="shim-A"), rig.session("desk", name="desk-D")
    try:
        for s in (a, d):
            s.call("establish")
        assert a.rv("connect", reader=r0) == OK and d.rv("connect", reader=r0) == OK
        begin_a = a.rv("begin")
        pd = d.start("begin")
        d_begin = _outcome(pd)
        a_transmit = a.rv("transmit", apdu=GET_CHALLENGE)
        end_a = a.call("end")
        d_begin_late = pd.result(5)
        d.call("end")
        assert (begin_a, d_begin, a_transmit, end_a["rv"]) == (OK, "blocked", OK, OK)
        assert d_begin_late["rv"] == OK and d_begin_late["t1"] - end_a["t1"] < 1.0
    finally:
        _close(a, d)


def test_begin_by_shim_program_while_desk_program_holds_transaction(rig):
    """The other way round, with --disable defer-begin: the server program's BeginTransaction
    waits until the desk program's EndTransaction (pcscd semantics)."""
    r0 = rig.desk.readers[0]
    a, d = rig.session(_strict_shim(rig), name="shim-A"), rig.session("desk", name="desk-D")
    try:
        for s in (a, d):
            s.call("establish")
        assert a.rv("connect", reader=r0) == OK and d.rv("connect", reader=r0) == OK
        assert d.rv("begin") == OK
        pa = a.start("begin")
        a_begin = _outcome(pa)
        end = d.call("end")
        ra = pa.result(5)
        a.call("end")
        assert a_begin == "blocked"
        assert ra["rv"] == OK and ra["t1"] - end["t1"] < 1.0
    finally:
        _close(a, d)


def test_deferred_begin_starts_the_transaction_at_the_first_card_operation(rig):
    """Default mode (defer-begin on), documented in docs/performance.md: against a program at
    the desk itself, the server program's transaction starts at the desk with its first card
    operation. Its BeginTransaction returns at once; that first Transmit waits for the desk
    program's EndTransaction and then runs inside the server program's transaction (the desk
    program's next Begin waits for the server program's End). Programs of the session among
    themselves keep pcscd's exact semantics (test_begin_transaction_waits_for_end_transaction)."""
    r0 = rig.desk.readers[0]
    a, d = rig.session("shim", name="shim-A"), rig.session("desk", name="desk-D")
    try:
        for s in (a, d):
            s.call("establish")
        assert a.rv("connect", reader=r0) == OK and d.rv("connect", reader=r0) == OK
        assert d.rv("begin") == OK
        assert a.rv("begin") == OK  # answered by the shim
        pt = a.start("transmit", apdu=GET_CHALLENGE)
        assert _outcome(pt) == "blocked"  # the desk program still holds the card
        end_d = d.call("end")
        rt = pt.result(5)
        assert rt["rv"] == OK and rt["t1"] - end_d["t1"] < 1.0
        pd = d.start("begin")
        assert _outcome(pd) == "blocked"  # now the server program holds it at the desk
        end_a = a.call("end")
        rd = pd.result(5)
        d.call("end")
        assert end_a["rv"] == OK and rd["rv"] == OK and rd["t1"] - end_a["t1"] < 1.0
    finally:
        _close(a, d)


@pytest.mark.parametrize("share", ["shared", "exclusive"])
def test_nested_and_extra_end_transaction(rig, share):
    r0 = rig.desk.readers[0]
    res = {}
    for t in ("desk", "shim"):
        rig.warm()
        s = rig.session(t)
        try:
            s.call("establish")
            assert s.rv("connect", reader=r0, share=share) == OK
            seq = [s.rv("begin"), s.rv("begin"), s.call("transmit", apdu=GET_CHALLENGE)["rv"], s.rv("end"),
                   s.call("transmit", apdu=GET_CHALLENGE)["rv"], s.rv("end"), s.rv("end"),
                   s.call("transmit", apdu=GET_CHALLENGE)["rv"], s.rv("disconnect")]
            res[t] = seq
        finally:
            s.close()
    compare(res, f"nested Begin/End and an extra End ({share})")


@pytest.mark.parametrize("how", ["end_reset", "disconnect_reset", "reconnect_reset", "end_unpower"])
def test_reset_by_one_handle_seen_by_the_others(rig, how):
    """A resets the card (EndTransaction/Disconnect/Reconnect with RESET or UNPOWER): pcscd
    reports SCARD_W_RESET_CARD to the other handles (and for End also to A) until they
    reconnect."""
    r0 = rig.desk.readers[0]
    res = {}
    for t in ("desk", "shim"):
        rig.warm()
        a, b = _pair(rig, t)
        try:
            assert a.rv("connect", reader=r0) == OK and b.rv("connect", reader=r0) == OK
            out = {}
            if how.startswith("end"):
                out["begin"] = a.rv("begin")
                out["a_transmit"] = a.call("transmit", apdu=GET_CHALLENGE)["rv"]
                out["reset"] = a.rv("end", disp="reset" if how == "end_reset" else "unpower")
                out["a_after"] = a.call("transmit", apdu=GET_CHALLENGE)["rv"]
            elif how == "disconnect_reset":
                out["reset"] = a.rv("disconnect", disp="reset")
            else:
                out["reset"] = a.call("reconnect", init="reset")["rv"]
                out["a_after"] = a.call("transmit", apdu=GET_CHALLENGE)["rv"]
            out["b_transmit"] = b.call("transmit", apdu=GET_CHALLENGE)["rv"]
            out["b_status"] = b.call("status")["rv"]
            out["b_begin"] = b.rv("begin")
            out["b_transmit_again"] = b.call("transmit", apdu=GET_CHALLENGE)["rv"]
            out["b_reconnect"] = b.call("reconnect", init="leave")["rv"]
            out["b_transmit_after_reconnect"] = b.call("transmit", apdu=GET_CHALLENGE)["rv"]
            res[t] = out
        finally:
            _close(a, b)
    compare(res, f"card reset by another handle ({how})")
    assert res["shim"]["b_transmit"] == RV["W_RESET_CARD"]
    assert res["shim"]["b_transmit_after_reconnect"] == OK


@pytest.mark.parametrize("share", ["shared", "exclusive"])
def test_reconnect_share_mode_changes(rig, share):
    """Reconnect shared->exclusive with another handle present: SHARING_VIOLATION (returned at
    once with PCSCLITE_NO_BLOCKING); alone: success, and then another program's Connect is
    refused or waits exactly as pcscd does; back to shared lets it in."""
    r0 = rig.desk.readers[0]
    res = {}
    for t in ("desk", "shim"):
        rig.warm()
        a, b = _pair(rig, t, env=NO_BLOCKING)
        try:
            out = {"a_connect": a.rv("connect", reader=r0), "b_connect": b.rv("connect", reader=r0)}
            out["a_to_exclusive_while_b"] = a.call("reconnect", share="exclusive")["rv"]
            out["b_disconnect"] = b.rv("disconnect")
            out["a_to_exclusive_alone"] = a.call("reconnect", share="exclusive")["rv"]
            pb = b.start("connect", reader=r0, share=share)
            out["b_connect_while_a_exclusive"] = _outcome(pb)
            out["a_to_shared"] = _outcome(a.start("reconnect", share="shared"), 2.0)
            if out["b_connect_while_a_exclusive"] == "blocked":
                out["b_connect_late"] = _outcome(pb, 2.0)
            else:
                # (pcscd 1.9.9 keeps the lock an exclusive Reconnect took after going back to
                # shared, so this one waits until A disconnects)
                pb = b.start("connect", reader=r0, share=share)
                out["b_connect_again"] = _outcome(pb)
            out["a_disconnect"] = a.rv("disconnect")
            out["b_connect_final"] = pb.result(5)["rv"]
            res[t] = out
            b.call("disconnect")
        finally:
            _close(a, b)
    compare(res, f"Reconnect share-mode changes (contender {share})")


@pytest.mark.parametrize("how", ["killed", "release_context"])
def test_transaction_holder_goes_away(rig, how):
    """The program holding the transaction dies (SIGKILL) or releases its context: the waiting
    program gets the card promptly, and sees what pcscd reports after its clean-up (pcscd resets
    the card when the dead client held the transaction)."""
    r0 = rig.desk.readers[0]
    res = {}
    for t in ("desk", "shim"):
        rig.warm()
        a, b = _pair(rig, t)
        try:
            assert a.rv("connect", reader=r0) == OK and b.rv("connect", reader=r0) == OK
            assert a.rv("begin") == OK
            pb = b.start("begin")
            time.sleep(0.3)
            assert not pb.done(), f"{t}: BeginTransaction did not wait"
            t_gone = time.monotonic()
            if how == "killed":
                a.kill()
            else:
                assert a.rv("release") == OK
            rb = pb.result(5)
            lag = rb["t1"] - t_gone
            assert lag < 1.5, f"{t}: waiting BeginTransaction returned {lag:.2f}s after the holder went away"
            res[t] = {"b_begin": rb["rv"], "b_transmit": b.call("transmit", apdu=GET_CHALLENGE)["rv"],
                      "b_end": b.rv("end"), "b_reconnect": b.call("reconnect", init="leave")["rv"],
                      "b_transmit2": b.call("transmit", apdu=GET_CHALLENGE)["rv"]}
        finally:
            _close(a, b)
    compare(res, f"transaction holder {how} while another context waits in BeginTransaction")
