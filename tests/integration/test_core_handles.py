"""Handles and contexts: bogus, stale and foreign values give what pcscd gives; one client's
handles are unusable from another connection; handle values are unique.

Shared rig: slot 0 card."""
from __future__ import annotations

import pytest

from core_support import CMD, GET_CHALLENGE, HANG_GUARD_S, OK, RV, WireClient, compare, log_lines, wait_until

BOGUS = 0x12345678
HANDLE_OPS = [("transmit", dict(apdu=GET_CHALLENGE)), ("status", {}), ("begin", {}), ("end", {}),
              ("reconnect", {}), ("getattrib", dict(attr=0x00090303)), ("control", dict(code=0x42000D48)),
              ("disconnect", {})]


def _handle_ops(s, **target):
    return {op: s.call(op, **kw, **target)["rv"] for op, kw in HANDLE_OPS}


def test_bogus_handle(rig, both):
    res = {}
    for t, s in both().items():
        s.call("establish")
        assert s.rv("connect", reader=rig.desk.readers[0]) == OK  # a real handle exists too
        res[t] = _handle_ops(s, hraw=BOGUS)
        res[t]["real_handle_still_works"] = s.call("transmit", apdu=GET_CHALLENGE)["rv"]
    compare(res, f"calls with the bogus handle 0x{BOGUS:08X}")
    assert all(v == RV["E_INVALID_HANDLE"] for k, v in res["shim"].items() if k != "real_handle_still_works")


def test_disconnected_handle(rig, both):
    res = {}
    for t, s in both().items():
        s.call("establish")
        assert s.rv("connect", reader=rig.desk.readers[0]) == OK
        assert s.rv("disconnect") == OK
        res[t] = _handle_ops(s)
    compare(res, "calls on a disconnected handle")
    assert res["shim"]["transmit"] == RV["E_INVALID_HANDLE"]


def test_released_context_and_its_handles(rig, both):
    r0 = rig.desk.readers[0]
    res = {}
    for t, s in both().items():
        s.call("establish", ctx="a")
        s.call("establish", ctx="b")
        assert s.rv("connect", ctx="a", reader=r0, h="ha") == OK
        assert s.rv("connect", ctx="b", reader=r0, h="hb") == OK
        assert s.rv("release", ctx="a") == OK
        res[t] = {
            "isvalid": s.rv("isvalid", ctx="a"),
            "list": s.rv("list", ctx="a"),
            "gsc": s.rv("gsc", ctx="a", readers=[[r0, 0]], ms=0),
            "connect": s.rv("connect", ctx="a", reader=r0, h="x"),
            "cancel": s.rv("cancel", ctx="a"),
            "release_again": s.rv("release", ctx="a"),
            "handle_of_released_context": _handle_ops(s, h="ha"),
            "other_context_handle": s.call("transmit", h="hb", apdu=GET_CHALLENGE)["rv"],
        }
    compare(res, "calls on a released context and on its handles")
    assert res["shim"]["list"] == RV["E_INVALID_HANDLE"]
    assert res["shim"]["other_context_handle"] == OK


def test_bogus_context(rig, both):
    res = {}
    for t, s in both().items():
        s.call("establish")
        res[t] = {op: s.rv(op, craw=BOGUS, **kw) for op, kw in
                  [("isvalid", {}), ("list", {}), ("gsc", dict(readers=[[rig.desk.readers[0], 0]], ms=0)),
                   ("connect", dict(reader=rig.desk.readers[0], h="x")), ("cancel", {}), ("release", {})]}
    compare(res, f"calls with the bogus context 0x{BOGUS:08X}")


def test_handles_and_contexts_unique_and_nonzero(rig):
    """Three processes, two contexts each, three handles per context."""
    r0 = rig.desk.readers[0]
    ctxs, cards = [], []
    sessions = [rig.session("shim", name=f"shim-{i}") for i in range(3)]
    try:
        for i, s in enumerate(sessions):
            for c in ("a", "b"):
                ctxs.append(s.call("establish", ctx=c)["value"])
                for k in range(3):
                    r = s.call("connect", ctx=c, reader=r0, h=f"{c}{k}")
                    assert r["rv"] == OK
                    cards.append(r["value"])
        assert len(set(ctxs)) == len(ctxs) and 0 not in ctxs, ctxs
        assert len(set(cards)) == len(cards) and 0 not in cards, cards
        assert all(0 < v <= 0x7FFFFFFF for v in ctxs + cards)
        # each handle is its own: transmit on all of them
        for s in sessions:
            for c in ("a", "b"):
                for k in range(3):
                    assert s.call("transmit", h=f"{c}{k}", apdu=GET_CHALLENGE)["rv"] == OK
    finally:
        for s in sessions:
            s.close()


def _owner(rig, t):
    owner = WireClient(rig.sock(t)).open()
    card, proto, rv = owner.connect(rig.desk.readers[0])
    assert rv == 0, f"{t}: connect 0x{rv:08X}"
    return owner, card, proto


@pytest.mark.parametrize("op", ["TRANSMIT", "DISCONNECT"])
def test_foreign_handle_on_the_wire_same_as_desk(rig, op):
    """Connection B sends a request with connection A's card handle (libpcsclite never does;
    a hostile client can): pcscd closes B's connection (after a 2 s pause); A's handle is
    untouched."""
    res = {}
    for t in ("desk", "shim"):
        owner, card, proto = _owner(rig, t)
        with owner, WireClient(rig.sock(t)) as intruder:
            intruder.open()
            if op == "TRANSMIT":
                intruder.transmit_request(card, bytes.fromhex(GET_CHALLENGE), proto=proto)
            else:
                intruder.request(CMD["DISCONNECT"], card.to_bytes(4, "little", signed=True)
                                 + b"\0" * 8)
            closed = intruder.closed_by_peer(HANG_GUARD_S)
            after = owner.transmit(card, bytes.fromhex(GET_CHALLENGE), proto=proto)
            res[t] = {"intruder_closed": closed, "owner_transmit": after["rv"], "owner_len": after["recv_length"]}
    compare(res, f"{op} with another connection's handle")
    assert res["shim"] == {"intruder_closed": True, "owner_transmit": OK, "owner_len": 10}


@pytest.mark.parametrize("op", ["STATUS", "BEGIN", "END", "RECONNECT", "CONTROL", "GET_ATTRIB", "SET_ATTRIB"])
def test_foreign_handle_on_the_wire_closes_the_intruder(rig, op):
    """The same for the other handle-based requests, on the shim only (pcscd's answer, a closed
    connection, is the same for all of them and takes 2 s each)."""
    owner, card, proto = _owner(rig, "shim")
    before = len(log_lines(rig.shim_log(), "does not own"))
    bodies = {
        "STATUS": card.to_bytes(4, "little", signed=True) + b"\0" * 4,
        "BEGIN": card.to_bytes(4, "little", signed=True) + b"\0" * 4,
        "END": card.to_bytes(4, "little", signed=True) + b"\0" * 8,
        "RECONNECT": card.to_bytes(4, "little", signed=True) + (2).to_bytes(4, "little") + (3).to_bytes(4, "little")
        + b"\0" * 12,
        "CONTROL": card.to_bytes(4, "little", signed=True) + (0x42000D48).to_bytes(4, "little") + b"\0" * 4
        + (100).to_bytes(4, "little") + b"\0" * 8,
        "GET_ATTRIB": card.to_bytes(4, "little", signed=True) + (0x00090303).to_bytes(4, "little") + b"\0" * 264
        + (264).to_bytes(4, "little") + b"\0" * 4,
        "SET_ATTRIB": card.to_bytes(4, "little", signed=True) + (0x00090303).to_bytes(4, "little") + b"\1" * 264
        + (1).to_bytes(4, "little") + b"\0" * 4,
    }
    with owner, WireClient(rig.sock("shim")) as intruder:
        intruder.open()
        intruder.request(CMD[op], bodies[op])
        assert intruder.closed_by_peer(HANG_GUARD_S), f"the shim kept the connection that used a foreign handle ({op})"
        assert owner.transmit(card, bytes.fromhex(GET_CHALLENGE), proto=proto)["rv"] == OK
        assert owner.status(card) == 0
    wait_until(lambda: len(log_lines(rig.shim_log(), "does not own")) > before, timeout=HANG_GUARD_S,
               desc="a log line about the foreign handle")


def test_wrong_context_on_the_wire(rig):
    """CONNECT / RELEASE naming a context that is not this connection's."""
    res = {}
    for t in ("desk", "shim"):
        with WireClient(rig.sock(t)) as a, WireClient(rig.sock(t)) as b:
            a.open()
            b.open()
            _, _, rv_connect = b.connect(rig.desk.readers[0], ctx=a.context)
            rv_release = b.release(a.context)
            still = a.readers_state() is not None and a.connect(rig.desk.readers[0])[2]
            res[t] = {"connect_with_other_context": f"0x{rv_connect:08X}",
                      "release_other_context": f"0x{rv_release:08X}", "owner_connect": f"0x{still:08X}"}
    compare(res, "requests naming another connection's context")
