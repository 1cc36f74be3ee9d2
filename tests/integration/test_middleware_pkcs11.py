"""Real PKCS#11 middleware on the simulated CPS card, directly at the desk's pcscd and through
CardBridge (desk agent + shim over a unix desk link): the same results, byte for byte.

Stacks: OpenSC's PKCS#11 module (always) and ANS's Cryptolib CPS 5.2.2 (when
scripts/get-cryptolib has unpacked it; skipped with the reason otherwise). Cards: cb-cardsim
--profile cps3 (IAS ECC, T=0) and cps4 (ChipDoc, T=1, logical channel 1), instant timing.
A PKCS#11 application (tests/harness/cbharness/p11_client.py, PyKCS11) lists the slots and
the token (label, serial, flags), the objects before and after C_Login, tries a wrong PIN
(CKR_PIN_INCORRECT, the retry counter shows in the token flags), logs in, reads both
certificates and signs with both keys; every signature is checked against the certificate's
public key, and the desk and shim runs must agree on everything (PKCS#1 v1.5 signatures are
deterministic: byte-identical). Three wrong PINs lock the PIN (CKR_PIN_LOCKED) the same way
on both sides. The desk agent and the shim run at --log-level trace: no PIN byte in their
logs (nor in the Cryptolib's own traces, which it documents as masked).

What each stack can do with these cards (found by running them; docs/middleware.md):
  * OpenSC 0.23 drives the CPS3 with its IAS-ECC "CPx" driver: authentication key with
    CKM_RSA_PKCS; the signature (non-repudiation) key only offers SHA*-RSA-PKCS, which this
    OpenSC build cannot do (the IAS "card finishes the hash" path is compiled out with
    OpenSSL 3), so it is not exercised with OpenSC. OpenSC has no CPS4 driver at all (upstream
    neither): the token is "not recognized", the same through CardBridge.
  * The Cryptolib: CPS3 authentication key CKM_RSA_PKCS (INTERNAL AUTHENTICATE), signature
    key SHA256-RSA-PKCS (PSO HASH + PSO CDS) and CKM_RSA_PKCS; CPS4 the same plus RSA-PSS.
"""
from __future__ import annotations

import hashlib
import os
import re

import pytest

from cbharness.pkcs11 import (MESSAGE, Middleware, SimCard, find_cryptolib, login_scenario, rsa_verify_pkcs1,
                               sha256_digest_info)

PIN = "73928461"      # distinctive: searched for in the logs
WRONG_PIN = "19283746"
CRYPTOLIB, CRYPTOLIB_MISSING = find_cryptolib()


def stacks():
    return [pytest.param("opensc", id="opensc"),
            pytest.param("cryptolib", id="cryptolib",
                         marks=pytest.mark.skipif(CRYPTOLIB is None, reason=CRYPTOLIB_MISSING or "no Cryptolib"))]


@pytest.fixture(scope="module")
def rig(module_rig_factory):
    r = module_rig_factory(slots=2, cards=(), log_level="trace", name="mw")
    yield r


@pytest.fixture(scope="module")
def card(rig):
    c = SimCard(rig.desk, 0, pin=PIN, log_dir=rig.logs)
    yield c
    c.stop()


def insert(rig, card: SimCard, profile: str) -> dict:
    """A fresh card of |profile| (PIN counter at 3), seen by the desk and the shim."""
    if card.proc is not None:
        card.stop()
    card.start(profile=profile)
    rig.wait_synced()
    return card.info()


def run_both(rig, card, stack: str, ops: list, profile: str) -> dict:
    """The scenario at the desk's pcscd, then through the shim, each with a fresh card and (for
    the Cryptolib) a cold cache of its own."""
    out = {}
    for target in ("desk", "shim"):
        insert(rig, card, profile)
        mw = Middleware(stack)
        try:
            out[target] = mw.run(rig.sock(target), ops)
        finally:
            mw.cleanup()
    return out


def by_op(results: list, op: str) -> list:
    return [r for r in results if r["op"] == op]


@pytest.mark.parametrize("profile", ["cps3", "cps4"])
@pytest.mark.parametrize("stack", stacks())
def test_login_and_sign_direct_vs_shim(rig, card, stack, profile):
    info = insert(rig, card, profile)
    if stack == "opensc" and profile == "cps4":
        # OpenSC 0.23 has no CPS4 driver: the reader shows a token it does not recognise,
        # exactly the same through CardBridge.
        res = {t: Middleware("opensc").run(rig.sock(t), [{"op": "slots"}, {"op": "token"}]) for t in ("desk", "shim")}
        assert res["desk"] == res["shim"], res
        assert res["desk"][0]["slots"][0]["token_present"] is True
        assert res["desk"][1]["rv"] == "CKR_TOKEN_NOT_RECOGNIZED", res["desk"]
        return
    ops = login_scenario(stack, profile, PIN, WRONG_PIN)
    res = run_both(rig, card, stack, ops, profile)
    desk, shim = res["desk"], res["shim"]

    # The same answers at the desk and through CardBridge (PSS signatures are salted: their
    # validity is checked below instead).
    def comparable(rs):
        return [{k: v for k, v in r.items() if not (r.get("op") == "sign" and "pss" in str(ops[i]) and k == "signature")}
                for i, r in enumerate(rs)]
    assert comparable(desk) == comparable(shim), f"desk and shim differ:\ndesk {desk}\nshim {shim}"

    slots, token_before = desk[0], desk[1]
    assert [s["token_present"] for s in slots["slots"]] == [True, False], slots
    assert slots["slots"][0]["description"] == rig.desk.readers[0]
    assert token_before["rv"] == "CKR_OK", token_before
    if stack == "cryptolib":
        assert token_before["label"] == info["token_label"]
        assert token_before["serial"] == info["cryptolib_serial"]
    else:
        # OpenSC: "<TokenInfo label> (<PIN label>)" cut to 32 characters; serial from TokenInfo.
        assert token_before["label"].startswith(info["token_label"][:14]), token_before
        assert token_before["serial"] and token_before["serial"] in "8025000001" + info["serial_digits"]
    assert "CKF_LOGIN_REQUIRED" in token_before["flags"] and "CKF_USER_PIN_COUNT_LOW" not in token_before["flags"]

    objects_before, objects_after = by_op(desk, "objects")
    before = {(o["class"], o["label"]) for o in objects_before["objects"]}
    after = {(o["class"], o["label"]) for o in objects_after["objects"]}
    certs = {("certificate", "Certificat d'authentification CPS"), ("certificate", "Certificat de signature CPS")}
    keys = {("private_key", "Cle d'authentification CPS"), ("private_key", "Cle de signature CPS")}
    assert certs <= before and not (keys & before), objects_before
    assert certs | keys <= after, objects_after
    if stack == "cryptolib":
        # The business data objects the Cryptolib documents; the activities need the PIN.
        data_before = {l for c, l in before if c == "data"}
        data_after = {l for c, l in after if c == "data"}
        assert {"CPS_ID_CARD", "CPS_NAME_PS", "CPS_INFO_PS", "CPS_DATA"} <= data_before, data_before
        assert "CPS_ACTIVITY_01_PS" not in data_before and "CPS_ACTIVITY_01_PS" in data_after, data_after
        if profile == "cps3":  # the CPS2ter mirror objects, CPS3 only
            assert {"CPS_SIT_FACT", "CPS2TER_ACTIVITY_01_PS"} <= data_after

    wrong, token_after_wrong, right, token_after_right = desk[4], desk[5], desk[6], desk[7]
    assert wrong["rv"] == "CKR_PIN_INCORRECT", wrong
    assert "CKF_USER_PIN_COUNT_LOW" in token_after_wrong["flags"], token_after_wrong
    assert right["rv"] == "CKR_OK", right
    assert "CKF_USER_PIN_COUNT_LOW" not in token_after_right["flags"], token_after_right

    cert_auth, cert_sign = (bytes.fromhex(r["der"]) for r in by_op(desk, "cert"))
    assert info["holder"]["common_name"].encode() in cert_auth
    signs = by_op(desk, "sign")
    assert all(s["rv"] == "CKR_OK" for s in signs), signs
    assert rsa_verify_pkcs1(cert_auth, bytes.fromhex(signs[0]["signature"]), sha256_digest_info(MESSAGE), hashed=False)
    if stack == "cryptolib":
        sig_hash, sig_di = bytes.fromhex(signs[1]["signature"]), bytes.fromhex(signs[2]["signature"])
        assert rsa_verify_pkcs1(cert_sign, sig_hash, MESSAGE, hashed=True)
        assert sig_hash == sig_di, "SHA256-RSA-PKCS and RSA-PKCS over the DigestInfo must give one signature"
        if profile == "cps4":
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding
            key = x509.load_der_x509_certificate(cert_auth).public_key()
            for side in (desk, shim):
                key.verify(bytes.fromhex(by_op(side, "sign")[3]["signature"]), MESSAGE,
                           padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    # The card did the signing: its log shows the private-key operation.
    ops_seen = " ".join(card.apdu_lines())
    assert "INTERNAL AUTHENTICATE" in ops_seen or "PSO DECIPHER" in ops_seen


# OpenSC 0.23 has no CPS4 driver (test_login_and_sign_direct_vs_shim pins that down): no
# OpenSC/CPS4 case here.
@pytest.mark.parametrize("stack,profile", [
    pytest.param("opensc", "cps3", id="opensc-cps3"),
    pytest.param("cryptolib", "cps3", id="cryptolib-cps3",
                 marks=pytest.mark.skipif(CRYPTOLIB is None, reason=CRYPTOLIB_MISSING or "no Cryptolib")),
    pytest.param("cryptolib", "cps4", id="cryptolib-cps4",
                 marks=pytest.mark.skipif(CRYPTOLIB is None, reason=CRYPTOLIB_MISSING or "no Cryptolib"))])
def test_three_wrong_pins_lock(rig, card, stack, profile):
    ops = [{"op": "open"}] + [{"op": "login", "pin": WRONG_PIN}, {"op": "token"}] * 3 + [
        {"op": "login", "pin": PIN}, {"op": "token"}]
    res = run_both(rig, card, stack, ops, profile)
    assert res["desk"] == res["shim"], res
    r = res["desk"]
    assert [x["rv"] for x in by_op(r, "login")] == ["CKR_PIN_INCORRECT", "CKR_PIN_INCORRECT", "CKR_PIN_LOCKED",
                                                     "CKR_PIN_LOCKED"], r
    flags = [x["flags"] for x in by_op(r, "token")]
    assert "CKF_USER_PIN_COUNT_LOW" in flags[0]
    assert "CKF_USER_PIN_FINAL_TRY" in flags[1]
    assert "CKF_USER_PIN_LOCKED" in flags[2] and "CKF_USER_PIN_LOCKED" in flags[3]


def test_opensc_tools_direct_vs_shim(rig, card, tmp_path):
    """OpenSC's own tools on the CPS3 (where the issue started: pkcs15-tool said "File not
    found"): pkcs15-tool -D dumps the PKCS#15 structure, pkcs11-tool lists the token and signs
    with the authentication key; the same output through CardBridge, a valid signature."""
    import subprocess
    from cbharness.pkcs11 import OPENSC_MODULE
    out = {}
    (tmp_path / "di.bin").write_bytes(sha256_digest_info(MESSAGE))
    for target in ("desk", "shim"):
        insert(rig, card, "cps3")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PCSCLITE_", "OPENSC_"))}
        env["PCSCLITE_CSOCK_NAME"] = rig.sock(target)

        def run(*argv):
            r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
            assert r.returncode == 0, f"{argv}: {r.stdout[-1500:]} {r.stderr[-1500:]}"
            return r.stdout
        sig = tmp_path / f"sig-{target}.bin"
        out[target] = {
            "pkcs15-tool -D": run("pkcs15-tool", "-D"),
            "pkcs11-tool -L": run("pkcs11-tool", "--module", OPENSC_MODULE, "-L"),
            "sign": run("pkcs11-tool", "--module", OPENSC_MODULE, "--login", "--pin", PIN, "--sign", "--mechanism",
                        "RSA-PKCS", "--label", "Cle d'authentification CPS", "-i", str(tmp_path / "di.bin"), "-o",
                        str(sig)),
            "signature": sig.read_bytes().hex(),
        }
    assert out["desk"] == out["shim"]
    d = out["desk"]
    assert "PKCS#15 Card [CPS de CLAIRE DUPONT]" in d["pkcs15-tool -D"], d["pkcs15-tool -D"]
    assert "Private RSA Key [Cle d'authentification CPS]" in d["pkcs15-tool -D"]
    assert "token label        : CPS de CLAIRE" in d["pkcs11-tool -L"], d["pkcs11-tool -L"]
    cert = bytes.fromhex(Middleware("opensc").run(rig.sock("desk"), [
        {"op": "open"}, {"op": "cert", "label": "Certificat d'authentification CPS"}])[1]["der"])
    assert rsa_verify_pkcs1(cert, bytes.fromhex(d["signature"]), sha256_digest_info(MESSAGE), hashed=False)


@pytest.mark.skipif(CRYPTOLIB is None, reason=CRYPTOLIB_MISSING or "no Cryptolib")
def test_cryptolib_cps3_authentication_key_is_pkcs1_only(rig, card):
    """The Cryptolib refuses, before the card, everything but CKM_RSA_PKCS on a CPS3's
    authentication key: no hash-and-sign, no raw RSA (it advertises CKM_RSA_X_509), no RSA-PSS,
    so no TLS 1.3 with a CPS3. The same answers through CardBridge."""
    block = "0001" + "ff" * 202 + "00" + sha256_digest_info(MESSAGE).hex()
    key = "Cle d'authentification CPS"
    ops = [{"op": "open"}, {"op": "login", "pin": PIN}, {"op": "mechanisms"},
           {"op": "sign", "key": key, "mechanism": "SHA256_RSA_PKCS", "data": MESSAGE.hex()},
           {"op": "sign", "key": key, "mechanism": "RSA_X_509", "data": block},
           {"op": "sign", "key": key, "mechanism": "RSA_PKCS_PSS", "data": hashlib.sha256(MESSAGE).hexdigest(),
            "pss": {"hash": "SHA256", "mgf": "MGF1_SHA256", "salt": 32}},
           {"op": "logout"}]
    res = run_both(rig, card, "cryptolib", ops, "cps3")
    assert res["desk"] == res["shim"], res
    r = res["desk"]
    assert "CKM_RSA_X_509" in r[2]["mechanisms"] and "CKM_RSA_PKCS_PSS" not in r[2]["mechanisms"], r[2]
    assert [x["rv"] for x in r[3:6]] == ["CKR_KEY_TYPE_INCONSISTENT", "CKR_FUNCTION_NOT_SUPPORTED",
                                        "CKR_MECHANISM_INVALID"], r


def pin_patterns(pin: str) -> list:
    raw = pin.encode()
    hexes = [f"{b:02x}" for b in raw]
    sep = r"(?:\s|:|,|-|0x|\\x)*"
    return [re.compile(sep.join(hexes), re.I), re.compile(re.escape(pin))]


def test_no_pin_in_any_log(rig, card):
    """Runs last in this module: everything above went through the same desk agent and shim at
    trace level. Also a Cryptolib run with its own traces on (debug 10)."""
    extra = ""
    if CRYPTOLIB is not None:
        insert(rig, card, "cps3")
        mw = Middleware("cryptolib", traces=True)
        try:
            r = mw.run(rig.sock("shim"), [{"op": "open"}, {"op": "login", "pin": WRONG_PIN},
                                          {"op": "login", "pin": PIN}, {"op": "logout"}])
            assert [x["rv"] for x in r] == ["CKR_OK", "CKR_PIN_INCORRECT", "CKR_OK", "CKR_OK"], r
            extra = mw.log_text()
            assert "C_Login" in extra, "the Cryptolib wrote no traces: the check below would prove nothing"
        finally:
            mw.cleanup()
    logs = {"desk agent": rig.agent_log(), "shim": rig.shim_log(), "Cryptolib traces": extra}
    for name in ("desk agent", "shim"):
        # The VERIFY commands went through (header logged, data redacted): the search below is
        # over logs that saw the PINs go by.
        assert re.search(r"transmit 0[01] 20 00 01 <PIN redacted>", logs[name]), \
            f"no redacted VERIFY in the {name} log: the search would prove nothing"
    for name, text in logs.items():
        for pin in (PIN, WRONG_PIN):
            for rx in pin_patterns(pin):
                m = rx.search(text)
                assert m is None, f"PIN {pin} in the {name} log: ...{text[max(0, m.start() - 80):m.end() + 20]}..."
