"""A CDR-like login in the session, through CardBridge: real clients authenticate to a real
HTTPS server with the simulated card's key through PKCS#11, the card at the desk.

    desk: emulated pcscd + cb-cardsim (cps3 / cps4)  <- cardbridge-desk <- cardbridge-shim
    session: curl + libp11 engine (OpenSSL) | NSS tstclnt, with OpenSC's module or the
             Cryptolib CPS, PCSCLITE_CSOCK_NAME = the shim
    server: nginx on 127.0.0.1 requiring a client certificate issued by the simulator's CA,
            /droits answers a rights-lookup page naming the certificate's holder

Each client must get the page with the holder's name (the card's certificate CN). TLS 1.2
with RSA PKCS#1 v1.5 for the CPS3 (neither stack offers RSA-PSS on it, so TLS 1.3 cannot
work); the CPS4 with the Cryptolib also over TLS 1.3 (the card does RSA-PSS). OpenSC has no
CPS4 driver. A wrong PIN gets no page. The Cryptolib runs skip with the reason when it is not
unpacked (scripts/get-cryptolib).
"""
from __future__ import annotations

import pytest

from cbharness.cdr import CdrStandIn, curl_login, nss_login
from cbharness.pkcs11 import Middleware, SimCard, find_cryptolib

PIN = "2580"
CRYPTOLIB, MISSING = find_cryptolib()
needs_cryptolib = pytest.mark.skipif(CRYPTOLIB is None, reason=MISSING or "no Cryptolib")

CASES = [
    pytest.param("opensc", "cps3", "curl", "1.2", id="opensc-cps3-curl"),
    pytest.param("opensc", "cps3", "nss", "1.2", id="opensc-cps3-nss"),
    pytest.param("cryptolib", "cps3", "curl", "1.2", id="cryptolib-cps3-curl", marks=needs_cryptolib),
    pytest.param("cryptolib", "cps3", "nss", "1.2", id="cryptolib-cps3-nss", marks=needs_cryptolib),
    pytest.param("cryptolib", "cps4", "curl", "1.2", id="cryptolib-cps4-curl", marks=needs_cryptolib),
    pytest.param("cryptolib", "cps4", "nss", "1.2", id="cryptolib-cps4-nss", marks=needs_cryptolib),
    pytest.param("cryptolib", "cps4", "curl", "1.3", id="cryptolib-cps4-curl-tls13", marks=needs_cryptolib),
    pytest.param("cryptolib", "cps4", "nss", "1.3", id="cryptolib-cps4-nss-tls13", marks=needs_cryptolib),
]


@pytest.fixture(scope="module")
def rig(module_rig_factory):
    return module_rig_factory(slots=2, cards=(), name="cdr")


@pytest.fixture(scope="module")
def card(rig):
    c = SimCard(rig.desk, 0, pin=PIN, log_dir=rig.logs)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def cdr(rig, card):
    ca_dir = card.export(rig.rt / "card-ca")
    server = CdrStandIn(ca_dir / "ca.pem", rig.rt / "cdr").start()
    yield server
    server.stop()


def use_card(rig, card, profile):
    if card.proc is None or card.profile != profile:
        if card.proc is not None:
            card.stop()
        card.start(profile=profile)
        rig.wait_synced()
    return card.info()


def login(kind, client, rig, card, cdr, pin, tls):
    mw = Middleware(kind)
    try:
        shim = rig.sock("shim")
        if client == "curl":
            return curl_login(mw, shim, cdr, pin, tls=tls)
        token = mw.run(shim, [{"op": "token"}])[0]
        assert token["rv"] == "CKR_OK", token
        return nss_login(mw, shim, cdr, pin, token["label"], tls=tls)
    finally:
        mw.cleanup()


@pytest.mark.parametrize("kind,profile,client,tls", CASES)
def test_cdr_page_through_cardbridge(rig, card, cdr, kind, profile, client, tls):
    info = use_card(rig, card, profile)
    n0 = len(card.apdu_lines())
    r = login(kind, client, rig, card, cdr, PIN, tls)
    assert r.returncode == 0, f"{r.client} failed ({r.returncode}): {r.stderr[-2000:]}\n{cdr.error_log()}"
    assert "Consultation des droits" in r.page, r.page
    assert r.holder == info["holder"]["common_name"], r.page
    assert f"Identifiant : {info['holder']['id']}" in r.page, r.page
    assert r.protocol == f"TLSv{tls}", r.page
    # The TLS signature was made by the card at the desk, through the shim.
    ops = [l for l in card.apdu_lines()[n0:] if "INTERNAL AUTHENTICATE" in l or "PSO" in l]
    assert ops, "no private-key operation reached the card"
    print(f"\n[{kind} {profile} {r.client} TLS {tls}] {r.page.strip()}")


@pytest.mark.parametrize("client", ["curl", "nss"])
def test_wrong_pin_gets_no_page(rig, card, cdr, client):
    use_card(rig, card, "cps3")
    n0 = len(card.apdu_lines())
    try:
        r = login("opensc", client, rig, card, cdr, "9999", "1.2")
        assert r.holder is None, r.page
        wrong = [l for l in card.apdu_lines()[n0:] if "VERIFY wrong" in l]
        assert wrong, "the wrong PIN never reached the card"
        # (NSS asks its password callback again after a wrong PIN and tstclnt's answers the same
        # file each time: it can use up the card's tries. A fresh card for the next test.)
        print(f"\n[{client}] wrong PIN: {len(wrong)} failed VERIFY at the card")
    finally:
        card.stop()
