"""The Cryptolib CPS's disk cache and EF_ACTUA, through CardBridge, as ANS documents them
(SpecificationsInternes_PKCS11_CryptoLib_CPS3, "Gestion du cache"; SpecificationsExternes,
"Cache"): the module keeps what it read from a card in /etc/opt/santesocial/CPS/cache, named
<card serial>_<path>, and trusts it while the card's EF_ACTUA (3F00/D010, the date of the last
update of the situation data) is the one it cached:

  cold   first use on this server: the situation file is read from the card and cached;
  warm   the same card again: served from the cache, the card is not read;
  stale  the card's situation data changed but EF_ACTUA did not: the cached (old) value, as
         the algorithm says ("sinon ne rien faire");
  update EF_ACTUA changed: the cached situation files are dropped and read again;
  bad    an empty EF_ACTUA: the token is listed but C_OpenSession answers
         CKR_VENDOR_DEFINED + 1 (CKR_ASIP_BAD_EF_ACTUA), "reconnue mais inutilisable".

CPS4: the Cryptolib 5.2.2 does not look at EF_ACTUA on a CPS4 at all (its public sources:
cps4_verify_update "Pas d'accès au fichier EF_ACTUA en CPS4 pour le moment"): cold and warm as
above, but a CPS4 whose situation data changed keeps being served from the cache even with a
new EF_ACTUA, and an empty EF_ACTUA does not make it unusable. The test pins that down too: a
hospital updating CPS4 situations needs the cache emptied (docs/middleware.md).

All through the shim (the module runs in the terminal-server session; on a farm every server
starts cold). Needs the Cryptolib (scripts/get-cryptolib), skipped otherwise.
"""
from __future__ import annotations

import pytest

from cbharness.pkcs11 import Middleware, SimCard, find_cryptolib

CRYPTOLIB, MISSING = find_cryptolib()
pytestmark = pytest.mark.skipif(CRYPTOLIB is None, reason=MISSING or "no Cryptolib")

PIN = "4321"
READ = [{"op": "open"}, {"op": "login", "pin": PIN}, {"op": "read_data", "label": "CPS_ACTIVITY_01_PS"},
        {"op": "read_data", "label": "CPS_INFO_PS"}, {"op": "logout"}]


@pytest.fixture(scope="module")
def rig(module_rig_factory):
    return module_rig_factory(slots=2, cards=(), name="mwcache")


def activity(results) -> str:
    r = results[2]
    assert r["rv"] == "CKR_OK", results
    text = bytes.fromhex(r["value"]).decode("latin-1")
    assert "Etablissement simule" in text, text
    return text


def situation_reads(card: SimCard) -> int:
    return sum(1 for l in card.apdu_lines() if "READ BINARY D120" in l)


@pytest.mark.parametrize("profile", ["cps3", "cps4"])
def test_cache_and_ef_actua(rig, profile):
    card = SimCard(rig.desk, 0, profile=profile, pin=PIN, log_dir=rig.logs, actua="20250115080000",
                   data_revision=1)
    mw = Middleware("cryptolib")
    shim = rig.sock("shim")
    try:
        card.start()
        rig.wait_synced()
        serial = card.info()["cryptolib_serial"]

        # cold: read from the card, then cached under the card's serial
        n0 = situation_reads(card)
        assert "revision 1" in activity(mw.run(shim, READ))
        cold_reads = situation_reads(card) - n0
        assert cold_reads >= 1, card.apdu_lines()[-20:]
        cached = mw.cache_files()
        assert f"{serial}_0001D120" in cached, cached
        assert (f"{serial}_D010" in cached) == (profile == "cps3"), cached  # CPS4: EF_ACTUA not used

        # warm: the same card again, nothing read from it
        n1, a1 = situation_reads(card), len(card.apdu_lines())
        assert "revision 1" in activity(mw.run(shim, READ))
        assert situation_reads(card) == n1, "warm cache: the situation file was read from the card again"
        warm_apdus = len(card.apdu_lines()) - a1

        # stale: the data changed on the card, EF_ACTUA did not -> the cached value
        card.restart(data_revision=2)
        rig.wait_synced()
        n2 = situation_reads(card)
        assert "revision 1" in activity(mw.run(shim, READ))
        assert situation_reads(card) == n2

        # update: a new EF_ACTUA -> situation files read again, the new value (CPS3)
        card.restart(data_revision=2, actua="20260301090000")
        rig.wait_synced()
        n3 = situation_reads(card)
        if profile == "cps4":
            assert "revision 1" in activity(mw.run(shim, READ)), "CPS4: EF_ACTUA is not checked, the cache stays"
            assert situation_reads(card) == n3
        else:
            assert "revision 2" in activity(mw.run(shim, READ))
            assert situation_reads(card) > n3, "EF_ACTUA changed but the situation file was not read again"
            # ... and the new EF_ACTUA is what the cache holds now: warm again
            n4 = situation_reads(card)
            assert "revision 2" in activity(mw.run(shim, READ))
            assert situation_reads(card) == n4

        # a cold server on the same card reads everything again (every server of a farm starts cold)
        mw.reset_state()
        a5 = len(card.apdu_lines())
        assert "revision 2" in activity(mw.run(shim, READ))
        cold_apdus = len(card.apdu_lines()) - a5
        assert cold_apdus > warm_apdus, (cold_apdus, warm_apdus)

        # bad: an empty EF_ACTUA
        card.restart(actua="empty")
        rig.wait_synced()
        mw.reset_state()
        r = mw.run(shim, [{"op": "token"}, {"op": "open"}])
        assert r[0]["rv"] == "CKR_OK", r
        assert r[1]["rv"] == ("CKR_VENDOR_DEFINED+1" if profile == "cps3" else "CKR_OK"), r
    finally:
        card.stop()
        mw.cleanup()
