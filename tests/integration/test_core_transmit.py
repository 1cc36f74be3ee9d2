"""SCardTransmit through the shim: data and status words as the desk's pcscd passes them, error
status words untouched, 61xx / GET RESPONSE, large and extended APDUs, small receive buffers and
wrong PCI protocols.

Shared rig: slot 0 ISO 7816 vicc (T=1; fix_tlv so SELECT MF with FCI works), slot 2 the
harness test card (INS EE: echo / pattern, extended length)."""
from __future__ import annotations

import hashlib
import re
import os

import pytest

from core_support import GET_CHALLENGE, OK, RV, WireClient, compare, strip_times


def _session_pair(both, rig, slot=0):
    ss = both()
    for s in ss.values():
        s.call("establish")
        assert s.rv("connect", reader=rig.desk.readers[slot]) == OK
    return ss


def test_get_challenge_twice_gives_two_answers(rig, both):
    for t, s in _session_pair(both, rig).items():
        a = s.call("transmit", apdu=GET_CHALLENGE)
        b = s.call("transmit", apdu=GET_CHALLENGE)
        for r in (a, b):
            assert r["rv"] == OK and r["sw"] == "9000" and len(r["data"]) == 16, (t, r)
        assert a["data"] != b["data"], f"{t}: GET CHALLENGE returned the same bytes twice: {a['data']}"


@pytest.mark.parametrize("apdu,sw", [
    ("0084000100", "6A86"),      # wrong P2
    ("00510000", "6D00"),        # unknown INS, case 1
    ("80FF000000", "6D00"),      # unknown INS, proprietary class
    ("00B0000000", "6986"),      # READ BINARY without a current EF
    ("00CA000000", "6A81"),      # GET DATA
    ("00A4020C022F00", "6A82"),  # SELECT of a missing EF
    ("00A4000C023F00", "9000"),  # SELECT MF, no response data
    ("0020000204313233", "6A80"),  # VERIFY with Lc != data length (no PIN tried)
    ("0084", "6108"),            # 2-byte APDU, padded by the card
])
def test_status_words_passed_through(rig, both, apdu, sw):
    res = {t: strip_times(s.call("transmit", apdu=apdu)) for t, s in _session_pair(both, rig).items()}
    compare(res, f"transmit {apdu}")
    assert res["shim"]["rv"] == OK and res["shim"]["sw"] == sw and res["shim"]["data"] == ""


def _shape(r):
    """rv, SW and data length of a transmit (random data differs from run to run)."""
    return {"rv": r["rv"], "sw": r["sw"], "len": len(r["data"]) // 2}


@pytest.mark.parametrize("sequence", [
    ["00840000", "00C0000008"],                 # 61 08, then exactly the GET RESPONSE asked for
    ["00840000", "00C0000000"],                 # ... with Le = 00
    ["00840000", "00C0000004"],                 # ... with a shorter Le
    ["00840000", "00C0000010"],                 # ... with a longer Le
    ["00840000", "0084000100", "00C0000008"],   # another command in between
    ["00840000", "00840000", "00C0000008", "00C0000008"],
    ["00A40000023F00", "00C000000C"],           # SELECT MF with FCI: 61 0C, GET RESPONSE
    ["00A40000023F0000"],                       # ... with Le: FCI at once
], ids=lambda seq: "+".join(seq))
def test_get_response_sequences_same_as_desk(rig, both, sequence):
    """61xx and what follows. The shim may fetch the GET RESPONSE ahead of the program
    (prefetch); the card's answers to the program's actual commands must not change."""
    res = {}
    for t, s in _session_pair(both, rig).items():
        res[t] = [_shape(s.call("transmit", apdu=a)) for a in sequence]
        if sequence[0].startswith("00A4"):
            res[t].append(s.call("transmit", apdu=sequence[-1])["resp"])  # FCI content is fixed
    compare(res, f"APDU sequence {sequence}")


def test_get_response_sequences_inside_transaction(rig, both):
    """The same inside a transaction (where the shim also reads ahead)."""
    seq = ["00A40000023F00", "00C000000C", "00B0000000", "00840000", "00C0000004", "00C0000008", "00B0000000"]
    res = {}
    for t, s in _session_pair(both, rig).items():
        assert s.rv("begin") == OK
        res[t] = [_shape(s.call("transmit", apdu=a)) for a in seq]
        assert s.rv("end") == OK
    compare(res, f"APDU sequence in a transaction {seq}")


_LARGE = [
    ("short Le=256 pattern", "80EE010000", 256 + 2),
    ("extended Le 4096 pattern", "80EE1000001000", 4096 + 2),
    ("largest response 65533+SW", "80EEFFFD000000", 65535),
    ("extended echo 3000 bytes", "80EE000000" + "0BB8" + os.urandom(3000).hex() + "0000", 3000 + 2),
    ("extended echo 65000 bytes", "80EE000000" + "FDE8" + os.urandom(65000).hex() + "0000", 65000 + 2),
    ("short Le=256 with 512 bytes: 256 + 61xx", "80EE020000", 256 + 2),
]


@pytest.mark.parametrize("desc,apdu,resp_len", [pytest.param(*c, id=re.sub(r"\W+", "_", c[0]).strip("_")) for c in _LARGE])
def test_large_and_extended_apdus(rig, both, desc, apdu, resp_len):
    res = {}
    for t, s in _session_pair(both, rig, slot=2).items():
        r = s.call("transmit", apdu=apdu)
        res[t] = {"rv": r["rv"], "len": len(r["resp"]) // 2, "sw": r["sw"],
                  "sha": hashlib.sha256(bytes.fromhex(r["resp"])).hexdigest()}
        if "echo" in desc:
            lc = int(apdu[10:14], 16)
            assert r["data"] == apdu[14:14 + 2 * lc].upper(), f"{t}: echo came back different"
    compare(res, desc)
    assert res["shim"]["rv"] == OK and res["shim"]["len"] == resp_len
    if "61xx" in desc:
        assert res["shim"]["sw"].startswith("61")


@pytest.mark.parametrize("wrong", [1, 4, 0x1000])
def test_transmit_with_other_pci_protocol(rig, both, wrong):
    """The card runs T=1; a send PCI of T=0, RAW or the old 'any' value gives what pcscd gives."""
    res = {}
    for t, s in _session_pair(both, rig).items():
        res[t] = strip_times(s.call("transmit", apdu=GET_CHALLENGE, proto=wrong))
        res[t] = {"rv": res[t]["rv"], "sw": res[t]["sw"]}
        res[t]["after"] = _shape(s.call("transmit", apdu=GET_CHALLENGE))
    compare(res, f"transmit with send PCI protocol {wrong}")


@pytest.mark.parametrize("recv_len", [0, 4, 9, 10, 11, 258])
def test_receive_buffer_sizes_on_the_wire(rig, recv_len):
    """A caller buffer smaller than the response: SCARD_E_INSUFFICIENT_BUFFER with the needed
    length and no data (libpcsclite passes pcbRecvLength through; checked on the raw protocol)."""
    res = {}
    for t in ("desk", "shim"):
        with WireClient(rig.sock(t)) as w:
            w.open()
            card, proto, rv = w.connect(rig.desk.readers[0])
            assert rv == 0, f"{t}: connect 0x{rv:08X}"
            r = w.transmit(card, bytes.fromhex(GET_CHALLENGE), recv_len=recv_len, proto=proto)
            after = w.transmit(card, bytes.fromhex(GET_CHALLENGE), proto=proto)
            # (ioRecvPciProtocol is compared on success only: libpcsclite ignores it otherwise,
            # and pcscd 1.9.9 puts 1 there while the shim echoes the request's value.)
            res[t] = {"rv": r["rv"], "recv_length": r["recv_length"], "data_len": len(r["data"]) // 2,
                      "recv_pci": r["recv_pci"] if r["rv"] == OK else None,
                      "next_ok": after["rv"] == OK and len(after["data"]) == 20}
            assert w.disconnect(card) == 0
    compare(res, f"transmit with a {recv_len}-byte receive buffer")
    if recv_len < 10:
        assert res["shim"]["rv"] == RV["E_INSUFFICIENT_BUFFER"] and res["shim"]["recv_length"] == 10


def test_control_and_unsupported_feature(rig, both):
    """SCardControl(CM_IOCTL_GET_FEATURE_REQUEST) and an unknown code: vpcd's answer passes through."""
    res = {}
    for t, s in _session_pair(both, rig).items():
        res[t] = [strip_times(s.call("control", code=0x42000D48)),
                  strip_times(s.call("control", code=0x42000001, data="02"))]
    compare(res, "SCardControl")


def test_get_response_sequences_with_prefetch_disabled(rig):
    """Control for the prefetch tests above: a second shim on the same desk with
    --disable prefetch-get-response, same sequences (isolates the optimisation as the cause
    when those fail)."""
    _, sock = rig.start_extra_shim("shim-noprefetch", "--disable", "prefetch-get-response")
    res = {}
    for t, path in (("desk", rig.sock("desk")), ("shim", sock)):
        s = rig.session(path, name=t)
        s.call("establish")
        assert s.rv("connect", reader=rig.desk.readers[0]) == OK
        res[t] = [[_shape(s.call("transmit", apdu=a)) for a in seq]
                  for seq in (["00840000", "00C0000000"], ["00840000", "00C0000004", "00C0000008"],
                              ["00840000", "00C0000010"])]
        s.close()
    compare(res, "GET RESPONSE variants with prefetch disabled")
