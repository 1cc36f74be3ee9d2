"""More end to end over a real RDP channel (same rig as test_rdp_e2e.py): card removal and
insertion at the desk, the RDP client dying in the middle of a transaction and a new client
taking over, and add-in options passed through FreeRDP's syntax (reader filter)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from test_rdp_e2e import (ADDIN, CB_PCSC, CLIENT, GET_CHALLENGE, OK, PcscSession, Rig, _binaries, cb_pcsc, cert_dir,  # noqa: F401
                          desk, rig, transmit_ok, wait_until)

W_REMOVED_CARD = "0x80100069"
E_UNKNOWN_READER = "0x80100009"
STATE_EMPTY, STATE_PRESENT = 0x10, 0x20


def reader_state(sock: str, name: str) -> dict:
    return next(r for r in cb_pcsc(sock, "list")["readers"] if r["name"] == name)


def test_card_removal_and_insertion_over_rdp(rig, desk):
    rig.start_client("desk-a")
    rig.wait_readers()
    r0 = desk.readers[0]
    sess = rig.session()
    try:
        assert sess.call(op="connect", reader=r0)["rv"] == OK
        transmit_ok(sess, GET_CHALLENGE, "before removal")
        t0 = time.monotonic()
        desk.remove_card(0)
        wait_until(lambda: reader_state(rig.shim_socket, r0)["state"] & STATE_EMPTY, timeout=2.0,
                   desc="the removal seen through RDP", details=rig.report)
        print(f"[{rig.mode}] removal seen on the server {time.monotonic() - t0:.2f}s after vicc stopped")
        assert sess.call(op="transmit", apdu=GET_CHALLENGE)["rv"] == W_REMOVED_CARD

        desk.insert_card(0, test_ins=True, extended=True)
        st = wait_until(lambda: (lambda s: s if s["state"] & STATE_PRESENT else None)(reader_state(rig.shim_socket, r0)),
                        timeout=3.0, desc="the insertion seen through RDP", details=rig.report)
        assert st["atr"] == reader_state(desk.socket_path, r0)["atr"] != ""
        assert sess.call(op="transmit", apdu=GET_CHALLENGE)["rv"] == W_REMOVED_CARD  # until reconnected
        fresh = rig.session()
        try:
            assert fresh.call(op="connect", reader=r0)["rv"] == OK
            transmit_ok(fresh, GET_CHALLENGE, "after re-insertion")
        finally:
            fresh.close()
    finally:
        sess.close()


def test_client_dies_mid_transaction_then_another_desk_takes_over(rig, desk):
    """The RDP client dies while a server program holds a transaction: the program's next call
    fails promptly instead of hanging, the desk's pcscd frees the card (the add-in's contexts
    died with the FreeRDP process), and after a new client connects a new program can take a
    transaction at once."""
    first = rig.start_client("desk-a")
    rig.wait_readers()
    env_sock = rig.shim_socket
    # A desk program connected beforehand (pcscd 1.9.9 makes a Connect wait while another
    # handle holds a transaction, so it must be connected before the server program begins).
    # PCSCLITE_NO_BLOCKING: libpcsclite returns SHARING_VIOLATION instead of retrying.
    probe = PcscSession(desk.socket_path, rig.logs, extra_env={"PCSCLITE_NO_BLOCKING": "1"})
    assert probe.call(op="connect", reader=desk.readers[0])["rv"] == OK
    holder = subprocess.Popen([str(CB_PCSC), "hold", "--ms", "4000", "--reader", desk.readers[0], "--transmit",
                               "--apdu", GET_CHALLENGE],
                              env={"PCSCLITE_CSOCK_NAME": env_sock}, stdout=subprocess.PIPE, text=True)
    try:
        assert '"holding"' in holder.stdout.readline()  # Begin + a Transmit: the desk holds the lock
        # The lock is real at the desk: the desk program's Transmit gets SHARING_VIOLATION.
        assert probe.call(op="transmit", apdu=GET_CHALLENGE)["rv"] == "0x8010000B"
        first.send_signal(signal.SIGKILL)
        wait_until(lambda: rig.shim_readers() == [], timeout=2.0, desc="readers gone", details=rig.report)
        out, _ = holder.communicate(timeout=10)
        res = json.loads(out.strip().splitlines()[-1])
        assert res["end"] != OK, res  # End on a vanished desk fails (reader gone), it does not hang

        # The desk's pcscd released the dead client's transaction: a desk program begins at once.
        begin = cb_pcsc(desk.socket_path, "begin", "--reader", desk.readers[0])
        assert begin["begin"] == OK and begin["begin_ms"] < 1000, begin

        rig.start_client("desk-b")
        rig.wait_readers()
        after = cb_pcsc(rig.shim_socket, "begin", "--reader", desk.readers[0])
        assert after["connect"] == OK and after["begin"] == OK and after["end"] == OK, after
        assert after["begin_ms"] < 1000, after
        r = cb_pcsc(rig.shim_socket, "transmit", "--reader", desk.readers[0], "--apdu", GET_CHALLENGE)
        assert r["rvs"] == [OK], r
    finally:
        probe.close()
        if holder.poll() is None:
            holder.kill()
            holder.wait()


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
    wait_until(lambda: "CONNECTED" in p.log_text().splitlines(), timeout=20, desc="client to connect",
               details=rig.report)
    wait_until(lambda: rig.shim_readers() == [shown], timeout=10, desc=f"only {shown} on the shim",
               details=rig.report)
    sess = rig.session()
    try:
        assert sess.call(op="connect", reader=hidden)["rv"] == E_UNKNOWN_READER
    finally:
        sess.close()
