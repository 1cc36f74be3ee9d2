"""The fault matrix over a real RDP channel (docs/faults.md; the rig of test_rdp_e2e.py: the
emulated desk -> cb-rdp-client with the CardBridge add-in (static /vc or dynamic /dvc channel)
-> cb-rdp-host (FreeRDP server library) -> cardbridge-shim):

  * the channel drops with a transfer in flight (the RDP client killed: its TCP connection closes);
  * the RDP client stops (SIGSTOP) with a transfer in flight: the connection stays open and
    silent, as a suspended thin client or a cut without a reset looks to the server: the
    liveness bound; SIGCONT.

The transfer in flight is real: a gated APDU the card holds (desk.gate). The codes are pcscd's
for a reader that goes away (test_rdp_e2e.py's module docstring). Times are reported
(cbharness.faultreport: $CARDBRIDGE_BUILD_DIR/fault-matrix/rdp[-freerdp3].json), never asserted.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from test_rdp_e2e import (ADDIN, CB_PCSC, CLIENT, GATED_APDU, GET_CHALLENGE, HANG_GUARD_S, LOST_IN_FLIGHT_RV, OK,  # noqa: F401
                          ORPHAN_RV, STATUS_LOST_RV, Rig, _binaries, cert_dir, desk, rig, transmit_ok, wait_until)
from cbharness.faultreport import LIVENESS_MS, PROMPT_MS, FaultReport

FLAVOUR = os.environ.get("CARDBRIDGE_FREERDP", "2")
SEES = (f"in flight {LOST_IN_FLIGHT_RV} READER_UNAVAILABLE; then Transmit/End {ORPHAN_RV}, Status {STATUS_LOST_RV}; "
        "readers vanish")
PCSCD = "pcsc-lite 1.9.9 reader removal (IFDTransmit, RFReaderInfoById, SCardStatus): same codes"


@pytest.fixture(scope="module")
def report(request):
    r = FaultReport("rdp" if FLAVOUR == "2" else f"rdp-freerdp{FLAVOUR}")
    yield r
    r.finish(request.config)


def _in_flight(rig, desk, name: str):
    """A program holding a transaction with a gated APDU in flight at the card."""
    s = rig.session(name)
    assert s.call("connect", reader=desk.readers[0])["rv"] == OK
    assert s.rv("begin") == OK
    transmit_ok(s, GET_CHALLENGE, "GET CHALLENGE in the transaction")
    gate = desk.gate(0)
    n = gate.held() + 1
    p = s.start("transmit", apdu=GATED_APDU)
    gate.wait_held(n)
    return s, p, gate, n


def _after(s) -> dict:
    return {"end": s.rv("end"), "transmit": s.call("transmit", apdu=GET_CHALLENGE)["rv"],
            "status": s.call("status")["rv"]}


def _back(rig, desk, name: str) -> None:
    fresh = rig.session(name)
    assert fresh.call("connect", reader=desk.readers[0])["rv"] == OK
    assert fresh.rv("begin") == OK
    transmit_ok(fresh, GET_CHALLENGE, "GET CHALLENGE after recovery")
    assert fresh.rv("end") == OK


def _desk_idle(desk) -> None:
    """The dead client's handle cleaned up by the desk's pcscd (the next test's card is free)."""
    wait_until(lambda: desk.state(0).sharing == 0, timeout=HANG_GUARD_S, desc="the desk's pcscd to have no handle",
               details=lambda: f"{desk.state(0)}")


def test_channel_drop_mid_transmit(rig, desk, report):
    first = rig.start_client("desk-a")
    rig.wait_readers()
    s, p, gate, n = _in_flight(rig, desk, "holder")
    t_drop = time.monotonic()
    first.send_signal(signal.SIGKILL)
    r = p.result()
    assert r["t1"] >= t_drop and r["rv"] == LOST_IN_FLIGHT_RV, r
    wait_until(lambda: rig.shim_readers() == [], timeout=HANG_GUARD_S, desc="readers gone", details=rig.report)
    after = _after(s)
    assert after == {"end": ORPHAN_RV, "transmit": ORPHAN_RV, "status": STATUS_LOST_RV}, after
    gate.release(n)
    _desk_idle(desk)
    t_new = time.monotonic()
    rig.start_client("desk-b")
    rig.wait_readers()
    t_back = time.monotonic()
    _back(rig, desk, "fresh")
    assert rig.shim.alive() and rig.host.alive()
    report.add(f"RDP channel drop mid-Transmit ({rig.mode} channel, client killed)", SEES, 1000 * (r["t1"] - t_drop),
               PROMPT_MS, "the RDP client reconnects: readers back, new handles work", 1000 * (t_back - t_new),
               pcscd=PCSCD, path=f"rdp-{rig.mode}", notes=f"FreeRDP {FLAVOUR}")


def test_rdp_client_stopped_mid_transmit(rig, desk, report):
    """SIGSTOP: the RDP connection stays open and nothing comes from the desk. The program's
    transfer fails within the liveness bound (counted from its request) and the readers vanish;
    SIGCONT: the same client's channel carries a new desk session (nothing restarted)."""
    client = rig.start_client("desk-a")
    rig.wait_readers()
    s, p, gate, n = _in_flight(rig, desk, "holder")
    os.kill(client.pid, signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        r = p.result()
        assert r["rv"] == LOST_IN_FLIGHT_RV, r
        wait_until(lambda: rig.shim_readers() == [], timeout=HANG_GUARD_S, desc="readers gone", details=rig.report)
        after = _after(s)
        assert after == {"end": ORPHAN_RV, "transmit": ORPHAN_RV, "status": STATUS_LOST_RV}, after
    finally:
        t_cont = time.monotonic()
        os.kill(client.pid, signal.SIGCONT)
    gate.release(n)
    rig.wait_readers()
    t_back = time.monotonic()
    _back(rig, desk, "fresh")
    assert client.alive(), client.failure_report(20)
    report.add(f"RDP client stopped (SIGSTOP) mid-Transmit ({rig.mode} channel)", SEES, 1000 * (r["t1"] - r["t0"]),
               LIVENESS_MS, "SIGCONT: the same client's channel brings the readers back", 1000 * (t_back - t_cont),
               pcscd="no pcscd equivalent (silence)", path=f"rdp-{rig.mode}",
               notes=f"FreeRDP {FLAVOUR}; stopped {1000 * (t_stop - r['t0']):.0f} ms after the request; "
                     "time counted from the request")
