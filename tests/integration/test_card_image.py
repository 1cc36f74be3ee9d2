"""The card image is invisible to programs: every recorded login trace (the real Cryptolib CPS
and OpenSC ones, tests/bench/traces/real, and the synthetic ones, tests/bench/traces), CPS3
and CPS4, replayed with cb-replay through a shim without the image (--disable card-image)
and through a shim answering from the desk's image, gets the same answers APDU by APDU:
same commands, same data, same status words. Signatures and challenges (random by design)
are compared by status word and length; a PIN status query (VERIFY without data) by class
of answer (its answer depends on what an earlier run left).

Real parts: the desk's pcscd with vpcd and cb-cardsim, cardbridge-desk, two cardbridge-shims
over TCP in the network namespaces of tests/bench/wan, cb-replay over the system libpcsclite.

Non-vacuity: the desk learns what to read from the first (imageless) runs, then reads the
card on its own; the test waits for the desk to report the image complete (shim status
readers[].image.desk), and the image shim's counters must show answers from the image
(image_answers) and fewer desk round trips than the imageless run of the same trace.

Fault cases (CPS3, same desk): another card with the same ATR, removal mid-login, a write
through the session, and a program at the desk itself holding the card in a transaction while
the desk would read it.

Needs root (network namespaces); skipped otherwise.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", ROOT / "build"))
TRACES = ROOT / "tests" / "bench" / "traces"
sys.path.insert(0, str(ROOT / "tests" / "bench"))

from wan.netns import Wan, cleanup_stale, in_ns, unavailable  # noqa: E402
from cbharness import HANG_GUARD_S, shim_control  # noqa: E402
from wan.stack import READER, Binaries, Stack  # noqa: E402

FLAVOURS = ("cps3", "cps4")


def traces(flavour: str) -> list[Path]:
    found = [TRACES / f"{flavour}-warm.trace", TRACES / f"{flavour}-cold.trace"]
    found += sorted(t for t in (TRACES / "real").glob("*.trace") if f"-{flavour}" in t.stem)
    return found


def _skip_reason() -> str | None:
    if reason := unavailable():
        return reason
    bins = Binaries(BUILD)
    if bins.missing():
        return f"not built: {bins.missing()}"
    return None


def status(shim) -> dict:
    return shim_control(shim.control, {"cmd": "status"}, timeout=30)


def reader_image(shim) -> dict:
    for r in status(shim)["readers"]:
        if r["name"] == READER:
            return r["image"]
    return {}


def wait_for(what: str, pred, guard: float = HANG_GUARD_S) -> None:
    end = time.monotonic() + guard  # hang guard only
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def wait_for_desk_image(*shims) -> None:
    # The link whose core read the image hears of it at once; another one with its next request.
    wait_for("the desk's card image", lambda: any(reader_image(s).get("desk") == "complete" for s in shims))


def replay_dump(st: Stack, shim, trace: Path) -> list[tuple[str, str]]:
    """One run of |trace| through |shim|: every APDU and its answer, in order."""
    argv = [*in_ns(st.wan.server_ns), str(st.bins.replay), "--trace", str(trace), "--reader", READER,
            "--pin", st.pin, "--dump"]
    r = subprocess.run(argv, env={**os.environ, "PCSCLITE_CSOCK_NAME": str(shim.socket)}, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=HANG_GUARD_S * 5)
    out = []
    for line in r.stderr.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] == "->" and parts[0].isdigit():
            out.append((parts[1].upper(), parts[3].upper()))
    # the dump holds the test PIN: only the verdict is shown
    assert r.returncode == 0, f"{trace.name} through {shim.name}: cb-replay exit {r.returncode}: {r.stdout[-600:]}"
    return out


def shown(cmd: str) -> str:
    return cmd[:8] + "<PIN>" if cmd.startswith("0020") and len(cmd) > 8 else cmd


def compare(name: str, plain: list, imaged: list) -> None:
    assert len(plain) == len(imaged), f"{name}: {len(plain)} APDUs without the image, {len(imaged)} with it"
    after_signature = False
    for i, ((c1, r1), (c2, r2)) in enumerate(zip(plain, imaged)):
        assert c1 == c2, f"{name}: APDU {i}: commands differ: {shown(c1)} / {shown(c2)}"
        ins = c1[2:4]
        random_answer = ins in ("84", "2A", "88") or (ins == "C0" and after_signature)
        after_signature = ins in ("2A", "88") or (ins == "C0" and after_signature)
        if random_answer:
            assert (len(r1), r1[-4:]) == (len(r2), r2[-4:]), f"{name}: APDU {i} {c1[:10]}: {r1[-4:]} / {r2[-4:]}"
        elif ins == "20" and len(c1) == 8:  # PIN status: 9000 or 63Cx, by what the last run left
            assert {r1[:2], r2[:2]} <= {"90", "63"}, f"{name}: APDU {i}: PIN status {r1} / {r2}"
        else:
            assert r1 == r2, f"{name}: APDU {i} {shown(c1)}: without the image {r1}, with it {r2}"


class Desks:
    """One emulated desk per card flavour, in turn (the cases come flavour by flavour)."""

    def __init__(self):
        self.flavour = None
        self.current = None
        self.wan = None
        self.work = None

    def get(self, flavour: str):
        if self.flavour != flavour:
            self.close()
            self._open(flavour)
        return self.current

    def _open(self, flavour: str) -> None:
        self.flavour = flavour
        profile = flavour.split("-")[0]
        self.work = Path(tempfile.mkdtemp(prefix=f"cbimage-{flavour}-"))
        self.wan = Wan(f"img{os.getpid()}{len(flavour)}{flavour[3]}", 0.0, "auto", print).up()
        # (the desk logs at info: a test waits for its "reading the card's image" line)
        st = Stack(self.wan, Binaries(BUILD), self.work, card_profile=profile, time_scale=0.0, seed=11, pin="1234",
                   log=print, desk_log_level="info")
        self.current = (st, None, None)
        st.start_desk()
        plain = st.start_shim("plain", "optimized", "card-image")
        imaged = st.start_shim("image", "optimized")
        self.current = (st, plain, imaged)
        # What the desk learns: the programs' own traffic (every trace once, without the image).
        for t in traces(profile):
            replay_dump(st, plain, t)
        wait_for_desk_image(plain, imaged)

    def close(self) -> None:
        if self.current is not None:
            self.current[0].stop_all()
        if self.wan is not None:
            self.wan.down()
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
        self.flavour = self.current = self.wan = self.work = None


@pytest.fixture(scope="module")
def desks():
    if reason := _skip_reason():
        pytest.skip(reason)
    cleanup_stale()
    pool = Desks()
    try:
        yield pool
    finally:
        pool.close()


def _cases() -> list[str]:
    return [f"{f}:{t.relative_to(TRACES)}" for f in FLAVOURS for t in traces(f)]


@pytest.mark.parametrize("case", _cases())
def test_same_answers_with_and_without_the_image(desks, case):
    flavour, rel = case.split(":", 1)
    st, plain, imaged = desks.get(flavour)
    trace = TRACES / rel
    p0 = status(plain)["stats"]
    without = replay_dump(st, plain, trace)
    p1 = status(plain)["stats"]
    i0 = status(imaged)["stats"]
    with_image = replay_dump(st, imaged, trace)
    i1 = status(imaged)["stats"]
    compare(case, without, with_image)
    answers = i1["image_answers"] - i0["image_answers"]
    rt_plain = p1["round_trips"] - p0["round_trips"]
    rt_image = i1["round_trips"] - i0["round_trips"]
    print(case, {"apdus": len(without), "image_answers": answers, "preludes": i1["image_preludes"] - i0["image_preludes"],
                 "round_trips": {"plain": rt_plain, "image": rt_image}})
    assert i1["images_dropped"] == i0["images_dropped"], "the image was dropped during a read-only login"
    assert answers > 0, "nothing was answered from the image"
    assert rt_image < rt_plain


# ---- fault cases ---------------------------------------------------------------------------

# A program that runs commands one line at a time (stdin: JSON ops, stdout: one JSON result
# each), so that the test can act on the card between two of its commands.
STEPPER = r"""
import json, sys
from smartcard import scard as S
rv, hc = S.SCardEstablishContext(S.SCARD_SCOPE_USER)
card = proto = None
for line in sys.stdin:
    op = json.loads(line)
    if op[0] == "connect":
        rv, card, proto = S.SCardConnect(hc, op[1], S.SCARD_SHARE_SHARED, S.SCARD_PROTOCOL_T0 | S.SCARD_PROTOCOL_T1)
        out = ["%08X" % (rv & 0xFFFFFFFF)]
    elif op[0] == "disconnect":
        out = ["%08X" % (S.SCardDisconnect(card, S.SCARD_LEAVE_CARD) & 0xFFFFFFFF)]
    elif op[0] == "begin":
        out = ["%08X" % (S.SCardBeginTransaction(card) & 0xFFFFFFFF)]
    elif op[0] == "end":
        out = ["%08X" % (S.SCardEndTransaction(card, S.SCARD_LEAVE_CARD) & 0xFFFFFFFF)]
    else:
        rv, resp = S.SCardTransmit(card, proto, list(bytes.fromhex(op[1])))
        out = ["%08X" % (rv & 0xFFFFFFFF), bytes(resp).hex().upper()]
    print(json.dumps(out), flush=True)
"""


class Stepper:
    """A program in the session (through |shim|), or, shim None, a program at the desk itself
    (the desk's own pcscd, in the desk's namespace)."""

    def __init__(self, st: Stack, shim):
        script = st.work / "stepper.py"
        script.write_text(STEPPER)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PCSCLITE_", "PYTHON"))}
        env["PCSCLITE_CSOCK_NAME"] = str(shim.socket if shim else st.desk_socket)
        ns = st.wan.server_ns if shim else st.wan.desk_ns
        self.p = subprocess.Popen([*in_ns(ns), "/usr/bin/python3", str(script)], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, *op) -> list:
        self.p.stdin.write(__import__("json").dumps(list(op)) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()  # the harness's CTest timeout is the hang guard
        assert line, "the stepper died"
        return __import__("json").loads(line)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=HANG_GUARD_S)


IMAGING_STARTS = "reading the card's image"  # the desk agent's info line when an imaging pass begins
SEL_SN = "00A40904043F00D003"  # EF.SN.ICC by path from the MF, FCP wanted (CPS3: 61xx)
SEL_ACTUA = "00A40904043F00D010"


def gr_for(answer: str) -> str:
    return f"00C00000{answer[-2:]}"


def restart_card(st: Stack, seed: int) -> None:
    """Takes the card out of the desk's reader and puts one in (seed: which card)."""
    st._stop("cardsim")
    card_present = lambda: st.probe_card(st.desk_socket, st.wan.desk_ns)  # noqa: E731
    wait_for("the card to go", lambda: not card_present())
    st.seed = seed
    ns = st.wan.desk_ns
    st._start("cardsim", [*in_ns(ns), str(st.bins.cardsim), "--profile", st.card_profile, "--time-scale", "0",
                          "--host", "127.0.0.1", "--port", str(0x8C00), "--seed", str(seed), "--pin", st.pin,
                          "--log", str(st.card_log)])
    wait_for("the card", card_present)


def serial(step) -> tuple[str, str]:
    """EF.SN.ICC's FCP and content, read the way the Cryptolib reads it."""
    a = step("apdu", SEL_SN)
    fcp = step("apdu", gr_for(a[1])) if a[1].startswith("61") else a
    data = step("apdu", "00B000000C")
    return fcp[1], data[1]


def test_another_card_with_the_same_atr_is_read_not_the_image(desks):
    st, plain, imaged = desks.get("cps3-faults")
    p, i = Stepper(st, plain), Stepper(st, imaged)
    try:
        assert p("connect", READER)[0] == i("connect", READER)[0] == "00000000"
        first = serial(i)
        assert first == serial(p)
        assert status(imaged)["stats"]["images_received"] >= 1
        p("disconnect"), i("disconnect")
        restart_card(st, seed=12)  # another holder's card: same ATR, other serial and certificates
        wait_for("the shims to see the new card", lambda: all(reader_image(s).get("held") is False
                                                               for s in (imaged,)))
        assert p("connect", READER)[0] == i("connect", READER)[0] == "00000000"
        second_plain, second_image = serial(p), serial(i)
        assert second_image == second_plain, "the image shim did not answer as the card in the reader"
        assert second_image[1] != first[1], "the two cards have the same serial: the test proves nothing"
    finally:
        p.close(), i.close()


def test_removal_mid_login_is_the_programs_error_not_the_images_answer(desks):
    st, plain, imaged = desks.get("cps3-faults")
    wait_for_desk_image(plain, imaged)
    p, i = Stepper(st, plain), Stepper(st, imaged)
    try:
        assert p("connect", READER)[0] == i("connect", READER)[0] == "00000000"
        a = i("apdu", SEL_SN)
        assert a == p("apdu", SEL_SN)
        st._stop("cardsim")  # the card is pulled out in the middle of the login
        wait_for("the shims to see the removal",
                 lambda: all(not any(r["card_present"] for r in status(s)["readers"]) for s in (plain, imaged)))
        after_plain = p("apdu", gr_for(a[1]))
        after_image = i("apdu", gr_for(a[1]))
        assert after_image[0] == after_plain[0] != "00000000", (after_plain, after_image)
        assert reader_image(imaged).get("held") is False
    finally:
        p.close(), i.close()
        restart_card(st, seed=11)


def test_a_write_through_the_session_drops_the_shims_image(desks):
    st, plain, imaged = desks.get("cps3-faults")
    wait_for_desk_image(plain, imaged)
    i = Stepper(st, imaged)
    try:
        assert i("connect", READER)[0] == "00000000"
        serial(i)
        assert reader_image(imaged).get("held") is True
        dropped = status(imaged)["stats"]["images_dropped"]
        i("apdu", SEL_ACTUA)
        i("apdu", "00D6000001" + "00")  # UPDATE BINARY: whatever the card says, it may have written
        assert status(imaged)["stats"]["images_dropped"] == dropped + 1
        assert reader_image(imaged).get("held") is False
        i("disconnect")
    finally:
        i.close()


def test_a_desk_program_in_a_transaction_is_never_interleaved(desks):
    """Another program at the desk itself holds the card in a transaction while the desk would
    read its image: that program's SELECT and READ BINARY stay its own (the imaging never
    slips a command in between), the image waits, and is read once the program lets go."""
    st, plain, imaged = desks.get("cps3-faults")
    wait_for_desk_image(plain, imaged)
    i, d, p = Stepper(st, imaged), Stepper(st, None), Stepper(st, plain)
    try:
        assert p("connect", READER)[0] == "00000000"
        want = serial(p)  # EF.SN.ICC, as the card gives it
        p("disconnect")
        # The session writes: the desk drops its image (its handle keeps the imaging away).
        assert i("connect", READER)[0] == "00000000"
        i("apdu", SEL_ACTUA)
        i("apdu", "00D6000001" + "00")
        wait_for("the desk to drop its image", lambda: reader_image(imaged).get("desk") != "complete")
        # A program at the desk takes the card: a transaction (exclusive access to the card).
        assert d("connect", READER)[0] == "00000000"
        assert d("begin")[0] == "00000000"
        passes = st.log_text("desk-agent").count(IMAGING_STARTS)
        i("disconnect")  # the session lets go: nothing of CardBridge holds the card now
        before = st.card_events()[0]
        a = d("apdu", SEL_SN)
        # The desk starts reading the image while the program is between its SELECT and READ.
        wait_for("the desk to start an imaging pass", lambda: st.log_text("desk-agent").count(IMAGING_STARTS) > passes)
        fcp = d("apdu", gr_for(a[1])) if a[1].startswith("61") else a
        data = d("apdu", "00B000000C")
        sent = 3 if a[1].startswith("61") else 2
        assert (fcp[1], data[1]) == want, "the desk program's current file changed under its transaction"
        assert st.card_events()[0] - before == sent, "the card executed commands of someone else inside the transaction"
        # (the link whose session wrote heard the drop; the other link hears of it with its next
        # request: see the closing note)
        assert reader_image(imaged).get("desk") != "complete", "the desk read the card inside a transaction"
        assert d("end")[0] == "00000000"
        d("disconnect")
        wait_for_desk_image(plain, imaged)  # and once the card is free, the image is read again
    finally:
        i.close(), d.close(), p.close()
