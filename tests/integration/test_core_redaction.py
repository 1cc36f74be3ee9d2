"""PIN bytes never reach a log: desk agent and shim at --log-level trace, programs send VERIFY,
CHANGE REFERENCE DATA, RESET RETRY COUNTER (short and extended, several classes, well- and
ill-formed) and PIN-pad-like control buffers; both logs (and the shim's audit trail) are
searched for every PIN in any hex spelling. pcscd's log is not ours and is not searched.

The test also checks that the logs did see those commands (so that it proves something)."""
from __future__ import annotations

import base64
import re

import pytest

from core_support import OK

PINS = {
    "brief": bytes.fromhex("31323334FFFFFFFF"),      # "1234" padded, as in the issue
    "ext": bytes.fromhex("A75C93E12D4B86F0"),
    "change_new": bytes.fromhex("5E6F708192A3B4C5"),
    "proprietary": bytes.fromhex("D1E2F3041526374F"),
    "sm_class": bytes.fromhex("C3B2A1900F1E2D3C"),
    "reset_counter": bytes.fromhex("9A8B7C6D5E4F3021"),
    "bad_lc": bytes.fromhex("B7C8D9EAFB0C1D2E"),
    "control": bytes.fromhex("6A7B8C9DAEBFC0D1"),
    "in_transaction": bytes.fromhex("1F2E3D4C5B6A7988"),
}
SHORT_PIN = bytes.fromhex("31323334")  # the correct PIN of vicc, sent on its own too

APDUS = [
    "0020000108" + PINS["brief"].hex(),                       # VERIFY (wrong PIN: 63 00)
    "0020000104" + SHORT_PIN.hex(),                            # VERIFY, correct PIN: 90 00
    "00200001000008" + PINS["ext"].hex(),                      # VERIFY, extended Lc
    "8020000108" + PINS["proprietary"].hex(),                  # proprietary class
    "0C20000108" + PINS["sm_class"].hex(),                     # secure-messaging class
    "0020000109" + PINS["bad_lc"].hex(),                       # Lc says 9, 8 bytes follow
    "0020000104" + SHORT_PIN.hex(),
]
# vicc does not survive these (its answer is irrelevant here): sent last
LAST_APDUS = [
    "002C000108" + PINS["reset_counter"].hex(),                # RESET RETRY COUNTER
    "0024000110" + PINS["brief"].hex() + PINS["change_new"].hex(),  # CHANGE REFERENCE DATA
]


def spellings(pin: bytes):
    """Regexes for the PIN bytes in hex (any case; none, space, colon, comma, dash or '0x'/'\\x'
    between bytes) and, for the 8-byte PINs, in decimal lists and base64 (too likely to match
    by chance for 4 bytes)."""
    sep = r"(?:\s|:|,|-|0x|\\x)*"
    hexes = [f"{b:02x}" for b in pin]
    rx = [re.compile(r"(?:0x|\\x)?" + sep.join(hexes), re.I)]
    if len(pin) >= 8:
        rx.append(re.compile(r"\b" + r"\W{1,3}".join(str(b) for b in pin) + r"\b"))
        rx.append(re.compile(re.escape(base64.b64encode(pin).decode()[:10])))
    return rx


@pytest.fixture
def trace_rig(make_rig):
    return make_rig(slots=2, cards=({"slot": 0, "fix_tlv": True},), log_level="trace", name="redact")


def test_pins_never_logged(trace_rig):
    rig = trace_rig
    r0 = rig.desk.readers[0]
    s = rig.session("shim")
    s.call("establish")
    assert s.rv("connect", reader=r0) == OK
    sws = [s.call("transmit", apdu=a)["sw"] for a in APDUS]
    assert sws[:2] == ["6300", "9000"], sws  # the card did check them
    # inside a transaction (the shim defers the Begin onto the VERIFY)
    assert s.rv("begin") == OK
    assert s.call("transmit", apdu="0020000108" + PINS["in_transaction"].hex())["sw"] == "6300"
    assert s.call("transmit", apdu="0020000104" + SHORT_PIN.hex())["sw"] == "9000"
    assert s.rv("end") == OK
    # a PIN-pad style control buffer (vpcd refuses it, but it crosses the shim and the agent)
    s.call("control", code=0x42330006, data="00" * 4 + PINS["control"].hex())
    for a in LAST_APDUS:
        s.call("transmit", apdu=a)
    s.close()

    logs = {"agent": rig.agent_log(), "shim": rig.shim_log(),
            "shim audit (control socket)": str(rig.ctl({"cmd": "audit"}))}
    # the commands did reach both logs
    assert re.search(r"transmit 00 20 00 01 Lc=8 <8 bytes redacted>", logs["shim"]), "VERIFY not in the shim log"
    assert re.search(r"transmit 00 20 00 01 Lc=8 <8 bytes redacted>", logs["agent"]), "VERIFY not in the agent log"
    assert re.search(r"ctl 0x42330006", logs["shim"]) and re.search(r"ctl 0x42330006", logs["agent"])
    for text in (logs["shim"], logs["agent"]):
        assert "transmit 00 2C 00 01 Lc=8 <8 bytes redacted>" in text
        assert "transmit 00 24 00 01 Lc=16 <16 bytes redacted>" in text
    leaks = []
    for where, text in logs.items():
        for name, pin in list(PINS.items()) + [("vicc PIN", SHORT_PIN)]:
            for rx in spellings(pin):
                for m in rx.finditer(text):
                    line = text[text.rfind("\n", 0, m.start()) + 1:text.find("\n", m.end())]
                    leaks.append(f"{where}: PIN '{name}' ({pin.hex()}) as {m.group(0)!r} in: {line[:300]}")
    assert not leaks, "PIN bytes in the logs:\n" + "\n".join(leaks[:20])
