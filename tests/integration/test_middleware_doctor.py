"""`cdrsession doctor --pkcs11 / --pkcs11-module PATH`: the doctor loads the session's PKCS#11
module (in a child process, with the session's PCSCLITE_CSOCK_NAME) and checks that it sees a
token in the desk's card, through a real desk agent + shim, with real modules:

  healthy            OpenSC (and the Cryptolib CPS when unpacked) on cb-cardsim's CPS3: the
                     token's label in the verdict, exit 0
  module missing     --pkcs11 without the Cryptolib installed at its default path, or a wrong
                     --pkcs11-module path: exit 2 (first_problem pkcs11), what to install
  card not recognised  OpenSC with a CPS4 (it has no CPS4 driver): the slot shows the card but
                     no token (CKR_TOKEN_NOT_RECOGNIZED)
  reader not visible OpenSC configured to ignore the desk's readers (OPENSC_CONF
                     ignored_readers, a filter meant for other readers): it lists none of them

Text and JSON give the same verdict (tests/unit/session/doctor_pkcs11_test.cpp: the logic).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cbharness.pkcs11 import OPENSC_MODULE, Middleware, SimCard, find_cryptolib

BUILD = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", Path(__file__).resolve().parents[2] / "build"))
CDRSESSION = BUILD / "cdrsession" / "cdrsession"
CRYPTOLIB, MISSING = find_cryptolib()
DEFAULT_CRYPTOLIB = Path("/opt/santesocial/CPS/lib/libcps3_pkcs11_lux.so")


@pytest.fixture(scope="module")
def rig(module_rig_factory):
    return module_rig_factory(slots=2, cards=(), name="mwdoc")


@pytest.fixture(scope="module")
def card(rig):
    c = SimCard(rig.desk, 0, log_dir=rig.logs)
    yield c
    c.stop()


def with_card(rig, card, profile):
    if card.proc is None or card.profile != profile:
        if card.proc is not None:
            card.stop()
        card.start(profile=profile)
        rig.wait_synced()


def doctor(rig, *args, env=None, wrap=None):
    """(exit code, text, exit code, JSON report) of two runs: text and --json."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PCSCLITE_", "OPENSC_"))}
    base["PCSCLITE_CSOCK_NAME"] = rig.sock("shim")
    base.update(env or {})
    argv = [str(CDRSESSION), "doctor", "--socket", rig.sock("shim"), "--pings", "3", *args]
    wrap = wrap or (lambda a: a)
    t = subprocess.run(wrap(argv), capture_output=True, text=True, env=base, timeout=120)
    j = subprocess.run(wrap(argv + ["--json"]), capture_output=True, text=True, env=base, timeout=120)
    return t.returncode, t.stdout, j.returncode, json.loads(j.stdout)


def pkcs11_check(rep):
    return next(c for c in rep["checks"] if c["id"] == "pkcs11")


def test_healthy_with_opensc(rig, card):
    with_card(rig, card, "cps3")
    code, text, code_j, rep = doctor(rig, "--pkcs11-module", OPENSC_MODULE)
    assert code == code_j == 0, text
    assert rep["verdict"] == "healthy", rep
    c = pkcs11_check(rep)
    assert c["result"] == "ok"
    assert c["detail"].startswith("opensc-pkcs11.so sees token 'CPS de CLAIRE"), c
    assert f"in '{rig.desk.readers[0]}'" in c["detail"]
    assert "[ ok ] pkcs11" in text and "Verdict: HEALTHY" in text
    assert rep["pkcs11"]["slots"][0]["token_present"] is True


@pytest.mark.skipif(CRYPTOLIB is None, reason=MISSING or "no Cryptolib")
def test_healthy_with_the_cryptolib(rig, card):
    with_card(rig, card, "cps3")
    mw = Middleware("cryptolib")
    try:
        code, text, _, rep = doctor(rig, "--pkcs11-module", str(mw.module), wrap=mw.argv)
    finally:
        mw.cleanup()
    assert code == 0, text
    c = pkcs11_check(rep)
    assert c["detail"] == (f"libcps3_pkcs11_lux.so sees token 'CPS de CLAIRE DUPONT' (serial {card.info()['cryptolib_serial']})"
                           f" in '{rig.desk.readers[0]}'"), c


@pytest.mark.skipif(DEFAULT_CRYPTOLIB.exists(), reason="the Cryptolib is installed at its default path here")
def test_cryptolib_missing_at_its_default_path(rig, card):
    with_card(rig, card, "cps3")
    code, text, code_j, rep = doctor(rig, "--pkcs11")
    assert code == code_j == 2, text
    assert rep["verdict"] == "broken" and rep["first_problem"] == "pkcs11"
    c = pkcs11_check(rep)
    assert c["detail"] == f"module missing: there is no PKCS#11 module at {DEFAULT_CRYPTOLIB}"
    assert "install the Cryptolib CPS" in c["advice"]
    assert f"What to do: {c['advice']}" in text
    # Only the middleware is wrong: every check before it passed.
    assert all(x["result"] == "ok" for x in rep["checks"] if x["id"] not in ("pkcs11", "latency")), rep["checks"]


def test_wrong_module_path(rig, card):
    with_card(rig, card, "cps3")
    code, _, _, rep = doctor(rig, "--pkcs11-module", "/usr/lib/x86_64-linux-gnu/no-such-pkcs11.so")
    assert code == 2
    assert "--pkcs11-module" in pkcs11_check(rep)["advice"]


def test_card_not_recognised(rig, card):
    with_card(rig, card, "cps4")  # OpenSC 0.23 has no CPS4 driver
    code, text, _, rep = doctor(rig, "--pkcs11-module", OPENSC_MODULE)
    assert code == 2, text
    c = pkcs11_check(rep)
    assert c["detail"] == (f"card not recognised: opensc-pkcs11.so sees the card in '{rig.desk.readers[0]}' but no "
                           "token (CKR_TOKEN_NOT_RECOGNIZED)"), c
    assert next(x for x in rep["checks"] if x["id"] == "card-type")["result"] == "ok"  # it is a CPx card


def test_reader_not_visible_to_the_module(rig, card, tmp_path):
    with_card(rig, card, "cps3")
    conf = tmp_path / "opensc.conf"
    conf.write_text('app default {\n  ignored_readers = "Virtual PCD";\n}\n')
    code, text, _, rep = doctor(rig, "--pkcs11-module", OPENSC_MODULE, env={"OPENSC_CONF": str(conf)})
    assert code == 2, text
    c = pkcs11_check(rep)
    assert c["detail"].startswith("reader not visible to the module: opensc-pkcs11.so lists"), c
    assert f"not the desk's '{rig.desk.readers[0]}'" in c["detail"], c
    assert "PCSCLITE_CSOCK_NAME" in c["advice"]
