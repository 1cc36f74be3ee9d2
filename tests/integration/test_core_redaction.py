"""PIN bytes never reach a log: desk agent and shim at --log-level trace, programs send VERIFY,
CHANGE REFERENCE DATA, RESET RETRY COUNTER (short and extended, several classes, well- and
ill-formed) and PIN-pad-like control buffers; both logs (and the shim's audit trail) are
searched for every PIN in any hex spelling, and for the PIN's length (Lc, buffer sizes).
pcscd's log is not ours and is not searched.

Card data (what the card answers: a READ BINARY answer is the holder's identity) is not
logged either, at any level, unless both programs run with --unsafe-log-card-data.

The tests also check that the logs did see those commands (so that they prove something)."""
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
    # Every control code reaches the agent (the default policy would stop the PIN-pad-like
    # code below before the agent's own logging of it).
    return make_rig(slots=2, cards=({"slot": 0, "fix_tlv": True},), log_level="trace", name="redact",
                    agent_args=("--allow-control", "all"))


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
    # the commands did reach both logs, header only: neither the PIN nor its length
    assert re.search(r"transmit 00 20 00 01 <PIN redacted>", logs["shim"]), "VERIFY not in the shim log"
    assert re.search(r"transmit 00 20 00 01 <PIN redacted>", logs["agent"]), "VERIFY not in the agent log"
    assert re.search(r"ctl 0x42330006 <buffer redacted>", logs["shim"])
    assert re.search(r"ctl 0x42330006 <buffer redacted>", logs["agent"])
    for text in (logs["shim"], logs["agent"]):
        assert "transmit 00 2C 00 01 <PIN redacted>" in text
        assert "transmit 00 24 00 01 <PIN redacted>" in text
    lengths = []
    for where, text in logs.items():
        for line in text.splitlines():
            if re.search(r"\b[0-9A-F]{2} (?:20|24|2C) 00 0[12] (?:Lc=|<\d+ bytes)", line) or \
               re.search(r"ctl 0x42330006 .*\d+ bytes", line) or \
               re.search(r"request #\d+ control .*len=(?!hidden)", line):
                lengths.append(f"{where}: {line[:300]}")
    assert not lengths, "PIN lengths in the logs:\n" + "\n".join(lengths[:20])
    # The link's trace of each request (the frame's description) hides the lengths too.
    for where in ("shim", "agent"):
        assert re.search(r"request #\d+ transmit .*len=hidden", logs[where]), f"no hidden-length request in the {where} log"
    leaks = []
    for where, text in logs.items():
        for name, pin in list(PINS.items()) + [("vicc PIN", SHORT_PIN)]:
            for rx in spellings(pin):
                for m in rx.finditer(text):
                    line = text[text.rfind("\n", 0, m.start()) + 1:text.find("\n", m.end())]
                    leaks.append(f"{where}: PIN '{name}' ({pin.hex()}) as {m.group(0)!r} in: {line[:300]}")
    assert not leaks, "PIN bytes in the logs:\n" + "\n".join(leaks[:20])


@pytest.mark.parametrize("diagnostic", [False, True], ids=["default", "unsafe-log-card-data"])
def test_card_answers_logged_only_with_the_diagnostic_flag(make_rig, diagnostic):
    """The answers of allow-listed commands (READ BINARY, GET DATA, SELECT, GET CHALLENGE...)
    are card data: at trace level, not in either log by default; with --unsafe-log-card-data on
    both programs, they are (the flag works, so the default's absence is the redaction)."""
    flag = ("--unsafe-log-card-data",) if diagnostic else ()
    rig = make_rig(slots=2, cards=({"slot": 0},), log_level="trace", name="carddata", agent_args=flag,
                   shim_args=flag)
    s = rig.session("shim")
    s.call("establish")
    assert s.rv("connect", reader=rig.desk.readers[0]) == OK
    answers = []
    for _ in range(3):
        r = s.call("transmit", apdu="0084000008")  # GET CHALLENGE: 8 random bytes from the card
        assert r["rv"] == OK and r["sw"] == "9000" and len(r["data"]) == 16, r
        answers.append(bytes.fromhex(r["data"]))
    s.close()
    logs = {"agent": rig.agent_log(), "shim": rig.shim_log()}
    for where, text in logs.items():
        assert "transmit 00 84 00 00" in text, f"the GET CHALLENGEs are not in the {where} log: the check proves nothing"
        found = [a.hex() for a in answers if any(rx.search(text) for rx in spellings(a))]
        if diagnostic:
            assert len(found) == len(answers), f"{where}: --unsafe-log-card-data did not log the answers"
            assert "--unsafe-log-card-data" in text, f"{where}: the diagnostic mode is not announced in the log"
        else:
            assert not found, f"{where}: card answers in the log: {found}"
            assert "SW=9000 <8 bytes redacted>" in text, f"{where}: the answers were not logged redacted"
