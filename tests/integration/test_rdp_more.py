"""More end to end over a real RDP channel (same rig as test_rdp_e2e.py): card removal and
insertion at the desk, the RDP client dying in the middle of a transaction (with a transfer in
flight at the card) and a new client taking over, and add-in options passed through FreeRDP's
syntax (reader filter).

Every fault pins the PC/SC code a local pcscd gives: a card removal is run side by side with a
program at the desk itself (on its pcscd) and both must see the same; the RDP client dying is
the desk's readers being unplugged (codes and pcsc-lite references in test_rdp_e2e.py)."""
from __future__ import annotations

import os
import signal
import time


from test_rdp_e2e import (ADDIN, CB_PCSC, CLIENT, GATED_APDU, GET_CHALLENGE, HANG_GUARD_S, LOST_IN_FLIGHT_RV, OK,  # noqa: F401
                          ORPHAN_RV, RV, STATUS_LOST_RV, PcscSession, Rig, _binaries, cb_pcsc, cert_dir, desk, rig,
                          transmit_ok, wait_until)

W_REMOVED_CARD = RV["W_REMOVED_CARD"]
E_UNKNOWN_READER = RV["E_UNKNOWN_READER"]
STATE_EMPTY, STATE_PRESENT = 0x10, 0x20
NO_BLOCKING = {"PCSCLITE_NO_BLOCKING": "1"}


def reader_state(sock: str, name: str) -> dict:
    return next(r for r in cb_pcsc(sock, "list")["readers"] if r["name"] == name)


def test_card_removal_and_insertion_over_rdp(rig, desk):
    """A program on the server and a program at the desk hold a handle on the card; the card is
    pulled and put back: both get the same answers (pcscd marks every handle of the reader
    REMOVED until it reconnects: SCARD_W_REMOVED_CARD, also after the new card is in)."""
    rig.start_client("desk-a")
    rig.wait_readers()
    r0 = desk.readers[0]
    progs = {"shim": rig.session(), "desk": rig.desk_session()}
    for t, s in progs.items():
        assert s.call("connect", reader=r0)["rv"] == OK, t
        transmit_ok(s, GET_CHALLENGE, f"{t}: before removal")
    t0 = time.monotonic()
    desk.remove_card(0)
    wait_until(lambda: reader_state(rig.shim_socket, r0)["state"] & STATE_EMPTY, timeout=HANG_GUARD_S,
               desc="the removal seen through RDP", details=rig.report)
    print(f"[{rig.mode}] removal seen on the server {time.monotonic() - t0:.2f}s after vicc stopped")
    removed = {t: s.call("transmit", apdu=GET_CHALLENGE)["rv"] for t, s in progs.items()}
    assert removed == {"desk": W_REMOVED_CARD, "shim": W_REMOVED_CARD}, removed

    desk.insert_card(0, test_ins=True, extended=True, gate=True)
    st = wait_until(lambda: (lambda s: s if s["state"] & STATE_PRESENT else None)(reader_state(rig.shim_socket, r0)),
                    timeout=HANG_GUARD_S, desc="the insertion seen through RDP", details=rig.report)
    assert st["atr"] == reader_state(desk.socket_path, r0)["atr"] != ""
    back = {t: s.call("transmit", apdu=GET_CHALLENGE)["rv"] for t, s in progs.items()}
    assert back == {"desk": W_REMOVED_CARD, "shim": W_REMOVED_CARD}, back  # until reconnected
    fresh = rig.session("fresh")
    assert fresh.call("connect", reader=r0)["rv"] == OK
    transmit_ok(fresh, GET_CHALLENGE, "after re-insertion")


def test_client_dies_mid_transaction_then_another_desk_takes_over(rig, desk):
    """A server program holds a transaction and has a card command in flight at the card (a
    gated APDU the card holds) when the RDP client is killed. The program's transfer fails with
    pcscd's code for a reader that goes away mid-transfer, its later calls with pcscd's codes for
    a handle of an unplugged reader (test_rdp_e2e.py); the desk's pcscd cleans up the dead
    FreeRDP process's lock holder as for any crashed client (winscard_svc.c@1.9.9
    MSGCleanupClient: the lock holder's card is reset, so the desk program that shared the card
    sees SCARD_W_RESET_CARD); after a new client connects a new program takes a transaction."""
    first = rig.start_client("desk-a")
    rig.wait_readers()
    r0 = desk.readers[0]
    # A desk program connected beforehand (pcscd 1.9.9 makes a Connect wait while another
    # handle holds a transaction, so it must be connected before the server program begins).
    # PCSCLITE_NO_BLOCKING: libpcsclite returns SHARING_VIOLATION instead of retrying.
    probe = rig.desk_session("desk-probe", env=NO_BLOCKING)
    assert probe.call("connect", reader=r0)["rv"] == OK
    holder = rig.session("holder")
    assert holder.call("connect", reader=r0)["rv"] == OK
    assert holder.rv("begin") == OK
    transmit_ok(holder, GET_CHALLENGE, "GET CHALLENGE in the transaction")  # the desk takes the lock
    # The lock is real at the desk: the desk program's Transmit gets SHARING_VIOLATION.
    assert probe.call("transmit", apdu=GET_CHALLENGE)["rv"] == RV["E_SHARING_VIOLATION"]

    gate = desk.gate(0)
    n = gate.held() + 1
    in_flight = holder.start("transmit", apdu=GATED_APDU)
    gate.wait_held(n)  # the APDU is at the card, unanswered: a transfer in flight
    t_kill = time.monotonic()
    first.send_signal(signal.SIGKILL)
    r = in_flight.result()
    print(f"[{rig.mode}] the transfer in flight failed {1000 * (r['t1'] - t_kill):.0f} ms after the client was killed")
    assert r["rv"] == LOST_IN_FLIGHT_RV, r
    wait_until(lambda: rig.shim_readers() == [], timeout=HANG_GUARD_S, desc="readers gone", details=rig.report)
    after = {"end": holder.rv("end"), "transmit": holder.call("transmit", apdu=GET_CHALLENGE)["rv"],
             "status": holder.call("status")["rv"]}
    assert after == {"end": ORPHAN_RV, "transmit": ORPHAN_RV, "status": STATUS_LOST_RV}, after

    # At the desk the dead client's context is still inside that transfer (pcscd holds the
    # reader while the card works): the lock is still held...
    assert probe.call("transmit", apdu=GET_CHALLENGE)["rv"] == RV["E_SHARING_VIOLATION"]
    # ...until the card answers; then pcscd cleans the dead client up: it releases the lock,
    # resets the card (marking the other handles RESET first) and drops the handle, which the
    # reader array's sharing count shows last (winscard.c@1.9.9 SCardDisconnect): the event
    # the test waits for (probe + the dead client's handle -> probe alone).
    gate.release(n)
    wait_until(lambda: desk.state(0).sharing == 1, timeout=HANG_GUARD_S,
               desc="pcscd to clean up the dead RDP client's handle", details=lambda: f"{desk.state(0)}")
    assert probe.call("transmit", apdu=GET_CHALLENGE)["rv"] == RV["W_RESET_CARD"]
    late = rig.desk_session("desk-late")
    assert late.call("connect", reader=r0)["rv"] == OK
    assert late.rv("begin") == OK and late.rv("end") == OK

    rig.start_client("desk-b")
    rig.wait_readers()
    fresh = rig.session("fresh")
    assert fresh.call("connect", reader=r0)["rv"] == OK
    assert fresh.rv("begin") == OK
    transmit_ok(fresh, GET_CHALLENGE, "GET CHALLENGE in a transaction after the takeover")
    assert fresh.rv("end") == OK


def test_addin_reader_filter_option(rig, desk):
    """/vc:cardbridge,readers:PATTERN exposes only matching readers; connecting to a hidden
    reader by name fails as for an unknown reader."""
    shown, hidden = desk.readers[1], desk.readers[0]
    pattern = shown.split()[-2] + " " + shown.split()[-1]  # "00 01"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCSCLITE_")}
    env.update(desk.env())
    p = rig._proc([CLIENT, "--host", "127.0.0.1", "--port", str(rig.port), "--addin", ADDIN, "--mode", rig.mode,
                   "--addin-args", f"log-level:debug,name:filtered,readers:{pattern}", "--client-name", "filtered"],
                  "client-filtered", env=env)
    wait_until(lambda: "CONNECTED" in p.log_text().splitlines(), timeout=HANG_GUARD_S, desc="client to connect",
               details=rig.report)
    wait_until(lambda: rig.shim_readers() == [shown], timeout=HANG_GUARD_S, desc=f"only {shown} on the shim",
               details=rig.report)
    sess = rig.session()
    assert sess.call("connect", reader=hidden)["rv"] == E_UNKNOWN_READER
