"""The speculation is invisible to programs: the same APDU sequences, sent by pyscard through
the optimised shim and directly to the desk's pcscd, get byte-identical answers and status
words from a CPS-like card (cb-cardsim behind the desk's pcscd, vpcd) — GET RESPONSE
prefetch, READ BINARY read-ahead after a READ or after a SELECT that tells the file size,
with the predicted command, with a different Le, past the end of the file, with another
command in between, and outside a transaction. The shim's counters show that the
speculation was used (prefetch hits) and that wrong predictions were discarded, so the
comparison is not vacuous. (The login traces are checked the same way, end to end, by
scripts/wan-report: test_wan_quick.py.)

Needs root (network namespaces for the desk/server pair of tests/bench/wan); skipped otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", ROOT / "build"))
sys.path.insert(0, str(ROOT / "tests" / "bench"))

from wan.netns import Wan, cleanup_stale, unavailable  # noqa: E402
from cbharness import HANG_GUARD_S, shim_control  # noqa: E402
from wan.stack import READER, Binaries, Stack  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"

# One pyscard process per run: connect, then the ops, one result per op.
TOOL = r'''
import json, sys
from smartcard import scard as S
ops = json.load(open(sys.argv[1]))
rv, hc = S.SCardEstablishContext(S.SCARD_SCOPE_USER)
assert rv == 0, rv
rv, card, proto = S.SCardConnect(hc, sys.argv[2], S.SCARD_SHARE_SHARED, S.SCARD_PROTOCOL_T0 | S.SCARD_PROTOCOL_T1)
assert rv == 0, hex(rv & 0xFFFFFFFF)
out = []
for op in ops:
    if op[0] == "begin":
        out.append(["begin", "%08X" % (S.SCardBeginTransaction(card) & 0xFFFFFFFF)])
    elif op[0] == "end":
        out.append(["end", "%08X" % (S.SCardEndTransaction(card, S.SCARD_LEAVE_CARD) & 0xFFFFFFFF)])
    else:
        rv, resp = S.SCardTransmit(card, proto, list(bytes.fromhex(op[1])))
        out.append([op[1], "%08X" % (rv & 0xFFFFFFFF), bytes(resp).hex().upper()])
S.SCardDisconnect(card, S.SCARD_LEAVE_CARD)
S.SCardReleaseContext(hc)
print(json.dumps(out))
'''

SEL = "00A40904"  # SELECT by path from the current DF (3F00 first: from the MF), FCP wanted


def select(path: str) -> str:
    data = bytes.fromhex(path)
    return f"{SEL}{len(data):02X}{path}"


def gr(n: int) -> str:
    return f"00C00000{n:02X}"


def rb(offset: int, le: int) -> str:
    return f"00B0{offset:04X}{le & 0xFF:02X}"


# Each scenario: ops; "GR" = the GET RESPONSE of the previous 61xx (filled in at run time
# from the desk's own answer, so both sides send the same bytes).
SCENARIOS = {
    # the predicted commands: whole small file, then a certificate in 231-byte chunks
    "predicted": [["begin"], ["apdu", select("3F00D003")], ["GR"], ["apdu", rb(0, 0x0C)],
                  ["apdu", select("3F0050004402")], ["GR"], ["apdu", rb(0, 0xE7)], ["apdu", rb(0xE7, 0x11)],
                  ["apdu", select("3F005000C000")], ["GR"]]
    + [["apdu", rb(o, min(0xE7, 1812 - o))] for o in range(0, 1812, 0xE7)] + [["end"]],
    # what the program sends differs from the prediction
    "other Le": [["begin"], ["apdu", select("3F002F00")], ["GR"], ["apdu", rb(0, 0x10)], ["apdu", rb(0x10, 0x18)],
                 ["apdu", select("3F005000C001")], ["GR"], ["apdu", rb(0, 0xE7)], ["apdu", rb(0xE7, 0x80)],
                 ["apdu", rb(0x167, 0xE7)], ["end"]],
    "past the end": [["begin"], ["apdu", select("3F00D003")], ["GR"], ["apdu", rb(0, 0x20)], ["apdu", rb(0x0C, 4)],
                     ["apdu", rb(0x08, 0x08)], ["apdu", select("3F0050005031")], ["GR"], ["apdu", rb(0, 0)], ["end"]],
    "short GET RESPONSE": [["begin"], ["apdu", select("3F00D010")], ["GRshort"], ["GRrest"], ["apdu", rb(0, 0x14)],
                           ["end"]],
    "something in between": [["begin"], ["apdu", select("3F0050004401")], ["GR"], ["apdu", "00A40904043F00D003"],
                             ["GR"], ["apdu", rb(0, 0x0C)], ["apdu", select("3F005000C000")], ["GR"],
                             ["apdu", rb(0, 0xE7)], ["apdu", "00CB3FFF0A4D087006BF810102A080"], ["GR"],
                             ["apdu", rb(0xE7, 0xE7)], ["end"]],
    "no transaction": [["apdu", select("3F00D003")], ["GR"], ["apdu", rb(0, 0x0C)],
                       ["apdu", select("3F005000C000")], ["GR"], ["apdu", rb(0, 0xE7)], ["apdu", rb(0xE7, 0xE7)]],
}


def _skip_reason() -> str | None:
    if reason := unavailable():
        return reason
    bins = Binaries(BUILD)
    if bins.missing():
        return f"not built: {bins.missing()}"
    return None


@pytest.fixture(scope="module")
def stack():
    if reason := _skip_reason():
        pytest.skip(reason)
    cleanup_stale()
    work = Path(tempfile.mkdtemp(prefix="cbspec-"))
    wan = Wan(f"spec{os.getpid()}", 0.0, "auto", print).up()
    st = None
    try:
        st = Stack(wan, Binaries(BUILD), work, card_profile="cps3", time_scale=0.0, seed=7, pin="1234", log=print)
        st.start_desk()
        # The card image would answer these SELECTs and READs itself once the desk has read
        # the card (test_card_image.py): the speculation is proven without it.
        shim = st.start_shim("optimized", "optimized", "card-image")
        yield st, shim, work
    finally:
        if st is not None:
            st.stop_all()
        wan.down()
        shutil.rmtree(work, ignore_errors=True)


def _run(sock: Path, ops: list, work: Path) -> list:
    script = work / "tool.py"
    script.write_text(TOOL)
    f = work / "ops.json"
    f.write_text(json.dumps(ops))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCSCLITE_", "PYTHON"))}
    env["PCSCLITE_CSOCK_NAME"] = str(sock)
    r = subprocess.run([SYSTEM_PYTHON, str(script), str(f), READER], env=env, capture_output=True, text=True,
                       timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _concrete(ops: list, desk_sock: Path, work: Path) -> list:
    """Replaces GR markers with the GET RESPONSE the desk's own answers call for (run once
    against the desk, op by op, so that both sides then send exactly the same bytes)."""
    done: list = []
    for op in ops:
        if op[0] in ("GR", "GRshort", "GRrest"):
            prev = _run(desk_sock, done, work)
            sw = prev[-1][2][-4:]
            if op[0] == "GR" and not sw.startswith("61"):
                continue  # the card answered directly: nothing to fetch
            assert sw.startswith("61"), (done[-1], sw)
            n = int(sw[2:], 16)
            op = ["apdu", gr({"GR": n, "GRshort": min(5, n), "GRrest": n}[op[0]])]
        done.append(op)
    return done


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_answers_through_the_shim_as_at_the_desk(stack, name):
    st, shim, work = stack
    ops = _concrete(SCENARIOS[name], st.desk_socket, work)
    before = shim_control(shim.control, {"cmd": "status"})["stats"]
    direct = _run(st.desk_socket, ops, work)
    through = _run(shim.socket, ops, work)
    after = shim_control(shim.control, {"cmd": "status"})["stats"]
    for i, (d, s) in enumerate(zip(direct, through)):
        assert s == d, f"{name}: op {i} {ops[i]}: desk {d}, shim {s}"
    assert len(direct) == len(through) == len(ops)
    print(name, {k: after[k] - before[k] for k in ("prefetch_hits", "prefetch_discarded", "round_trips")})
    if name in ("predicted", "no transaction"):
        assert after["prefetch_hits"] > before["prefetch_hits"], "the speculation was not used"
    if name == "predicted":
        # every READ BINARY of the certificate after the first came from the read-ahead
        assert after["prefetch_hits"] - before["prefetch_hits"] >= 10
    if name in ("other Le", "something in between"):
        assert after["prefetch_discarded"] > before["prefetch_discarded"], "no prediction was wrong?"
